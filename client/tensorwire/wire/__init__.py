"""The wire layer: how tensorwire's messages look on the wire, shared by both ends.

The client and the server both build on these modules, and the server imports nothing
else of the client package but ``tensorwire.errors`` and the generated contract
``tensorwire.v1`` (whose path the proto package fixes: ``package tensorwire.v1;``).
Nothing here imports grpc's channels or torch.

- ``codec``: NumPy arrays and Call arguments <-> tensorwire.v1 messages (``Encoder``,
  ``Received``, ``receive``), with payloads kept out of protobuf's copies.
- ``framing``: the protobuf wire-format walker that splices payloads in and out.
- ``streaming``: one message of any size as a header part and payload chunks.
- ``dtypes``: the dtype table, wire enum <-> NumPy dtype <-> name.
- ``protocol``: what both ends agree on beyond the .proto: metadata keys, size limits
  and channel options.
"""
