"""Where arrays become tensors and back: NumPy <-> torch at the device's edge, and on
CUDA the pinned host buffers streamed payloads are staged in, and what a CUDA error
that surfaced means for the device (faults.py: the one hook every package reports to).

May import: torch, numpy and the package root's shared modules; nothing else of the
server.
"""
