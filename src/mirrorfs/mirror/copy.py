"""The background copy of a job: copies the dirty ranges of the source to the target.

Role: ``CopyTask.run`` is one of the job's tasks (started by ``MirrorJob.run``). It walks the
bitmap in passes (``step`` issues one copy, or ends a pass) and copies each dirty range it finds
idle (no guest write in flight on it) in chunks, holes as zero writes. A copy registers in the
job's ``InflightOps`` for its whole lifetime and clears only what no other operation touched
(``docs/write-copy-race.md``). At the end of a pass with nothing left to do, the job becomes
ready; while ready, cleared bits are committed every ``COMMIT_INTERVAL``.

The job wakes the task when it dirties bits (``dirtied``) or lifts a hold (``poke``), and holds
it under a closed gate (``hold``/``release``). Errors of a copy follow the job's policies; what
is unexpected fails the job (``MirrorJob.contain``), never the mount.
"""

from __future__ import annotations

import mmap
import os
from typing import TYPE_CHECKING

import trio

from ..errors import SourceError, TargetError
from .. import fileio
from .extents import next_data
from .gate import ActivityCounter
from .inflight import Operation

if TYPE_CHECKING:
    from .job import MirrorJob

#: Largest single copy request; bigger buf-sizes run more requests in parallel instead.
MAX_CHUNK = 8 * 1024 * 1024
#: The default buf-size is split into this many copies in flight: copying tmpfs to tmpfs is
#: bound by memory bandwidth, and more copies in flight only contend for it (see
#: docs/performance.md).
COPIES_PER_BUF = 2
#: A source hole is copied (zeroed/punched on the target) in one operation of up to this size.
MAX_HOLE_SPAN = 1024 * 1024 * 1024
#: How often a ready job commits lazily cleared bits (target flush + bitmap commit), seconds.
COMMIT_INTERVAL = 1.0
#: After a copy's error that the policy ignores, the range is retried no sooner than this
#: (seconds): a bad sector would otherwise be reread, and reported, in a busy loop.
IGNORED_ERROR_RETRY = 0.1


class CopyTask:
    """The background copy of one job (its ``copy``)."""

    def __init__(self, job: MirrorJob) -> None:
        self._job = job
        self.params = job.params
        granularity = job.params.granularity
        chunk = max(granularity, min(MAX_CHUNK, job.params.buf_size // COPIES_PER_BUF))
        self.chunk_size = chunk - chunk % granularity
        self.max_copies = max(1, job.params.buf_size // self.chunk_size)
        self._copy_slots = trio.Semaphore(self.max_copies)
        self._copies = ActivityCounter()
        self._dirtied = trio.Event()
        self._wake = trio.Event()
        self._holds = 0
        self._nursery: trio.Nursery | None = None
        self._cursor = 0
        self._skipped = False
        self._last_commit = 0.0
        self._source_fd = -1
        self._source_twin: int | None = None
        self._zero = bytes(self.chunk_size)
        #: copy buffers, one per copy in flight, reused (see ``_copy_data``)
        self._buffers: list[mmap.mmap] = []
        # The source's last data extent found by SEEK_HOLE: tmpfs scans page by page to the end
        # of the extent, so a fully written image would be rescanned for every chunk (quadratic).
        self._data_extent = (0, 0)

    # ------------------------------------------------------------------ the job's handles

    def open_source(self, path: str) -> None:
        """Open the image for the copy's reads.

        Raises:
            OSError: it cannot be opened.
        """
        self._source_fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        # On a disk, the copy reads through an O_DIRECT twin: a full copy does not fill the page
        # cache with an image the guest may be keeping out of it (cache=none).
        self._source_twin = fileio.open_copy_twin(self._source_fd)

    def switch_source(self, fd: int) -> None:
        """Read the source through ``fd`` from now on (another job of the image pivoted it to a
        new file; called with the copy held, so no copy reads the old one any more)."""
        self.close_source()
        self._source_fd = fd
        self._source_twin = fileio.open_copy_twin(fd)
        self._data_extent = (0, 0)

    def close_source(self) -> None:
        if self._source_fd >= 0:
            fileio.close_twin(self._source_twin)
            self._source_twin = None
            os.close(self._source_fd)
            self._source_fd = -1

    @property
    def busy(self) -> bool:
        """A copy is in flight."""
        return self._copies.count > 0

    def dirtied(self) -> None:
        """Bits were set (or a write that may clear the last ones ended): look again."""
        self._dirtied.set()

    def poke(self) -> None:
        """Something that held the copy back may have changed."""
        self._wake.set()
        self._dirtied.set()

    def hold(self) -> None:
        """Issue no copy until ``release``; copies in flight go on (see ``wait_idle``)."""
        self._holds += 1

    def release(self) -> None:
        self._holds -= 1
        self.poke()

    async def wait_idle(self) -> None:
        """Wait until no copy is in flight."""
        await self._copies.wait_idle()

    # ------------------------------------------------------------------ the loop

    async def run(self, nursery: trio.Nursery) -> None:
        """Copy until cancelled: ``step`` while there is work, else wait to be dirtied."""
        self.attach(nursery)
        while True:
            await self.wait_allowed()
            if not await self.step():
                with trio.move_on_after(0.05 if self._job.bitmap.count() else COMMIT_INTERVAL):
                    await self._dirtied.wait()

    def attach(self, nursery: trio.Nursery) -> None:
        """Give ``step`` the nursery its copies run in (``run`` does; a test driving the steps
        itself calls this instead)."""
        self._nursery = nursery
        self._last_commit = trio.current_time()

    def detach(self) -> None:
        """The job's nursery is gone: from now on ``step`` issues nothing."""
        self._nursery = None

    async def step(self) -> bool:
        """One step of the copy: issue the copy of the next dirty range after the cursor (into
        the nursery ``run`` was given), or end a pass. Never sleeps; waits only for a copy slot,
        the rate limit, and at a pass's end for the copies in flight and a durable point.

        Returns:
            False when a pass ended with nothing to copy now (the caller waits to be dirtied),
            or the job's task has ended (``detach``).
        """
        job = self._job
        if self._nursery is None:
            return False
        run = job.bitmap.next_dirty(self._cursor)
        if run is None:
            self._dirtied = trio.Event()
            await self.wait_idle()
            if self._buffers and not job.bitmap.count():
                self._release_buffers()
            if self._cursor:
                self._cursor = 0
                if not self._skipped:
                    return True
            if self._settled():
                if not job.ready:
                    await job.durable_point()
                    # As QEMU: ready once a flush followed a moment with nothing dirty. Writes
                    # that came during the flush are being duplicated (or copied), which is
                    # what ready promises; waiting for another empty moment may never end
                    # under a steady writer on a slow target.
                    if job.target_ok and not job.paused and job.error is None:
                        job.become_ready()
                elif trio.current_time() - self._last_commit >= COMMIT_INTERVAL:
                    await job.durable_point()
                    self._last_commit = trio.current_time()
                if job.ready:  # caught up again (a skipped duplicate had put it behind)
                    job.behind_since = None
            self._skipped = False
            return False
        offset, length = run
        if trio.current_time() - self._last_commit >= COMMIT_INTERVAL:
            # Commit progress while copying too, or a crash during a long first pass would
            # leave every bit set in the file and --sync dirty would redo the whole copy.
            await job.durable_point()
            self._last_commit = trio.current_time()
        chunk = job.limiter.chunk_size(self.params.granularity, self.chunk_size)
        length = min(length, max(chunk, self._hole_span(offset, length)))
        self._cursor = offset + length  # past the end, next_dirty() says None: the pass is over
        if job.inflight.overlaps(offset, length):
            # Busy: its operation clears or re-dirties it. Come back on the next pass.
            self._skipped = True
            await trio.lowlevel.checkpoint()
            return True
        await self._copy_slots.acquire()
        if not self.allowed():
            self._copy_slots.release()
            return True
        if job.inflight.overlaps(offset, length):
            # A write began while we waited: copying now would only conflict with it.
            self._copy_slots.release()
            self._skipped = True
            return True
        assert self._nursery is not None
        self._copies.enter()
        op = job.inflight.register(offset, length, is_copy=True)
        self._nursery.start_soon(self._copy_chunk, op, offset, length)
        # Paid after issuing: no await between the overlap check and the registration.
        # (Chunks are a quarter second's worth at the rate, so progress stays smooth.)
        await job.limiter.take(length)
        return True

    def _settled(self) -> bool:
        """True when nothing is dirty but clusters that guest duplicates in flight, each alone on
        its clusters, are about to clear. Under a steady writer some duplicate is nearly always
        in flight, so demanding an empty bitmap would put off ready for ever on a slow link."""
        count = self._job.bitmap.count()
        if count == 0:
            return True
        writes = self._job.inflight.lone_guest_writes()
        if count > sum(last - first + 1 for first, last in writes):
            return False
        shift = self.params.granularity.bit_length() - 1
        for offset, length in self._job.bitmap.runs():
            for cluster in range(offset >> shift, ((offset + length - 1) >> shift) + 1):
                if not any(first <= cluster <= last for first, last in writes):
                    return False
        return True

    def allowed(self) -> bool:
        return (self._job.target_ok and not self._job.paused and self._holds == 0
                and self._job.error is None)

    async def wait_allowed(self) -> None:
        while not self.allowed():
            self._wake = trio.Event()
            await self._wake.wait()

    async def _copy_chunk(self, op: Operation, offset: int, length: int) -> None:
        try:
            await self.copy_range(offset, length)
        except (TargetError, SourceError) as exc:
            self._dirtied.set()
            if isinstance(exc, SourceError):
                action = self._job.on_source_error(exc)
            else:
                action = self._job.on_target_error(exc)
            if action == "ignore":
                # Still registered: the range is neither copied again nor cleared meanwhile.
                await trio.sleep(IGNORED_ERROR_RETRY)
        except Exception as exc:
            self._dirtied.set()
            self._job.contain(exc, "a copy")
        else:
            if op.conflicted:
                self._job.stats["conflicts"] += 1
                self._dirtied.set()
                # Clusters no other operation touched while this copy ran did get the source's
                # bytes: clear them, or a steady writer keeps every large chunk dirty for ever.
                self._clear_outside(op, offset, length)
            else:
                self._job.bitmap.clear(offset, length)
            self._job.meter.add(length)
        finally:
            self._job.inflight.unregister(op)
            self._copy_slots.release()
            self._copies.leave()

    def _clear_outside(self, op: Operation, offset: int, length: int) -> None:
        """Clear the clusters of [offset, offset+length) outside ``op.spans``."""
        g = self.params.granularity
        end = offset + length
        cluster = offset // g
        for lo, hi in sorted(op.spans):
            if lo > cluster:
                self._job.bitmap.clear(cluster * g, lo * g - cluster * g)
            cluster = max(cluster, hi + 1)
        if cluster * g < end:
            self._job.bitmap.clear(cluster * g, end - cluster * g)

    async def copy_range(self, offset: int, length: int) -> None:
        """Copy source bytes to the target; holes and runs of zeroes become zero writes."""
        if self._data_at(offset, offset + length) == offset + length:
            await self._job.target.write_zeroes(offset, length)
            self._job.stats["zeroed-bytes"] += length
            return
        # A chunk is larger than the source's extents may be: copy its data extents and
        # its holes each as they are, so the target stays as sparse as the source.
        end = offset + length
        pos = offset
        while pos < end:
            data_at = self._data_at(pos, end)
            if data_at > pos:
                await self._job.target.write_zeroes(pos, data_at - pos)
                self._job.stats["zeroed-bytes"] += data_at - pos
                pos = data_at
                continue
            lo, hi = self._data_extent
            if lo <= pos < hi:
                # Still known data (if the source changed since, a punched range reads as zeroes
                # and becomes a zero write: never wrong, at worst less sparse).
                hole_at = min(end, hi)
            else:
                try:
                    hole_at = os.lseek(self._source_fd, pos, os.SEEK_HOLE)
                except OSError:
                    hole_at = end
                if hole_at <= pos:
                    hole_at = end
                self._data_extent = (pos, hole_at)
                hole_at = min(end, hole_at)
            await self._copy_data(pos, hole_at - pos)
            pos = hole_at

    async def _copy_data(self, offset: int, length: int) -> None:
        """Copy one source range with data (whole-zero buffers still become zero writes).

        Reads go into reused buffers: a fresh 4 MiB ``bytes`` per chunk paid its page faults
        on every read (0.80 against 0.52 ms per 4 MiB on tmpfs).
        """
        buffers = self._buffers
        if length > self.chunk_size:  # not from the copy loop's chunks: a one-off buffer
            buf = bytearray(length)
        else:
            # page-aligned, so a local target can write them with O_DIRECT as they are
            buf = buffers.pop() if buffers else fileio.aligned_buffer(self.chunk_size)
        try:
            view = memoryview(buf)[:length]
            try:
                n = await fileio.preadinto(self._source_fd, view, offset, self._source_twin)
            except OSError as exc:
                raise SourceError(f"reading image {self.params.image!r} at offset {offset} "
                                  f"failed: {exc.strerror or exc}", errno=exc.errno) from None
            if n < length:
                # The source may not be shorter than the job's size while the job runs.
                view[n:] = bytes(length - n)
            if self._all_zero(buf, length):
                await self._job.target.write_zeroes(offset, length)
                self._job.stats["zeroed-bytes"] += length
            elif self.params.verify_resync:
                await self._write_differing(offset, bytes(view))
            else:
                # Targets use the buffer only until pwrite returns (NBDClient.pwrite's contract).
                await self._job.target.pwrite(offset, view, direct=True)
                self._job.stats["copied-bytes"] += length
        finally:
            if len(buf) == self.chunk_size:
                buffers.append(buf)

    def _release_buffers(self) -> None:
        """Give the copy buffers' memory back: with nothing left to copy they would hold
        buf-size bytes per job for as long as it stays ready (the next copy maps new ones).
        Dropped, not closed: a failed copy's traceback may still hold a view of one, and an
        mmap is unmapped when its last reference goes."""
        self._buffers.clear()

    async def _write_differing(self, offset: int, data: bytes) -> None:
        """A verified resync: write only the clusters whose target bytes differ from ``data``."""
        current = await self._job.target.pread(offset, len(data))
        if current == data:
            self._job.stats["verified-equal-bytes"] += len(data)
            return
        g = self.params.granularity
        pos, run_start = 0, None
        while pos <= len(data):
            step = min(g - (offset + pos) % g, len(data) - pos)
            differs = step > 0 and data[pos:pos + step] != current[pos:pos + step]
            if differs and run_start is None:
                run_start = pos
            elif not differs and run_start is not None:
                await self._job.target.pwrite(offset + run_start, data[run_start:pos])
                self._job.stats["copied-bytes"] += pos - run_start
                run_start = None
            if step == 0:
                break
            if not differs:
                self._job.stats["verified-equal-bytes"] += step
            pos += step

    def _all_zero(self, buf: bytearray | mmap.mmap, length: int) -> bool:
        """Whether ``buf[:length]`` is all zeroes (bytes comparisons are one memcmp that stops at
        the first difference; memoryview comparisons go byte by byte, 50x slower)."""
        head = min(length, 4096)
        if buf[:head] != self._zero[:head]:  # data seldom starts with a zero page: no big copy
            return False
        if length <= len(self._zero):
            return buf[:length] == self._zero[:length]
        return buf.count(0, 0, length) == length

    # ------------------------------------------------------------------ the source

    async def read_source(self, offset: int, length: int) -> bytes:
        """Read a range of the image (zeroes past a short end).

        Raises:
            SourceError: the read failed.
        """
        try:
            data = await fileio.pread(self._source_fd, length, offset)
        except OSError as exc:
            raise SourceError(f"reading image {self.params.image!r} at offset {offset} "
                              f"failed: {exc.strerror or exc}", errno=exc.errno) from None
        return data + bytes(length - len(data))

    def _data_at(self, offset: int, end: int) -> int:
        """Where the source's data begins in ``offset .. end`` (``end``: none there). An lseek
        that fails otherwise than at the end of the file says data: copying is never wrong."""
        try:
            data_at = next_data(self._source_fd, offset)
        except OSError:
            return offset
        return end if data_at is None else min(end, data_at)

    def _hole_span(self, offset: int, length: int) -> int:
        """How much of ``offset .. offset+length`` is a source hole from ``offset`` on, in whole
        clusters and at most MAX_HOLE_SPAN: such a span is copied as one zero write (one punch)
        instead of one per chunk."""
        span = min(length, self._data_at(offset, offset + length) - offset, MAX_HOLE_SPAN)
        return max(0, span - span % self.params.granularity)
