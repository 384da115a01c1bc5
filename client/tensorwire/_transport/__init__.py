"""The client's transport: what sends a call and brings its answer back. Client and
AsyncClient each hold one (``BaseClient._transport``), made from their constructor's
arguments; a subclass may name its own kind (``BaseClient._TRANSPORT``).

- ``transport``: the settings, channels, replicas and pinning, each call's deadline
  and whether it streams; ``blocking`` and ``aio``: its two kinds, which differ only
  in how they wait (grpc against grpc.aio).
- ``methods``: the TensorService methods, what each answers and may be sent twice.
- ``calls``: one call across its attempts: retries, backoff, pushback, deadlines, the
  error the caller sees; ``status``: what a failed gRPC call says.
- ``ticket_exchange``: a streamed attempt's exchange as a state machine without I/O:
  ask for a ticket, present it, or fall back to chunks.
- ``dataport``: the data port's connections and routes; ``same_host``: shared memory
  with a server on this host; ``connections``: the pools and detours both share.
- ``channel``: credentials, TLS, the token and what is loopback; ``targets``: one
  server or several replicas.

May import: ``tensorwire.wire``, ``tensorwire.v1``, ``tensorwire.errors``,
``tensorwire.types`` and ``tensorwire._flow``; nothing of the clients above it.
"""
