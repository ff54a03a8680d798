"""Tracking of the operations in flight on one image, to serialise guest writes with the copy.

The race this prevents (see ``docs/write-copy-race.md``): the copy task reads cluster C from the
source, a guest write changes C on the source and duplicates it to the target, then the copy's
older bytes land on the target. If either side then cleared C's bit, the bitmap would call a
stale cluster clean.

The rule: every operation that may write the target (a guest write with its duplicate, a copy of a
range) registers its cluster range for its whole lifetime, from before it touches the source until
its target write has completed. When two registered operations overlap in clusters, both are
marked *conflicted*. A conflicted operation never clears bits: its clusters stay dirty and the copy
task copies them again later, when nothing overlaps. Bits are set before the source write, so
"stays dirty" is always safe; only clearing needs proof, and an operation that ran alone has it:
nothing else touched its clusters between its source access and its target write. The same
proof holds cluster by cluster: a conflicted copy records the shared clusters (``spans``) and
still clears the rest of its range, which no other operation touched while it ran.

A verify (``verify.py``) reads both sides of clean clusters and must know whether anything
touched them meanwhile. It *watches* a range instead of registering: a watcher is conflicted
(with ``spans``) by every operation in flight when it starts and every one registered until it
ends, but it conflicts nothing itself, since it writes nothing. While one is watched the registry
is not empty, so even the inline write registers (``writes.py``) and cannot pass unseen.

This is cheap: the registry holds at most a few dozen operations (bounded by buf-size and the
FUSE request concurrency), so a linear scan per registration costs less than a dict of clusters.
"""

from __future__ import annotations

import trio


class Operation:
    """One registered operation over clusters [first, last] (inclusive)."""

    __slots__ = ("first", "last", "conflicted", "is_copy", "spans")

    def __init__(self, first: int, last: int, is_copy: bool) -> None:
        self.first = first
        self.last = last
        self.conflicted = False
        self.is_copy = is_copy
        #: the clusters [lo, hi] shared with overlapping operations: only these lost the proof
        self.spans: list[tuple[int, int]] = []


def _seen_by(watcher: Operation, first: int, last: int) -> None:
    """Record an operation on clusters [first, last] in ``watcher``, where they overlap."""
    if watcher.first <= last and first <= watcher.last:
        watcher.conflicted = True
        watcher.spans.append((max(first, watcher.first), min(last, watcher.last)))


class InflightOps:
    """The registry of operations in flight on one image."""

    def __init__(self, granularity: int) -> None:
        self._shift = granularity.bit_length() - 1
        self._ops: list[Operation] = []
        self._watchers: list[Operation] = []
        self._idle = trio.Event()
        self._idle.set()

    def register(self, offset: int, length: int, *, is_copy: bool = False) -> Operation:
        """Register an operation covering [offset, offset+length) and mark conflicts."""
        first = offset >> self._shift
        last = (offset + max(length, 1) - 1) >> self._shift
        op = Operation(first, last, is_copy)
        for other in self._ops:
            if other.first <= last and first <= other.last:
                other.conflicted = True
                op.conflicted = True
                span = (max(first, other.first), min(last, other.last))
                other.spans.append(span)
                op.spans.append(span)
        for watcher in self._watchers:
            _seen_by(watcher, first, last)
        self._ops.append(op)
        if self._idle.is_set():
            self._idle = trio.Event()
        return op

    def unregister(self, op: Operation) -> None:
        self._ops.remove(op)
        if not self._ops:
            self._idle.set()

    def discard(self, op: Operation) -> None:
        """Unregister ``op`` if it still is (after an unexpected error part way through its end)."""
        if op in self._ops:
            self.unregister(op)

    def watch(self, offset: int, length: int) -> Operation:
        """Watch the clusters of [offset, offset+length) until ``unwatch``: the watcher's
        ``spans`` collect the clusters that operations in flight now or registered later touch
        (a watcher is neither waited for, nor seen by ``overlaps``)."""
        watcher = Operation(offset >> self._shift, (offset + max(length, 1) - 1) >> self._shift, False)
        for other in self._ops:
            _seen_by(watcher, other.first, other.last)
        self._watchers.append(watcher)
        return watcher

    def unwatch(self, watcher: Operation) -> None:
        self._watchers.remove(watcher)

    def overlaps(self, offset: int, length: int) -> bool:
        """True when an operation in flight touches the clusters of [offset, offset+length)."""
        first = offset >> self._shift
        last = (offset + max(length, 1) - 1) >> self._shift
        return any(o.first <= last and first <= o.last for o in self._ops)

    def lone_guest_writes(self) -> list[tuple[int, int]]:
        """Cluster ranges [first, last] of guest writes in flight that no other operation
        overlapped: each will clear its clusters when its duplicate lands."""
        return [(o.first, o.last) for o in self._ops if not o.is_copy and not o.conflicted]

    def guest_writes(self) -> list[tuple[int, int]]:
        """Cluster ranges [first, last] of every guest write in flight."""
        return [(o.first, o.last) for o in self._ops if not o.is_copy]

    def __len__(self) -> int:
        """Operations in flight, and watchers: nonzero makes every write register."""
        return len(self._ops) + len(self._watchers)

    async def wait_idle(self) -> None:
        """Wait until no operation is in flight."""
        while self._ops:
            await self._idle.wait()
