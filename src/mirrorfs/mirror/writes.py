"""The job's write interception: every guest write of a mirrored image, and its duplicate.

A mixin of ``MirrorJob`` (it uses the job's bitmap, in-flight registry, target and copy task):
split out so that the write path reads on its own, without a call level per request. The rules
it keeps are in ``docs/write-copy-race.md``; why the inline write may skip registering, in rule 1.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, AbstractSet

import trio

from .. import fileio
from ..errors import TargetError
from .core import JobCore
from .gate import ActivityCounter
from .inflight import Operation
from .journaling import WindowEntry
from .seams import Handle



log = logging.getLogger("mirrorfs.mirror.job")

#: Background duplicates in flight at most. On a slow link a byte bound alone lets thousands of
#: small duplicates queue up; each holds its clusters busy, so the copy task would skip them and
#: overlapping duplicates would keep them dirty. Past this, writes stay dirty for the copy task.
MAX_BACKGROUND_DUPLICATES = 16
#: The edge clusters of a write that ``_duplicated`` need not clear.
_NO_EDGES: frozenset[int] = frozenset()


class WritePath(JobCore):
    """Guest writes of a ``MirrorJob``: register, mark, write the source, duplicate, clear.

    The class it is mixed into provides what is declared here (``MirrorJob.__init__`` sets the
    attributes; ``FailureHandling`` and the job provide the methods).
    """

    # -- its own part of the job's state, besides JobCore's; it reads both (and, for ``size`` and ``_dup_bytes``, changes)
    _dup_bytes: int
    _duplicates: ActivityCounter
    _grow_lock: trio.Lock


    if TYPE_CHECKING:  # from FailureHandling and Journaling: real stubs here would shadow them
        def on_target_error(self, exc: TargetError) -> str | None: ...
        def contain(self, exc: Exception, where: str) -> None: ...
        def _fail(self, message: str) -> None: ...
        def _enter_resync(self, reason: str) -> None: ...
        def _journal_write(self, offset: int, data: bytes) -> None: ...
        def _window_add(self, offset: int, data: bytes) -> WindowEntry | None: ...
        def _window_landed(self, entry: WindowEntry) -> None: ...

    def _duplicating(self) -> bool:
        return self.target_ok and not self.paused and self.error is None

    def _begin_write(self, offset: int, length: int) -> tuple[Operation, set[int]]:
        """Register a guest write of [offset, offset+length) and mark its clusters dirty.

        Returns:
            the operation, and the partially covered edge clusters that are clean now: these
            stay clean once the duplicate lands (the rest of such a cluster is untouched, so
            source and target still agree on it). Whole clusters are cleared by ``clear`` itself;
            so is a partial last cluster of the image.
        """
        bitmap = self.bitmap
        g = self.params.granularity
        shift = g.bit_length() - 1
        end = offset + length
        edges = set()
        if offset & (g - 1) and not bitmap.is_dirty(offset & ~(g - 1), 1):
            edges.add(offset >> shift)
        if end & (g - 1) and end < self.size and not bitmap.is_dirty(end & ~(g - 1), 1):
            edges.add((end - 1) >> shift)
        op = self.inflight.register(offset, length)
        try:
            bitmap.mark(offset, length)
        except BaseException:
            self.inflight.unregister(op)
            raise
        return op, edges

    def _abandon(self, op: Operation | None, offset: int = 0, length: int = 0, *,
                 missed: bytes | None = None) -> None:
        """End a guest write that will not clear its clusters (no duplicate, or it failed).

        ``op`` None: an unregistered inline write (``_write_inline``), whose clusters are
        marked only now. ``missed``: the bytes at ``offset`` that reached the source but not
        the target; while the replica is journaled they go to the journal, in the order the
        guest's writes are acknowledged (this runs before the acknowledgement)."""
        if op is None:
            self.bitmap.mark(offset, length)
        else:
            self.inflight.unregister(op)
        if missed is not None and self.replica.journaled:
            self._journal_write(offset, missed)
        if self.behind_since is None:  # the recovery point: this write is not on the target
            self.behind_since = time.time_ns()
        self.copy.dirtied()

    def _duplicated(self, op: Operation | None, offset: int, length: int,
                    edges: AbstractSet[int]) -> None:
        """The guest's bytes reached the target: clear what is now known identical."""
        self.stats["duplicated-bytes"] += length
        if op is not None and op.conflicted:
            self.stats["conflicts"] += 1
            self.copy.dirtied()
        else:
            self.bitmap.clear(offset, length)
            g = self.params.granularity
            for cluster in edges:  # the image's partial last cluster ends at the image's end
                self.bitmap.clear(cluster * g, min(g, self.size - cluster * g))
            if not self.ready and self.bitmap.count() == 0:
                # A steady writer keeps a duplicate in flight most of the time: the moment the
                # last one lands and nothing is dirty is when the job can become ready.
                self.copy.dirtied()
        if op is not None:
            self.inflight.unregister(op)

    def _write_inline(self, handle: Handle, offset: int, data: bytes) -> int | None:
        """The whole intercepted write without yielding, where nothing in it has to wait: the
        source and the target are in memory (tmpfs). None, having done nothing, where it cannot.

        Without a yield no other request or transaction can run in between, so this needs
        neither the gate nor the in-flight counters; it also duplicates in background mode,
        since writing the target now costs less than scheduling a task to do it. Its three
        steps (``_inline_duplicates``, ``_inline_begin``, ``_inline_end``) are the job's part of
        a write that several jobs of one image take inline (``group.py``).
        """
        length = len(data)
        duplicate = self._inline_duplicates(offset, length)
        if duplicate is None:
            return None
        op, edges = self._inline_begin(offset, length)
        try:
            written = fileio.pwrite_now(handle.fd, data, offset)
        except BaseException:
            self._abandon(op, offset, length)
            raise
        self._inline_end(op, edges, offset, length, data if written == length else data[:written],
                         duplicate)
        return written

    def _inline_duplicates(self, offset: int, length: int) -> bool | None:
        """Whether an inline write duplicates (None: it cannot be taken inline at all)."""
        if length == 0 or offset + length > self.size:
            return None
        duplicate = self._duplicating()
        if duplicate and not self.target.can_write_now(length):
            return None
        return duplicate

    def _inline_begin(self, offset: int, length: int) -> tuple[Operation | None, AbstractSet[int]]:
        """Before an inline write reaches the source.

        With nothing else in flight and a bitmap only memory holds, it is not even registered:
        nothing can look at the bitmap before the write's stretch without yields ends, so only
        the outcome must be right. Where the duplicate landed, the write's whole clusters are
        clean and its partial edge clusters as they were (their other bytes are untouched on
        both sides); anywhere else, every cluster it touched is dirty (``_abandon`` marks them).
        """
        if self.bitmap.volatile and not self.inflight:
            return None, _NO_EDGES
        return self._begin_write(offset, length)

    def _inline_end(self, op: Operation | None, edges: AbstractSet[int], offset: int,
                    length: int, payload: bytes, duplicate: bool) -> None:
        """After an inline write put ``payload`` on the source: duplicate it, settle the bits."""
        if not duplicate:
            self._abandon(op, offset, length, missed=payload)
            return
        try:
            self.target.pwrite_now(offset, payload)
        except TargetError as exc:
            self.on_target_error(exc)  # while still registered: not acknowledged yet
            self._abandon(op, offset, length, missed=payload)
            return
        try:
            self._duplicated(op, offset, len(payload), edges)
        except Exception as exc:  # the write reached the source: that is the writer's result
            self._duplicated_raised(op, exc)

    async def _intercepted_write(self, handle: Handle, offset: int, data: bytes) -> int:
        length = len(data)
        if length == 0:
            return await source_pwrite(handle, data, offset)
        if not await self._grown_for(offset, length):  # the job is failing: the source write
            return await source_pwrite(handle, data, offset)  # must still happen
        op, edges = self._begin_write(offset, length)
        if self._writes_alongside(handle, length):
            return await self._write_both(handle, op, offset, data, edges)
        try:
            written = await source_pwrite(handle, data, offset)
        except BaseException:
            self._abandon(op)
            raise
        payload = data if written == length else data[:written]
        if self._after_source_write(op, offset, payload, edges, handle.direct):
            await self._blocking_duplicate(op, offset, payload, edges, handle.direct)
        return written

    async def _grown_for(self, offset: int, length: int) -> bool:
        """Grow the job with a write past the image's end; False: it could not (the job is
        failing), and the write goes to the source untracked."""
        if offset + length > self.size:
            await self._grow(offset + length)
        return offset + length <= self.size

    def _after_source_write(self, op: Operation, offset: int, payload: bytes,
                            edges: set[int], direct: bool) -> bool:
        """The job's part of a write once ``payload`` reached the source: a background
        duplicate started, or the bits left dirty (and the write journaled while the target is
        away). True: the caller awaits ``_blocking_duplicate`` before the writer is answered."""
        if not self._duplicating():
            self._abandon(op, offset, missed=payload)  # the target is away: into the journal
            return False
        if self.params.copy_mode == "write-blocking":
            return True
        written = len(payload)
        if (self._dup_bytes + written <= self.params.buf_size
                and self._duplicates.count < MAX_BACKGROUND_DUPLICATES and self._nursery is not None):
            self._dup_bytes += written
            # acknowledged once this returns, maybe before it lands: a loss journals it first
            entry = None if self._window is None else self._window_add(offset, payload)
            self._nursery.start_soon(self._background_duplicate, op, offset, payload, edges,
                                     direct, entry)
        else:
            self.stats["skipped-duplicates"] += 1
            self._abandon(op)
        return False

    async def _blocking_duplicate(self, op: Operation, offset: int, payload: bytes,
                                  edges: set[int], direct: bool) -> None:
        """A write-blocking duplicate, awaited before the writer is answered."""
        if not await self._duplicate(op, offset, payload, edges, direct) \
                and self.replica.journaled:
            self._journal_write(offset, payload)  # lost meanwhile: acknowledged after it

    async def _write_both(self, handle: Handle, op: Operation, offset: int, data: bytes,
                          edges: set[int]) -> int:
        """A write-blocking write whose source write waits for a device: the source write and
        its duplicate at once, acknowledged once both ended.

        Two device round trips overlap instead of following each other. Either write may land
        first; the bits marked before both were issued are cleared only where both landed in
        full (rule 4: the operation stays registered until the target write ended). A failed
        or short source write may leave the target holding bytes the source does not have:
        its bits stay set, so the copy copies those clusters again.
        """
        landing = self._launch_target_write(op, offset, data, handle.direct)
        written = 0
        try:
            written = await source_pwrite(handle, data, offset)
            await landing.done.wait()
        except BaseException:  # a failed source write, or cancelled: the target write still ends
            with trio.CancelScope(shield=True):
                await landing.done.wait()  # registered until the target write ended (rule 2)
            self._both_ended(op, offset, data, written, edges, landing.error)
            raise
        self._both_ended(op, offset, data, written, edges, landing.error)
        return written

    def _writes_alongside(self, handle: Handle, length: int) -> bool:
        """Whether this job's duplicate goes out with the source write (``_write_both``): a
        write-blocking job that duplicates, where the source write waits for a device."""
        return (self.params.copy_mode == "write-blocking" and self._duplicating()
                and self._nursery is not None and not handle.runs_inline(length))

    def _launch_target_write(self, op: Operation, offset: int, data: bytes,
                             direct: bool) -> _Landing:
        """Start the target half of a ``_write_both`` write as a task of the job; on failure
        to start, the write is abandoned (its bits stay set)."""
        landing = _Landing()
        self._duplicates.enter()  # now: a pause that begins meanwhile must wait for this one
        assert self._nursery is not None
        try:
            self._nursery.start_soon(self._target_write, landing, offset, data, direct)
        except BaseException:
            self._duplicates.leave()
            self._abandon(op)
            raise
        return landing

    def _both_ended(self, op: Operation, offset: int, data: bytes, written: int,
                    edges: set[int], error: BaseException | None) -> None:
        """Settle a write of ``_write_both`` once its source (``written`` bytes landed there)
        and target writes (``error`` None: landed) ended."""
        if error is None and written == len(data):
            try:
                self._duplicated(op, offset, written, edges)
            except Exception as exc:
                self._duplicated_raised(op, exc)
            return
        if isinstance(error, TargetError):
            self.on_target_error(error)  # while still registered (a loss looks at the writes)
        missed = None
        if error is not None and written:
            missed = data if written == len(data) else data[:written]
        # also where the source failed: the target may have more than it
        self._abandon(op, offset, missed=missed)
        if isinstance(error, Exception) and not isinstance(error, TargetError):
            self.contain(error, "a duplicated write")

    async def _target_write(self, landing: _Landing, offset: int, data: bytes,
                            direct: bool) -> None:
        """The target half of ``_write_both``, as its own task; the caller entered
        ``_duplicates`` for it."""
        try:
            await self.target.pwrite(offset, data, direct=direct)  # as the guest's handle
        except Exception as exc:
            landing.error = exc
        except BaseException as exc:  # cancelled with the job: the bits stay set
            landing.error = exc
            raise
        finally:
            self._duplicates.leave()
            landing.done.set()

    async def _background_duplicate(self, op: Operation, offset: int, data: bytes,
                                    edges: set[int], direct: bool,
                                    entry: WindowEntry | None = None) -> None:
        try:
            await self._duplicate(op, offset, data, edges, direct)
        finally:
            self._dup_bytes -= len(data)
            if entry is not None:  # landed, or journaled by the loss that failed it
                self._window_landed(entry)

    async def _duplicate(self, op: Operation, offset: int, data: bytes, edges: set[int],
                         direct: bool = False) -> bool:
        """Write the guest's bytes to the target, then clear what is now known identical.

        Returns whether the bytes reached the target. Raises nothing: the guest's write reached
        the source, which is all its caller reports.
        """
        self._duplicates.enter()
        try:
            await self.target.pwrite(offset, data, direct=direct)  # as the guest's handle
        except TargetError as exc:
            self.on_target_error(exc)  # while still registered (a loss looks at the writes)
            self._abandon(op)
            return False
        except Exception as exc:
            self._abandon(op)
            self.contain(exc, "a duplicated write")
            return False
        finally:
            self._duplicates.leave()
        try:
            self._duplicated(op, offset, len(data), edges)
        except Exception as exc:
            self._duplicated_raised(op, exc)
        return True

    def _duplicated_raised(self, op: Operation | None, exc: Exception) -> None:
        if op is not None:
            self.inflight.discard(op)  # or the job's end would wait for it for ever
        self.contain(exc, "a duplicated write")

    async def _grow(self, new_size: int) -> None:
        """The image grows (a qcow2 file allocating clusters): grow the bitmap and the target.

        The new range is marked dirty before any write lands there, so the invariant holds
        whatever happens to the target's resize; the copy task then writes it (mostly as zeroes).
        """
        async with self._grow_lock:
            if new_size <= self.size or self.finished:
                return
            old_size = self.size
            if self.replica.journaled:  # a resize is no record: the journal cannot hold it
                self._enter_resync("the image grew while the target was away")
            # The target first: the copy task takes its ranges from the bitmap, so the bitmap
            # must not show the new range before the target has it (a copy past the target's
            # end fails the job).
            if self.target_ok:
                try:
                    await self.target.resize(new_size)
                except TargetError as exc:
                    self.on_target_error(exc)
            try:
                # Synchronous on purpose: no other task may mark while the file is rewritten.
                self.bitmap.resize(new_size)
            except Exception as exc:  # MirrorfsError, or OSError from mapping the grown file
                self._fail(f"cannot grow the bitmap with the image: {exc}")
                return
            self.size = new_size
            self.bitmap.mark(old_size, new_size - old_size)
            self.copy.dirtied()
            log.debug("job %s: image grew from %d to %d bytes", self.id, old_size, new_size)


class _Landing:
    """How the target half of a write of ``_write_both`` ended (``error`` None: landed)."""

    __slots__ = ("done", "error")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.error: BaseException | None = None


async def source_pread(handle: Handle, size: int, offset: int) -> bytes:
    """A read of the source where the fast path did not take it (gate closed, or a handle
    whose I/O cannot run inline): the handle knows which, so no per-call fstatfs."""
    if handle.runs_inline(size):
        return fileio.pread_now(handle.fd, size, offset)
    return await fileio.pread_thread(handle.fd, size, offset, handle.twin)


async def source_pwrite(handle: Handle, data: bytes, offset: int) -> int:
    """A write of the source outside the inline path (see ``source_pread``)."""
    if handle.runs_inline(len(data)):
        return fileio.pwrite_now(handle.fd, data, offset)
    return await fileio.pwrite_thread(handle.fd, data, offset, handle.twin)
