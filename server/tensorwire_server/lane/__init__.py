"""The fast lane (issue 33): small calls as compact frames on a side-channel connection
instead of gRPC. ``grants`` (the single-use passes an authenticated OpenLane hands out,
bound to the caller's identity), ``listener`` (``LaneServer``: the connections the data
port hands over and the lane's own Unix socket for clients on this host; which
gate-wrapped handler a method runs), ``connection`` (one connection: its frames, calls
and answers) and ``context`` (``LaneContext``, what a handler reads in place of
grpc.aio's context). Every call goes through the transport's gate and the server's own
gRPC handlers, so scopes, admission, deadlines, metrics and statuses are gRPC's.

May import: grpc, ``transport`` (its security vocabulary) and the package root's shared
modules; the composition root hands it the gate and the handlers.
"""
