"""The models a server serves: their signatures, the built-ins, the files and factories
they load from, the repository of numbered versions, the registry of what is loaded on
which device, dynamic batching, and per-version statistics.

May import: ``device`` and the package root's shared modules.
"""
