"""Where arrays become tensors and back: NumPy <-> torch at the device's edge, and on
CUDA the pinned host buffers streamed payloads are staged in.

May import: torch, numpy and the package root's shared modules; nothing else of the
server.
"""
