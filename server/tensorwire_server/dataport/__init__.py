"""The data port: the bulk side channel beside gRPC. A TCP listener moves a streamed
call's payloads with ``recv_into``/``sendall`` once the call's ticket is shown, and on
Linux an abstract Unix socket lets a client on the same host hand over shared-memory
segments that the kernel copies (same-host transfers). Each listener keeps its
connections and transfers within budgets per caller.

May import: ``regions`` (its kernel copies), the client's wire layer and the package
root's shared modules. Knows nothing of gRPC or torch.
"""
