"""Freed memory back to the operating system once the server goes idle.

glibc keeps memory that requests freed in its heaps for reuse, so a server's resident
size after a burst of large requests stays near the burst's peak, and moves up and down
by tens of MiB with the order things happened to be freed in. Once no request has run
for a moment, ``malloc_trim`` gives the free pages back: resident memory then shows
what the server holds (models, sessions, caches), which is what operators watch and
what a leak would grow. Nothing is trimmed while requests run: it would only cost them.
Caches that keep memory for the next request (``release``) are emptied first.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any, Final

log = logging.getLogger(__name__)

#: Seconds without a request before the heap is trimmed.
IDLE_SECONDS: Final = 0.5


def _malloc_trim() -> Callable[[int], Any] | None:
    """glibc's malloc_trim, or None where the C library has none (musl, macOS)."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        return getattr(ctypes.CDLL(name), "malloc_trim", None)
    except OSError:
        return None


class HeapTrimmer:
    """Trims the heap each time the server has been idle for ``idle_seconds``: told of
    every request's start (``busy``) and of the moments none runs (``idle``). Each of
    ``release`` runs first, to let go of memory kept for reuse."""

    def __init__(
        self,
        idle_seconds: float = IDLE_SECONDS,
        trim: Callable[[int], Any] | None = None,
        release: Sequence[Callable[[], object]] = (),
    ) -> None:
        self.idle_seconds = idle_seconds
        self.release = tuple(release)
        #: What trims: glibc's malloc_trim unless given (None where there is none).
        self._trim = trim or _malloc_trim()
        # Busy and idle take the plain lock: a Condition's own ``with`` is Python code.
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._running = 0
        self._generation = 0  # requests started so far: a new one means "not idle"
        self._trimmed_at = 0  # the generation last trimmed after (none ran yet)
        self._stopped = False
        self._waiting = False  # the watcher waits for requests to end (no timeout)
        self._thread: threading.Thread | None = None
        if self._trim is not None:
            self._thread = threading.Thread(target=self._watch, name="tensorwire-heap", daemon=True)
            self._thread.start()

    def busy(self) -> None:
        """A request started."""
        with self._lock:
            self._running += 1
            self._generation += 1

    def idle(self) -> None:
        """A request ended. The watcher is woken only when it waits for this (not
        when it already times a quiet moment, which it checks when that ends): a
        server answering one call after another would otherwise wake it for each, a
        thread switch on every small call's way."""
        with self._lock:
            self._running -= 1
            if not self._running and self._waiting:
                self._changed.notify_all()

    def trim(self) -> None:
        """Give free heap pages back to the system now (a blocking call: run it on a
        thread), without the idle wait; nothing where there is no malloc_trim."""
        if self._trim is not None:
            self._trim(0)

    def stop(self) -> None:
        """Stop watching."""
        with self._changed:
            self._stopped = True
            self._changed.notify_all()
        if self._thread is not None:
            self._thread.join()

    def _watch(self) -> None:
        assert self._trim is not None
        with self._changed:
            while not self._stopped:
                # Wait for a quiet moment after requests ran since the last trim.
                if self._generation == self._trimmed_at:
                    self._waiting = True  # until a request ends (``idle`` wakes it)
                    self._changed.wait()
                    self._waiting = False
                    continue
                if self._running:
                    # Look again in a while, not at the next request's end: with calls
                    # back to back there is always one running when this thread gets
                    # the GIL, and it would be woken at the end of every call.
                    self._changed.wait(self.idle_seconds)
                    continue
                generation = self._generation
                self._changed.wait(self.idle_seconds)
                if self._stopped or self._running or self._generation != generation:
                    continue  # not idle for long enough: look again
                self._trimmed_at = generation
                self._changed.release()
                try:
                    for release in self.release:
                        release()
                    self._trim(0)
                except Exception:  # pragma: no cover - a libc that refuses: stop trying
                    log.exception("malloc_trim failed; the heap is no longer trimmed")
                    return
                finally:
                    self._changed.acquire()
