"""Each REST call from its arrival to its response: routed, passed through the gate
(transport.passage: token, scope, budgets, deadline, metrics, access log) from its
headers alone, its body read within its limits, answered by the protocol's
``InferenceServicer`` (the same as gRPC's), and written back, errors as the v2 error
object with the HTTP status of their gRPC code."""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import time
from typing import Any, Final

import orjson
from aiohttp import web

from tensorwire.errors import InvalidArgumentError, TensorwireError
from tensorwire.wire.protocol import REQUEST_ID_KEY
from tensorwire_server import calls
from tensorwire_server.kserve.protocol import OFF_LOOP, InferenceServicer
from tensorwire_server.kserve.v2 import grpc_service_pb2 as pb
from tensorwire_server.rest import infer_json, infer_reply
from tensorwire_server.rest.body import BodyError, read_body
from tensorwire_server.rest.replies import (
    HEADER_LENGTH,
    JSON,
    RETRY_AFTER,
    empty_response,
    error_response,
    json_response,
    to_json,
)
from tensorwire_server.rest.routes import Route, route
from tensorwire_server.transport.executor import Compute
from tensorwire_server.transport.gate import Gate
from tensorwire_server.transport.guarded import OFF_LOOP_BYTES
from tensorwire_server.transport.passage import Passage, passage

log = logging.getLogger(__name__)

#: A client's timeout for its call, in seconds (a number); Triton's ``timeout``
#: parameter (microseconds) says the same inside an inference request.
TIMEOUT_HEADER: Final = "x-request-timeout"
#: The most JSON a call other than an inference may send: a registration, an index's
#: {"ready": true}; nothing larger is read.
_SMALL_BODY: Final = 64 << 10


class Endpoints:
    """The REST API's one aiohttp handler, over the protocol's servicer and the gate."""

    def __init__(
        self,
        servicer: InferenceServicer,
        gate: Gate,
        compute: Compute,
        json_bytes: int,
        read_timeout: float,
    ) -> None:
        self.servicer = servicer
        self.gate = gate
        self.compute = compute
        #: Bytes of JSON an inference request may hold beside its binary data.
        self.json_bytes = json_bytes
        #: Seconds a body may pause before it is refused.
        self.read_timeout = read_timeout

    async def __call__(self, request: web.BaseRequest) -> web.StreamResponse:
        found = route(request.path)
        if found is None:
            unrouted = calls.request_id(request.headers.get(REQUEST_ID_KEY, ""))
            return error_response("NOT_FOUND", f"no such endpoint: {request.path[:200]}", unrouted)
        if request.method != found.verb and not (request.method == "HEAD" and found.verb == "GET"):
            response = error_response(
                "INVALID_ARGUMENT",
                f"{request.path[:200]} takes {found.verb}",
                calls.request_id(request.headers.get(REQUEST_ID_KEY, "")),
            )
            response.set_status(405)
            response.headers["Allow"] = found.verb
            return response
        try:
            timeout = _timeout(request.headers.get(TIMEOUT_HEADER))
        except InvalidArgumentError as exc:
            given = calls.request_id(request.headers.get(REQUEST_ID_KEY, ""))
            return error_response(exc.code, exc.message, given)
        headers = ((k.lower(), v) for k, v in request.headers.items())
        with passage(self.gate, found.label, found.grpc_method, headers, timeout) as here:
            request_id = here.call.request_id
            reject = here.reject
            if reject is not None:
                extra = {}
                if reject.pushback_ms is not None:
                    extra[RETRY_AFTER] = str(max(1, round(reject.pushback_ms / 1000)))
                return error_response(reject.code.name, reject.message, request_id, extra)
            try:
                answered = await self._answer(request, found, here)
                # A probe's 503 (not live, not ready) is an answer, as gRPC's is OK.
                here.code = "OK"
                return answered
            except BodyError as exc:
                # Its own status (413, 408, 415); the rest of its body is not read, so
                # the connection cannot carry another request.
                here.code = exc.code
                response = error_response(exc.code, exc.message, request_id)
                response.set_status(exc.status)
                response.force_close()
                return response
            except TensorwireError as exc:
                log.debug("%s: %s %s", found.label, exc.code, exc.message)
                here.code = exc.code
                return error_response(exc.code, exc.message, request_id)
            except ConnectionError:
                # The client went (mid-body or mid-answer): nobody to answer, nothing
                # for the log but the access record.
                here.code = "CANCELLED"
                gone = web.Response(status=499)
                gone.force_close()
                return gone
            except web.HTTPException:
                raise
            except Exception:
                log.exception("%s failed with a server error", found.label)
                here.code = "INTERNAL"
                return error_response(
                    "INTERNAL", f"{found.label}: internal server error", request_id
                )

    async def _answer(
        self, request: web.BaseRequest, found: Route, here: Passage
    ) -> web.StreamResponse:
        request_id = here.call.request_id
        method = found.method
        if method == "ModelInfer":
            return await self._infer(request, found, here)
        # A GET's body is not read (a probe's place in the public budget is not held
        # by a sender trickling a body nobody wants).
        document = (
            _document(await self._body(request, here, _SMALL_BODY))
            if found.verb == "POST" and request.can_read_body
            else {}
        )
        answer = getattr(self, "_" + method)
        if method in OFF_LOOP:
            result = await self.compute.run(answer, found, document)
        else:
            result = answer(found, document)
        if isinstance(result, web.StreamResponse):
            result.headers[REQUEST_ID_KEY] = request_id
            return result
        if result is None:
            return empty_response(request_id)
        return json_response(result, request_id)

    # ------------------------------------------------------------------ inference

    async def _infer(
        self, request: web.BaseRequest, found: Route, here: Passage
    ) -> web.StreamResponse:
        servicer = self.servicer
        limits = servicer.service.limits
        json_length = request.headers.get(HEADER_LENGTH)
        if json_length is None:
            limit = self.json_bytes  # all JSON: refused by its Content-Length alone
        else:
            limit = limits.max_request_bytes + self.json_bytes
            declared = request.content_length
            infer_json.json_within(
                infer_json.header_length(json_length, limit if declared is None else declared),
                self.json_bytes,
            )
        body = await self._body(request, here, limit)
        arguments = (body, json_length, found.model, found.version, limits, self.json_bytes)
        json_size = body.nbytes if json_length is None else int(json_length)
        if json_size >= OFF_LOOP_BYTES:
            # Large JSON takes the loop's time to parse (gRPC parses a large message
            # off the loop too); binary data after it takes none.
            parsed = await asyncio.to_thread(infer_json.parse, *arguments)
        else:
            parsed = infer_json.parse(*arguments)
        call = here.call
        if parsed.timeout is not None:
            call.deadline = min(call.deadline or float("inf"), time.monotonic() + parsed.timeout)
        reply = await servicer.infer_placed(
            parsed.request,
            call.deadline,
            self.compute,
            lambda answer: infer_reply.reply(parsed, answer),
            then_kind=("REST reply", found.model),
        )
        headers = {REQUEST_ID_KEY: here.call.request_id}
        if not reply.binary:
            # JSON alone: one write, headers and body together.
            return web.Response(body=reply.header, headers=headers, content_type=JSON)
        headers[HEADER_LENGTH] = str(len(reply.header))
        content_type = "application/octet-stream"
        response = web.StreamResponse(status=200, headers=headers)
        response.content_type = content_type
        response.content_length = reply.size
        await response.prepare(request)
        await response.write(reply.header)
        for payload in reply.payloads:
            # Written from the result's own buffer, a slice at a time, each drained
            # before the next: the transport holds no more than a slice's copy.
            for start in range(0, payload.nbytes, _SLICE):
                await response.write(payload[start : start + _SLICE])
        await response.write_eof()
        return response

    async def _body(self, request: web.BaseRequest, here: Passage, limit: int) -> memoryview:
        """The request's body within ``limit`` bytes, each pause bounded by
        http_read_timeout and the whole by the call's deadline: a trickling sender
        holds a place in the budgets and a drain waits for it, so not forever."""
        try:
            async with asyncio.timeout_at(here.call.deadline):
                return await read_body(request, limit, self.read_timeout)
        except TimeoutError:
            raise BodyError(
                "the request body had not all arrived by the call's deadline", 408
            ) from None

    # ------------------------------------------------------------------ the rest

    def _ServerLive(self, found: Route, document: dict[str, Any]) -> web.StreamResponse:
        live = self.servicer.ServerLive(pb.ServerLiveRequest()).live
        return web.json_response({"live": live}, status=200 if live else 503, dumps=_dumps)

    def _ServerReady(self, found: Route, document: dict[str, Any]) -> web.StreamResponse:
        ready = self.servicer.ServerReady(pb.ServerReadyRequest()).ready
        return web.json_response({"ready": ready}, status=200 if ready else 503, dumps=_dumps)

    def _ServerMetadata(self, found: Route, document: dict[str, Any]) -> Any:
        return to_json(self.servicer.ServerMetadata(pb.ServerMetadataRequest()))

    def _ModelMetadata(self, found: Route, document: dict[str, Any]) -> Any:
        request = pb.ModelMetadataRequest(name=found.model, version=found.version)
        return to_json(self.servicer.ModelMetadata(request))

    def _ModelReady(self, found: Route, document: dict[str, Any]) -> web.StreamResponse:
        request = pb.ModelReadyRequest(name=found.model, version=found.version)
        ready = self.servicer.ModelReady(request).ready
        return web.json_response(
            {"name": found.model, "ready": ready}, status=200 if ready else 503, dumps=_dumps
        )

    def _ModelConfig(self, found: Route, document: dict[str, Any]) -> Any:
        request = pb.ModelConfigRequest(name=found.model, version=found.version)
        return to_json(self.servicer.ModelConfig(request).config)

    def _ModelStatistics(self, found: Route, document: dict[str, Any]) -> Any:
        request = pb.ModelStatisticsRequest(name=found.model, version=found.version)
        return to_json(self.servicer.ModelStatistics(request))

    def _RepositoryIndex(self, found: Route, document: dict[str, Any]) -> Any:
        ready = _field(document, "ready", bool, False)
        index = self.servicer.RepositoryIndex(pb.RepositoryIndexRequest(ready=ready))
        return [to_json(model) for model in index.models]

    def _RepositoryModelLoad(self, found: Route, document: dict[str, Any]) -> None:
        request = pb.RepositoryModelLoadRequest(model_name=found.model)
        for key in _field(document, "parameters", dict, {}):
            request.parameters[key].bool_param = True  # only the keys are looked at
        self.servicer.RepositoryModelLoad(request)

    def _RepositoryModelUnload(self, found: Route, document: dict[str, Any]) -> None:
        self.servicer.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name=found.model))

    def _SystemSharedMemoryStatus(self, found: Route, document: dict[str, Any]) -> Any:
        request = pb.SystemSharedMemoryStatusRequest(name=found.region)
        regions = self.servicer.SystemSharedMemoryStatus(request).regions
        return [to_json(regions[name]) for name in sorted(regions)]

    def _SystemSharedMemoryRegister(self, found: Route, document: dict[str, Any]) -> None:
        request = pb.SystemSharedMemoryRegisterRequest(
            name=found.region,
            key=_field(document, "key", str, None),
            offset=_size(document, "offset", 0),
            byte_size=_size(document, "byte_size", None),
        )
        self.servicer.SystemSharedMemoryRegister(request)

    def _SystemSharedMemoryUnregister(self, found: Route, document: dict[str, Any]) -> None:
        request = pb.SystemSharedMemoryUnregisterRequest(name=found.region)
        self.servicer.SystemSharedMemoryUnregister(request)

    def _CudaSharedMemoryStatus(self, found: Route, document: dict[str, Any]) -> Any:
        request = pb.CudaSharedMemoryStatusRequest(name=found.region)
        regions = self.servicer.CudaSharedMemoryStatus(request).regions
        return [to_json(regions[name]) for name in sorted(regions)]

    def _CudaSharedMemoryRegister(self, found: Route, document: dict[str, Any]) -> None:
        handle = _field(document, "raw_handle", dict, None)
        encoded = handle.get("b64")
        if not isinstance(encoded, str):
            raise InvalidArgumentError('raw_handle must be {"b64": "<base64 of the handle>"}')
        try:
            raw = base64.b64decode(encoded, validate=True)
        except binascii.Error:
            raise InvalidArgumentError("raw_handle's b64 is not base64") from None
        request = pb.CudaSharedMemoryRegisterRequest(
            name=found.region,
            raw_handle=raw,
            device_id=_size(document, "device_id", 0),
            byte_size=_size(document, "byte_size", None),
        )
        self.servicer.CudaSharedMemoryRegister(request)

    def _CudaSharedMemoryUnregister(self, found: Route, document: dict[str, Any]) -> None:
        request = pb.CudaSharedMemoryUnregisterRequest(name=found.region)
        self.servicer.CudaSharedMemoryUnregister(request)


#: Bytes of a binary output handed to the transport at once.
_SLICE: Final = 4 << 20


def _dumps(value: Any) -> str:
    return orjson.dumps(value).decode()


def _timeout(text: str | None) -> float | None:
    if text is None:
        return None
    try:
        seconds = float(text)
    except ValueError:
        seconds = float("nan")
    if not seconds >= 0 or seconds == float("inf"):
        raise InvalidArgumentError(f"{TIMEOUT_HEADER} {text[:40]!r} is not a number of seconds")
    return seconds


def _document(body: memoryview) -> dict[str, Any]:
    """A small call's JSON object (empty body: {})."""
    if not body.nbytes:
        return {}
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidArgumentError(f"the request's JSON is malformed: {exc}") from None
    if not isinstance(document, dict):
        raise InvalidArgumentError("the request's JSON must be an object")
    return document


def _field(document: dict[str, Any], key: str, kind: type, default: Any) -> Any:
    value = document.get(key, default)
    if (
        value is None
        or not isinstance(value, kind)
        or (kind is not bool and isinstance(value, bool))
    ):
        raise InvalidArgumentError(f"'{key}' must be a {kind.__name__}")
    return value


def _size(document: dict[str, Any], key: str, default: int | None) -> int:
    value = _field(document, key, int, default)
    if not 0 <= value < 2**63:
        raise InvalidArgumentError(f"'{key}' must be a whole number from 0 to 2**63 - 1")
    return int(value)
