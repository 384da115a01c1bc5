"""The transport-free service core: what the tensorwire.v1 and KServe v2 services do
beyond translating messages (the ``Service``), the sessions and workspaces a caller keeps,
remote training, and the models loaded at start and while serving.

May import: ``engine``, ``models``, ``regions``, ``device`` and the package root's
shared modules (settings, limits, named, identities). Never grpc, never a protocol
package: both protocols call this one.
"""
