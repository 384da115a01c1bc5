"""Deploy on a Ray cluster: tensorwire replicas as Ray actors, one per GPU (or a CPU
share), spread over the cluster's nodes, each a whole tensorwire server (gRPC, health,
metrics, data port) bound to its own node's address; a fleet that keeps their list
current (a file, and a DNS name clients resolve), grows and shrinks it on tensorwire's
own load, and replaces replicas lost with their node. Clients connect straight to the
replicas: the client never imports Ray (docs/deploy.md, "Ray").

Ray is the server's optional extra (``tensorwire-server[ray]``); only this package
imports it, and only when it runs.

May import: the composition root (server: a replica is a TensorwireServer) and the
command line (cli: its flags and settings, so a replica takes the same ones). It sits
above both, and nothing imports it.
"""
