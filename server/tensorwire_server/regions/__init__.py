"""Shared-memory regions clients on this host register (Triton's extension of the v2
protocol), both kinds in one table (table.py: one namespace per caller, one lock, one
set of limits): system regions (system.py, POSIX objects) and CUDA regions (cuda.py,
IPC handles); and the kernel copies (copies.py) that read and write a client's memory
without trusting it, one ``Copies`` per server.

May import: ``device`` and the package root's shared modules. Knows nothing of gRPC.
"""
