"""Per-operation FUSE request counts and latency histograms, cheap enough for every request.

A timed request costs one ``perf_counter_ns`` pair, one ``bisect`` over the bucket bounds and two
integer additions; prometheus-client's ``Counter``/``Histogram`` (a lock and float arithmetic per
call) never run on the request path. The collector turns the integers into metric families only
when Prometheus scrapes. The counters are written and snapshotted on the mount's trio thread only,
so they need no lock.

Latency is the time mirrorfs's handler took (from the call to the reply), not the kernel's round
trip.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import time
from typing import Any, Awaitable, Callable

Handler = Callable[..., Awaitable[Any]]

#: Upper bounds (seconds) of the latency buckets: requests take from a few microseconds (served
#: inline) to seconds (a write waiting for a pivot or a slow source).
BUCKET_BOUNDS = (0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005,
                 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclasses.dataclass(frozen=True)
class OperationSnapshot:
    """One operation's histogram: ``buckets[i]`` requests took at most ``bounds[i]`` but more than
    ``bounds[i-1]``; the last entry counts those slower than every bound."""

    buckets: tuple[int, ...]
    sum_ns: int

    @property
    def count(self) -> int:
        return sum(self.buckets)


class RequestStats:
    """Counts and times every request of one mount, per FUSE operation.

    Args:
        bounds: the bucket upper bounds in seconds, increasing.
    """

    def __init__(self, bounds: tuple[float, ...] = BUCKET_BOUNDS) -> None:
        self.bounds = tuple(bounds)
        self._bounds_ns = [round(b * 1e9) for b in self.bounds]
        #: operation -> (bucket counts, [sum of durations in ns])
        self._ops: dict[str, tuple[list[int], list[int]]] = {}

    def timed(self, name: str, handler: Handler) -> Handler:
        """``handler`` (a bound request handler), counted and timed under ``name``."""
        buckets = [0] * (len(self._bounds_ns) + 1)
        total = [0]
        self._ops[name] = (buckets, total)
        bounds_ns = self._bounds_ns
        clock = time.perf_counter_ns
        slot = bisect.bisect_left

        @functools.wraps(handler)
        async def timed_handler(*args: Any) -> Any:
            start = clock()
            try:
                return await handler(*args)
            finally:
                elapsed = clock() - start
                buckets[slot(bounds_ns, elapsed)] += 1
                total[0] += elapsed

        return timed_handler

    def snapshot(self) -> dict[str, OperationSnapshot]:
        """A copy of every operation's histogram (call on the thread that serves the requests)."""
        return {name: OperationSnapshot(tuple(buckets), total[0])
                for name, (buckets, total) in self._ops.items()}
