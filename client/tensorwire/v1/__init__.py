"""Generated protobuf and gRPC stubs for tensorwire.v1 (made by scripts/gen-proto)."""
