"""The client half of tests/dataport/test_two_hosts.py, run inside the client's namespace:
one identity round trip of ``MIB`` MiB to ``ADDRESS`` over TLS with the CA at ``CA``;
prints what happened as one JSON line: the outcome, ``seconds`` until it (the answer,
or the call's error), and ``closed``, the seconds until the client was closed.

    python tests/support/two_hosts_client.py ADDRESS CA MIB TIMEOUT
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np

import tensorwire as tw


def main() -> None:
    address, ca, mib, timeout = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
    array = np.arange((mib << 20) // 4, dtype=np.float32)
    began = time.monotonic()
    with tw.Client(address, root_certificates=ca, timeout=timeout, retries=0) as client:
        try:
            out = client.infer("identity", array)["output"]
        except tw.TensorwireError as exc:
            report = {"ok": False, "error": type(exc).__name__, "message": str(exc)}
            # The call's own end: closing the client afterwards waits for gRPC's channel
            # to finish the cancelled call, which over a cut link can take its
            # transport's keepalive timeout (counted in "closed").
            report["seconds"] = time.monotonic() - began
        else:
            report = {
                "ok": bool(np.array_equal(out, array)),
                # A connection goes back to the pool only after a whole response.
                "data_plane": client._transport._data.links.idle.count() > 0,
                # The ticket named the server's same-host socket: from another
                # namespace it does not answer, and the client said so to itself.
                "same_host_refused": bool(client._transport._data.same_host.detours.avoided()),
            }
    report.setdefault("seconds", time.monotonic() - began)
    report["closed"] = time.monotonic() - began
    print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
