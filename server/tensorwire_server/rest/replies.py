"""What the REST calls answer with: JSON bodies (orjson), the v2 error object with the
HTTP status of its gRPC code (tensorwire.errors.HTTP_STATUS, the one table), and
protobuf messages of the protocol as the plain JSON objects the REST API gives."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

import orjson
from aiohttp import web
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from tensorwire.errors import http_status
from tensorwire.wire.protocol import REQUEST_ID_KEY
from tensorwire_server.transport import rpc

JSON: Final = "application/json"
#: Triton's header giving the length of a response's JSON when binary data follows it.
HEADER_LENGTH: Final = "Inference-Header-Content-Length"
#: The response header that tells when to ask again (a starting server's pushback).
RETRY_AFTER: Final = "Retry-After"


def json_response(
    value: Any, request_id: str, status: int = 200, extra: Mapping[str, str] | None = None
) -> web.Response:
    """``value`` as a JSON body, with the call's request id."""
    headers = {REQUEST_ID_KEY: request_id, **(extra or {})}
    return web.Response(body=orjson.dumps(value), status=status, content_type=JSON, headers=headers)


def empty_response(request_id: str) -> web.Response:
    """200 with no body (what Triton answers a load, an unload, a registration)."""
    return web.Response(status=200, headers={REQUEST_ID_KEY: request_id})


def error_response(
    code: str, message: str, request_id: str, extra: Mapping[str, str] | None = None
) -> web.Response:
    """The v2 error object, ``{"error": message}``, with the HTTP status of gRPC ``code``
    (a status code's name)."""
    return json_response({"error": rpc.clip(message)}, request_id, http_status(code), extra)


def to_json(message: Message) -> dict[str, Any]:
    """A protocol message as the REST API's JSON object: every field by its proto name,
    scalars and repeated fields always (an empty shape is ``[]``), messages when set,
    64-bit integers as numbers (protobuf's own JSON form makes them strings), enums
    by name, maps as objects; bytes are left out (the REST API has none)."""
    found: dict[str, Any] = {}
    for field in message.DESCRIPTOR.fields:
        value = getattr(message, field.name)
        if field.type == FieldDescriptor.TYPE_BYTES:
            continue
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            found[field.name] = {
                k: _value(field.message_type.fields_by_name["value"], v) for k, v in value.items()
            }
        elif _repeated(field):
            found[field.name] = [_value(field, v) for v in value]
        elif field.message_type is not None:
            if message.HasField(field.name):
                found[field.name] = to_json(value)
        elif field.containing_oneof is None or message.HasField(field.name):
            found[field.name] = _value(field, value)
    return found


def _value(field: Any, value: Any) -> Any:
    if field.message_type is not None:
        return to_json(value)
    if field.enum_type is not None:
        return field.enum_type.values_by_number[value].name
    return value


def _repeated(field: Any) -> bool:
    # protobuf 6 and later say is_repeated; earlier ones the label (gone in 7).
    found = getattr(field, "is_repeated", None)
    if found is not None:
        return bool(found)
    return bool(field.label == FieldDescriptor.LABEL_REPEATED)
