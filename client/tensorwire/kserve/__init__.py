"""Generated protobuf messages of the KServe v2 / Open Inference Protocol (made by
scripts/gen-proto), in a descriptor pool of their own: tritonclient's stubs declare the
same ``inference.*`` names in protobuf's default pool, and both import in one process."""
