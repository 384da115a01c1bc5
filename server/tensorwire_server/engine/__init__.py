"""The torch engine: inputs bound to a model's signature, models and allowlisted
functions run, gradients taken, short programs of both run in one call. It takes and
returns NumPy arrays and raises tensorwire errors.

May import: ``models``, ``device`` and the package root's shared modules. No sessions,
no gRPC.
"""
