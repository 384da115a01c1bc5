"""What the tensorwire command shows people: the progress bar, a server's
description and the model statistics table."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Final, TextIO

from tensorwire.types import ModelInfo, Progress, ServerInfo, TensorSpec, VersionStatistics

_UNITS: Final = ("B", "KiB", "MiB", "GiB", "TiB")


# ---------------------------------------------------------------------- progress


def _scale(nbytes: float) -> tuple[float, str]:
    """The divisor and binary unit that show ``nbytes`` with 1-4 integer digits."""
    divisor = 1.0
    for unit in _UNITS[:-1]:
        if nbytes < 1024 * divisor:
            return divisor, unit
        divisor *= 1024
    return divisor, _UNITS[-1]


def format_bytes(nbytes: float) -> str:
    """``nbytes`` in B, KiB, MiB, GiB or TiB: "512 B", "1.50 GiB"."""
    divisor, unit = _scale(nbytes)
    return f"{nbytes:.0f} B" if unit == "B" else f"{nbytes / divisor:.2f} {unit}"


class ProgressBar:
    """A progress callback drawing one line per stage on ``stream``, redrawn with "\\r".

    Draws at most once per ``interval`` seconds of ``clock``, but always the start
    and the end (100%) of each stage; ``close`` ends a line a failed call left open.
    A stage that starts again from 0 (a retried upload) gets a new line.
    """

    WIDTH: Final = 24

    def __init__(
        self,
        stream: TextIO,
        *,
        clock: Callable[[], float] = time.monotonic,
        interval: float = 0.1,
    ) -> None:
        self.stream = stream
        self.clock = clock
        self.interval = interval
        self._stage: str | None = None
        self._started = 0.0
        self._drawn_at = 0.0
        self._finished = False
        self._done = 0  # bytes of the last report, to tell a restarted stage
        self._width = 0  # of the last line drawn, to blank what a shorter one leaves

    def __call__(self, progress: Progress) -> None:
        now = self.clock()
        again = progress.done == 0 and self._done > 0
        self._done = progress.done
        if progress.stage != self._stage or again:
            self.close()
            self._stage, self._started, self._finished = progress.stage, now, False
        elif self._finished:
            return  # a stream may report its last chunk twice: 100% is drawn once
        else:
            complete = progress.done >= progress.total
            if not complete and now - self._drawn_at < self.interval:
                return
        self._draw(progress, now)
        if progress.done >= progress.total:
            self._finished = True
            self.close()

    def close(self) -> None:
        """End the current line, if one is drawn."""
        if self._width:
            self.stream.write("\n")
            self.stream.flush()
            self._width = 0

    def _draw(self, progress: Progress, now: float) -> None:
        fraction = min(max(progress.fraction, 0.0), 1.0)
        filled = int(fraction * self.WIDTH)
        divisor, unit = _scale(progress.total)
        if unit == "B":
            amount = f"{progress.done}/{progress.total} B"
        else:
            amount = f"{progress.done / divisor:.2f}/{progress.total / divisor:.2f} {unit}"
        line = (
            f"{progress.stage:<8} [{'#' * filled}{'-' * (self.WIDTH - filled)}] "
            f"{int(fraction * 100):3d}%  {amount}"
        )
        elapsed = now - self._started
        # A unary call reports its start and end together: no meaningful rate then.
        if elapsed >= self.interval and progress.done:
            line += f"  {format_bytes(progress.done / elapsed)}/s"
        self.stream.write("\r" + line.ljust(self._width))
        self.stream.flush()
        self._width = len(line)
        self._drawn_at = now


# ---------------------------------------------------------------------- info


def format_spec(spec: TensorSpec) -> str:
    """A model input or output as text: "input: float32[?, 16]"."""
    dtype = spec.dtype or "any"
    if spec.shape is None:
        return f"{spec.name}: {dtype}"
    dims = ", ".join("?" if d < 0 else str(d) for d in spec.shape)
    return f"{spec.name}: {dtype}[{dims}]"


def _signature(model: ModelInfo) -> str:
    inputs = ", ".join(format_spec(s) for s in model.inputs)
    if model.variadic:
        inputs = ", ".join(filter(None, (inputs, "**named")))
    outputs = ", ".join(format_spec(s) for s in model.outputs) or "?"
    return f"({inputs}) -> ({outputs})"


def _seconds(seconds: float) -> str:
    """A short duration: "0.5 ms", "12 ms", "1.5 s"."""
    if seconds >= 1:
        return f"{seconds:g} s"
    return f"{seconds * 1000:.3g} ms"


def _runs(model: ModelInfo) -> str:
    """How the newest version runs, when not eagerly (and what compiling it took)."""
    if model.execution in ("", "eager"):
        return ""
    if model.execution != "compiled":
        return f", runs {model.execution}"
    return (
        f", runs compiled ({model.compiled_graphs} graphs in warm-up, "
        f"{model.recompilations} recompiled since)"
    )


def _serving(model: ModelInfo) -> str:
    """How ``model`` serves, in one line: state, versions, batching, devices."""
    ready = [str(v.version) for v in model.versions if v.state == "READY"]
    failed = [str(v.version) for v in model.versions if v.state != "READY"]
    parts = [model.state]
    if ready:
        parts.append(f"version{'s' if len(ready) > 1 else ''} {', '.join(ready)}")
    if failed:
        parts.append(f"failed version{'s' if len(failed) > 1 else ''} {', '.join(failed)}")
    if model.max_batch_size:
        batching = f"batch <= {model.max_batch_size}"
        dynamic = model.dynamic_batching
        if dynamic is not None:
            batching += f", dynamic (delay {_seconds(dynamic.max_queue_delay)}"
            if dynamic.preferred_batch_sizes:
                batching += f", preferred {'/'.join(map(str, dynamic.preferred_batch_sizes))}"
            batching += ")"
        parts.append(batching)
    if model.instances:
        parts.append("on " + ", ".join(model.instances))
    if model.precision and model.precision != "float32":  # float32: as loaded
        parts.append(f"autocast {model.precision}")
    return "; ".join(parts)


def format_info(info: ServerInfo, target: str) -> str:
    """A server's description as text for people."""
    device = info.device
    memory = ""
    if device.total_memory_bytes:
        memory = (
            f", {format_bytes(device.free_memory_bytes)} free"
            f" of {format_bytes(device.total_memory_bytes)}"
        )
    lines = [
        f"server:    {target}, tensorwire {info.server_version}, torch {info.torch_version}",
        f"device:    {device.name} ({device.description}){memory}",
        f"models:    {len(info.models)}",
    ]
    for name in sorted(info.models):
        model = info.models[name]
        params = f", {model.parameter_count:,} parameters" if model.parameter_count else ""
        lines.append(f"  {name} {_signature(model)}")
        kind = f"{model.kind or 'not loaded'}{_runs(model)}{params}"
        lines.append(f"      {kind}: {model.description}")
        lines.append(f"      {_serving(model)}")
        if model.reason:
            lines.append(f"      reason: {model.reason}")
    lines.append(f"functions: {len(info.functions)} (tensorwire info --json lists them)")
    return "\n".join(lines)


# ---------------------------------------------------------------------- stats

#: The columns of the stats table: header and cell of a version's statistics.
_STATS_COLUMNS: Final[tuple[tuple[str, Callable[[VersionStatistics], str]], ...]] = (
    ("model", lambda s: s.model),
    ("version", lambda s: str(s.version)),
    ("requests", lambda s: str(s.requests)),
    ("failures", lambda s: str(s.failures)),
    ("inferences", lambda s: str(s.inferences)),
    ("executions", lambda s: str(s.executions)),
    # Mean wait per request answered, and mean time per forward pass.
    (
        "mean queue ms",
        lambda s: f"{1000 * s.queue_seconds / s.requests:.3f}" if s.requests else "-",
    ),
    (
        "mean compute ms",
        lambda s: f"{1000 * s.compute_seconds / s.executions:.3f}" if s.executions else "-",
    ),
    (
        "batch sizes (rows:passes)",
        lambda s: " ".join(f"{rows}:{n}" for rows, n in sorted(s.batch_sizes.items())) or "-",
    ),
)
#: Columns aligned left; the others are numbers, aligned right.
_TEXT_COLUMNS: Final = frozenset({"model", "batch sizes (rows:passes)"})


def format_statistics(statistics: Sequence[VersionStatistics]) -> str:
    """Model statistics as a table for people, one row per version: counts, the mean
    queue wait per request and compute time per forward pass in milliseconds, and
    how many forward passes ran with each batch size. Rejected (queue full) and
    expired (deadline passed in the queue) requests, counted among the failures, are
    noted under the table when there were any."""
    if not statistics:
        return "no model versions serving"
    rows = [[cell(s) for _, cell in _STATS_COLUMNS] for s in statistics]
    headers = [header for header, _ in _STATS_COLUMNS]
    widths = [max(len(r[i]) for r in [headers, *rows]) for i in range(len(headers))]

    def line(cells: Sequence[str]) -> str:
        aligned = (
            c.ljust(w) if h in _TEXT_COLUMNS else c.rjust(w)
            for h, c, w in zip(headers, cells, widths, strict=True)
        )
        return "  ".join(aligned).rstrip()

    lines = [line(headers), *(line(r) for r in rows)]
    for s in statistics:
        if s.rejected or s.expired:
            lines.append(
                f"{s.model} version {s.version}: {s.rejected} rejected (queue full), "
                f"{s.expired} expired (deadline passed in the queue)"
            )
    return "\n".join(lines)
