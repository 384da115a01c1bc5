"""The access log: one record per finished call (logger ``tensorwire_server.access``),
and the JSON lines the server's logs are written in, each carrying the request id of
the call being answered."""

from __future__ import annotations

import json
import logging
from typing import Any

from tensorwire_server.calls import Call, current

log = logging.getLogger("tensorwire_server.access")


def write(call: Call, code: str, seconds: float) -> None:
    """Write the access record of ``call``, finished with ``code`` after ``seconds``."""
    log.info(
        "%s %s %s %.1f ms in=%d out=%d",
        call.method,
        call.target or "-",
        code,
        seconds * 1e3,
        call.bytes_in,
        call.bytes_out,
        extra={
            "fields": {
                "request_id": call.request_id,
                "method": call.method,
                "target": call.target,
                "code": code,
                "seconds": round(seconds, 6),
                "bytes_in": call.bytes_in,
                "bytes_out": call.bytes_out,
                "caller": call.caller,
            }
        },
    )


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, the request id of the
    call being answered, and an access record's fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S%z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        call = current()
        if call is not None:
            entry["request_id"] = call.request_id
        entry.update(getattr(record, "fields", {}))  # an access record's own keys
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)
