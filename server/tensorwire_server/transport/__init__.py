"""What every RPC passes through, whichever protocol: ``gate`` (the server's
interceptor: the server's state, tokens and scopes, budgets) with ``guarded`` (each
call behind it: deadline, request reading, counting, recording), ``lifecycle`` (the
server's state, the calls in flight), ``admission`` (the budgets), ``security`` (TLS
and tokens), ``rpc`` (the error mapping and handler shapes), ``calls`` (each call's
record and request id), ``metrics`` (Prometheus) with ``metrics_endpoint`` (its HTTP
listener), ``access_log`` (the access log and JSON log lines), ``executor`` (Compute,
where torch work runs) and ``heap`` (the heap trimmer).

May import: grpc and the package root's shared modules; never the engine, the core or a
protocol package (they import this one).
"""
