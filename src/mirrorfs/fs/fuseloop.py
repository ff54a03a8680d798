"""Cheaper waiting in pyfuse3's request loop: fewer scheduler passes, and adaptive polling.

pyfuse3's ``_session_loop`` (``internal.pxi``) serves one request per round: it takes a
``trio.Lock`` (a checkpoint even when nobody else holds it), then ``trio.lowlevel.wait_readable``
on the FUSE device (an ``epoll_ctl`` and a scheduler pass, even when a request is already
queued), then reads and dispatches. Each of those steps costs about as much as mirrorfs's whole
write handler (figures in docs/performance.md), so on a fast source they, not the handler, bound
the request rate. And when the loop sleeps between two requests of a synchronous writer, waking
it costs more than serving the request: an idle vCPU halts and needs an interrupt to run again.

pyfuse3 has no hook for this, but looks ``trio`` up in its module globals at run time, so
``install()`` gives pyfuse3 alone a ``trio`` namespace in which two names differ:

- ``Lock`` is a lock that is taken without a checkpoint when free and handed straight to the next
  waiter on release. In pyfuse3's loop it is always followed by ``wait_readable``, the
  checkpoint that lets other tasks run.
- ``lowlevel.wait_readable`` asks ``poll(2)`` (no timeout) whether a request is already queued
  and returns at once if so. If not, it keeps asking for up to a polling window before it
  sleeps in trio, so that the next request of a writer waiting for the last reply is picked up
  without a wake-up. The window adapts as QEMU's event loop does for its IOThreads
  (``poll-max-ns``, ``util/aio-posix.c``): it doubles (from 4 us, up to ``poll_max_ns``) while the
  requests that made the loop sleep came within ``poll_max_ns``, and drops to nothing when one
  did not, so an idle mount does not spin.

  Fairness: the loop goes through trio's scheduler at least every ``YIELD_INTERVAL``, so the copy
  task, the control files and the QMP socket still run under a flood of requests, and a handler
  that awaits (I/O in a worker thread) lets the other requests in as before.

Everything else pyfuse3 asks of ``trio`` is trio's own. ``uninstall()`` restores it.
"""

from __future__ import annotations

import select
import time
import types
from typing import Any

import trio

from .. import aio

#: Longest time pyfuse3's loop may serve queued requests without a scheduler pass (seconds).
YIELD_INTERVAL = 0.001
#: Default largest polling window: QEMU's default ``poll-max-ns`` for IOThreads.
DEFAULT_POLL_MAX_NS = 32768
#: The first window once polling would have paid (QEMU starts at 4 us too).
POLL_START_NS = 4000


class HandoffLock:
    """A ``trio.Lock`` for pyfuse3's read lock: no checkpoint when free; FIFO handoff."""

    def __init__(self) -> None:
        self._locked = False
        self._waiters = trio.lowlevel.ParkingLot()

    async def __aenter__(self) -> None:
        if not self._locked:
            self._locked = True
            return
        # Woken by __aexit__, which leaves the lock held for us; a cancelled waiter leaves the lot.
        await self._waiters.park()

    async def __aexit__(self, *exc_info: Any) -> None:
        if self._waiters:
            self._waiters.unpark()
        else:
            self._locked = False

    def locked(self) -> bool:
        return self._locked


class PollingWaiter:
    """``wait_readable`` with a fast path for queued data and an adaptive polling window.

    Args:
        poll_max_ns: the largest polling window; 0 never polls beyond one look.
    """

    def __init__(self, poll_max_ns: int = DEFAULT_POLL_MAX_NS) -> None:
        self.poll_max = poll_max_ns / 1e9
        #: the current polling window (seconds)
        self.window = 0.0
        self._pollers: dict[Any, select.poll] = {}
        self._last_yield = time.monotonic()
        self._aio: aio.AioContext | None = None

    def _poller(self, fd: Any) -> select.poll:
        poller = self._pollers.get(fd)
        if poller is None:
            poller = self._pollers[fd] = select.poll()
            poller.register(fd, select.POLLIN)
        return poller

    async def wait_readable(self, fd: Any) -> None:
        start = time.monotonic()
        ring = self._aio
        if start - self._last_yield < YIELD_INTERVAL and (ring is None or not ring.completed()):
            # No checkpoint on these returns: the wait through trio below comes within
            # YIELD_INTERVAL and delivers any cancellation. Completed AIO requests (O_DIRECT
            # I/O) end the fast path: the task that delivers them, and the handlers waiting
            # for them, only run in a scheduler pass.
            poller = self._poller(fd)
            if poller.poll(0):
                return
            if self.window:
                deadline = start + self.window
                while time.monotonic() < deadline:
                    if poller.poll(0):
                        return
                    if ring is not None and ring.completed():
                        break
        await trio.lowlevel.wait_readable(fd)
        # Looked up here, at most every YIELD_INTERVAL (a RunVar costs a microsecond, as much
        # as a tenth of a request): the run's AIO context appears with its first O_DIRECT request.
        self._aio = aio.current()
        self._last_yield = woke = time.monotonic()
        self.adapt(woke - start)

    def adapt(self, waited: float) -> None:
        """Size the next window after a sleep of ``waited`` seconds."""
        if waited <= self.poll_max:
            # Polling a little longer would have caught this request without a sleep.
            self.window = min(self.poll_max, max(POLL_START_NS / 1e9, self.window * 2))
        else:
            self.window = 0.0


class _Lowlevel(types.SimpleNamespace):
    """``trio.lowlevel`` but for ``wait_readable``."""

    def __init__(self, waiter: PollingWaiter) -> None:
        super().__init__(wait_readable=waiter.wait_readable)

    def __getattr__(self, name: str) -> Any:
        return getattr(trio.lowlevel, name)


class _TrioForPyfuse3(types.ModuleType):
    """The ``trio`` pyfuse3 sees: trio itself but for ``Lock`` and ``lowlevel.wait_readable``."""

    def __init__(self, waiter: PollingWaiter) -> None:
        super().__init__("trio")
        self.Lock = HandoffLock
        self.lowlevel = _Lowlevel(waiter)

    def __getattr__(self, name: str) -> Any:
        return getattr(trio, name)


def install(poll_max_ns: int = DEFAULT_POLL_MAX_NS) -> PollingWaiter:
    """Give pyfuse3 the cheaper primitives; call before ``pyfuse3.main()``.

    Returns:
        the waiter (its ``window`` shows the polling state).
    """
    import pyfuse3

    waiter = PollingWaiter(poll_max_ns)
    pyfuse3.__dict__["trio"] = _TrioForPyfuse3(waiter)
    return waiter


def uninstall() -> None:
    """Give pyfuse3 trio itself again."""
    import pyfuse3

    pyfuse3.__dict__["trio"] = trio
