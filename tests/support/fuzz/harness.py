"""The fuzz suite's harness: the server under test, and the Fuzzer that sends batches
of requests concurrently and checks every answer."""

from __future__ import annotations

import re
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc

from support.fuzz.service import CALL_TIMEOUT, METHODS, REFUSALS, UNCLAIMED_TICKET, Method
from tensorwire.wire import codec, streaming


@dataclass
class Server:
    proc: Any
    address: str
    log: list[str]

    def rss(self) -> int:
        """The server's resident memory in bytes."""
        with open(f"/proc/{self.proc.pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS")


@dataclass
class Fuzzer:
    """Sends batches of requests concurrently and checks every answer."""

    server: Server
    channel: grpc.Channel
    sent: Counter[str] = field(default_factory=Counter)  # by generator
    malformed: Counter[str] = field(default_factory=Counter)  # of those, known malformed
    codes: Counter[tuple[str, str]] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    slowest: float = 0.0
    baseline: int = 0  # the server's RSS after warming up
    #: Sent with every request: a session, so that session methods are fuzzed too.
    metadata: tuple[tuple[str, str], ...] = ()

    _pending: list[Callable[[], None]] = field(default_factory=list)

    def send(
        self,
        kind: str,
        unary: Sequence[tuple[str, bytes, bool]] = (),
        streams: Sequence[tuple[str, list[bytes], bool]] = (),
    ) -> None:
        """Start every (method, request, known malformed): unary requests as bytes,
        streams as lists of parts; then check the answers to the previous batch, so
        that the server answers one batch while the next is generated."""
        checks: list[Callable[[], None]] = []
        for name, raw, malformed in unary:
            future = self.channel.unary_unary(METHODS[name].path).future(
                raw, timeout=CALL_TIMEOUT, metadata=self.metadata
            )
            checks.append(self._unary_check(kind, name, raw, malformed, future))
        for name, parts, malformed in streams:
            call = self.channel.stream_stream(METHODS[name].path)(
                iter(parts), timeout=CALL_TIMEOUT, metadata=self.metadata
            )
            checks.append(self._stream_check(kind, name, parts, malformed, call))
        self.settle()
        self._pending = checks

    def settle(self) -> None:
        """Check every answer still unchecked."""
        pending, self._pending = self._pending, []
        for check in pending:
            check()

    def _unary_check(
        self, kind: str, name: str, raw: bytes, malformed: bool, future: Any
    ) -> Callable[[], None]:
        began, ended = time.monotonic(), _timer(future)

        def check() -> None:
            try:
                answer = future.result()
                code, details = grpc.StatusCode.OK, ""
            except grpc.RpcError as exc:
                answer, code, details = None, exc.code(), exc.details() or ""
            seconds = min(ended[0], time.monotonic()) - began  # the callback may lag
            self._check(kind, METHODS[name], [raw], malformed, code, details, seconds)
            if code is grpc.StatusCode.OK:
                self._parses(kind, METHODS[name], [raw], lambda: _unary_answer(name, answer))

        return check

    def _stream_check(
        self, kind: str, name: str, parts: list[bytes], malformed: bool, call: Any
    ) -> Callable[[], None]:
        began, ended = time.monotonic(), _timer(call)

        def check() -> None:
            try:
                answer = list(call)
                code, details = grpc.StatusCode.OK, ""
            except grpc.RpcError as exc:
                answer, code, details = [], exc.code(), exc.details() or ""
            seconds = min(ended[0], time.monotonic()) - began
            self._check(kind, METHODS[name], parts, malformed, code, details, seconds)
            if code is grpc.StatusCode.OK:
                self._parses(kind, METHODS[name], parts, lambda: _stream_answer(name, answer))

        return check

    def _check(
        self,
        kind: str,
        method: Method,
        request: Sequence[bytes],
        malformed: bool,
        code: grpc.StatusCode,
        details: str,
        seconds: float,
    ) -> None:
        self.sent[kind] += 1
        self.malformed[kind] += malformed
        self.codes[kind, code.name] += 1
        self.slowest = max(self.slowest, seconds)
        problem = None
        if code is grpc.StatusCode.OK:
            if malformed:
                problem = "a malformed request was answered OK"
        elif code not in REFUSALS and not (
            code is grpc.StatusCode.DEADLINE_EXCEEDED and UNCLAIMED_TICKET in details
        ):
            problem = f"answered {code.name}: {details}"
        elif not details.strip():
            problem = f"answered {code.name} without saying what was wrong"
        elif "metadata" in details:  # gRPC's own limit, not the server's answer
            problem = f"the error was too large to arrive: {code.name}: {details}"
        if problem is None and seconds > CALL_TIMEOUT:
            problem = f"took {seconds:.1f} s"
        if problem is not None:
            self.failures.append(f"{kind} {method.name}: {problem}\n    request {_show(request)}")

    def _parses(
        self, kind: str, method: Method, request: Sequence[bytes], decode: Callable[[], None]
    ) -> None:
        try:
            decode()
        except Exception as exc:
            self.failures.append(
                f"{kind} {method.name}: an OK answer does not parse: {exc!r}\n"
                f"    request {_show(request)}"
            )

    def assert_clean(self, kind: str, at_least: int) -> None:
        """No failures so far, ``at_least`` malformed requests of ``kind`` sent."""
        self.settle()
        assert self.server.proc.poll() is None, (
            f"the server died ({self.server.proc.returncode}):\n" + self.log_tail()
        )
        assert not self.failures, (
            f"{len(self.failures)} bad answers (codes: {dict(self.codes)}); the first:\n"
            + "\n".join(_distinct(self.failures)[:25])
            + "\nserver log:\n"
            + self.log_tail()
        )
        assert self.malformed[kind] >= at_least, (kind, dict(self.sent), dict(self.malformed))

    def log_tail(self) -> str:
        """The server's last log lines but its access log, and every distinct exception
        its tracebacks end in."""
        lines = [line for line in self.server.log if ".access:" not in line]
        raised = {line for line in lines if re.match(r"\w+(Error|Exception)\b", line)}
        return "".join(lines[-60:]) + "exceptions:\n" + "".join(sorted(raised))


def _timer(future: grpc.Future) -> list[float]:
    ended = [float("inf")]
    future.add_done_callback(lambda _: ended.__setitem__(0, time.monotonic()))
    return ended


def _unary_answer(name: str, raw: bytes) -> None:
    received = codec.receive(METHODS[name].response, raw)
    for where, tensor in codec.tensors_in(received.message):
        received.array(tensor, where)


def _stream_answer(name: str, parts: list[bytes]) -> None:
    receiver = streaming.StreamReceiver(METHODS[name].response)
    for raw in parts:
        receiver.feed(raw)
    received = receiver.finish()
    for where, tensor in codec.tensors_in(received.message):
        received.array(tensor, where)


def _show(request: Sequence[bytes]) -> str:
    shown = [raw[:160] + (b"..." if len(raw) > 160 else b"") for raw in request[:4]]
    sizes = [len(raw) for raw in request]
    return f"{shown!r} (part sizes {sizes[:12]})"


def _distinct(failures: list[str]) -> list[str]:
    """One failure per kind of fault: numbers and quoted names do not tell faults apart."""
    seen: dict[str, str] = {}
    for failure in failures:
        head = re.sub(r"\d+|'[^']*'", "#", failure.splitlines()[0])
        seen.setdefault(head, failure)
    return list(seen.values())
