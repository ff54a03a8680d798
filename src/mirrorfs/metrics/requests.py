"""Per-operation FUSE request counts and latency histograms, cheap enough for every request.

A timed request costs one ``perf_counter_ns`` pair, a table look-up of the bucket by the bit
length of the duration, and two integer additions, inside the guard every handler has anyway
(``fs/operations.py``); prometheus-client's ``Counter``/``Histogram`` never run on the request
path. The collector turns the integers into metric families only when Prometheus scrapes. The
counters are written and snapshotted on the mount's trio thread only, so they need no lock.

The buckets are powers of two nanoseconds (8.192 µs, 16.384 µs, ... 8.59 s): the bucket of a
duration is its bit length, with no search. Latency is the time mirrorfs's handler took (from
the call to the reply), not the kernel's round trip.
"""

from __future__ import annotations

import dataclasses

#: The smallest and largest bucket bounds, as powers of two nanoseconds: requests take from a few
#: microseconds (served inline) to seconds (a write waiting for a pivot or a slow source).
FIRST_BOUND_BITS = 13
LAST_BOUND_BITS = 33
BOUNDS_NS = tuple(1 << bits for bits in range(FIRST_BOUND_BITS, LAST_BOUND_BITS + 1))
#: The same in seconds, as the histogram's ``le`` labels.
BUCKET_BOUNDS = tuple(ns / 1e9 for ns in BOUNDS_NS)
#: ``SLOT_OF[(ns - 1).bit_length()]``: the bucket of a duration of ``ns`` nanoseconds (the first
#: bound >= ns; ``len(BOUNDS_NS)`` for longer than every bound).
SLOT_OF = tuple(min(max(0, bits - FIRST_BOUND_BITS), len(BOUNDS_NS)) for bits in range(65))


@dataclasses.dataclass(frozen=True)
class Timing:
    """Where the guard of one operation adds its requests: ``buckets[SLOT_OF[...]] += 1`` and
    ``total[0] += ns``."""

    buckets: list[int]
    total: list[int]


@dataclasses.dataclass(frozen=True)
class OperationSnapshot:
    """One operation's histogram: ``buckets[i]`` requests took at most ``BUCKET_BOUNDS[i]`` but
    more than the bound before; the last entry counts those slower than every bound."""

    buckets: tuple[int, ...]
    sum_ns: int

    @property
    def count(self) -> int:
        return sum(self.buckets)


class RequestStats:
    """The request histograms of one mount, per FUSE operation."""

    bounds = BUCKET_BOUNDS

    def __init__(self) -> None:
        self._ops: dict[str, Timing] = {}

    def timing(self, name: str) -> Timing:
        """The counters of operation ``name`` (created at 0, listed from now on)."""
        timing = self._ops.get(name)
        if timing is None:
            timing = self._ops[name] = Timing([0] * (len(BOUNDS_NS) + 1), [0])
        return timing

    def snapshot(self) -> dict[str, OperationSnapshot]:
        """A copy of every operation's histogram (call on the thread that serves the requests)."""
        return {name: OperationSnapshot(tuple(t.buckets), t.total[0]) for name, t in self._ops.items()}
