"""What every RPC passes through, whichever protocol: ``gate`` (the server's
interceptor: the server's state, tokens and scopes, budgets) with ``guarded`` (each
call behind it: deadline, request reading, counting, recording), ``passage`` (the
same for a call of another protocol: the rest package's HTTP), ``lifecycle`` (the
server's state, the calls in flight), ``admission`` (the budgets), ``security`` (TLS
and tokens), ``rpc`` (the error mapping and handler shapes), ``executor`` (Compute,
where torch work runs), ``heap`` (the heap trimmer). The fast lane (the ``lane``
package) runs its calls through this gate too. Each call's record is the root's
``calls``; the gate hands each finished call to ``telemetry``.

May import: grpc, ``telemetry`` and the package root's shared modules; never the
engine, the core or a protocol package (they import this one).
"""
