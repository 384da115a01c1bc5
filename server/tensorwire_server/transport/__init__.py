"""What every RPC passes through, whichever protocol: the gate (the server's
interceptor: lifecycle, tokens and scopes, admission, deadlines), the error mapping and
handler shapes, TLS and tokens, metrics, access logs and the metrics endpoint, the
executor torch work runs on, and the heap trimmer.

May import: grpc and the package root's shared modules; never the engine, the core or a
protocol package (they import this one).
"""
