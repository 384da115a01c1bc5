"""Shared-memory regions clients on this host register (Triton's extension of the v2
protocol), both kinds: system (POSIX objects) and CUDA (IPC handles), in one namespace
per caller with one lock; and the kernel copies that read and write a client's memory
without trusting it.

May import: ``device`` and the package root's shared modules. Knows nothing of gRPC.
"""
