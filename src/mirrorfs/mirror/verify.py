"""Online verify: compare a job's source and target cluster by cluster while the guest runs.

Role: one ``Verifier`` per job at a time, started by ``start`` (``MirrorJob.start_verify``) as
one of the job's tasks, so the job's end (complete, cancel, failure, unmount) cancels it; it then reports
itself cancelled. It walks the image in chunks at its own rate (``RateLimiter``), reads both sides
off the trio thread as the copy does, and ends with one ``__org.mirrorfs_VERIFY_COMPLETED``
event carrying the ranges that differ.

No false positives against a busy writer. The bitmap says source and target agree on every clean
cluster that no operation has in flight (``docs/write-copy-race.md``), so only such clusters are
compared, and only when that stayed true for the whole comparison:
- dirty clusters are skipped: the job copies them anyway;
- the range read is *watched* (``InflightOps.watch``) from before the first read to after the
  last: a write or copy in flight at the start or registered meanwhile makes its clusters
  inconclusive, and so does a cluster dirty afterwards; inconclusive clusters are not compared;
- a cluster that differs is compared again once it has settled (nothing in flight, not dirty),
  and reported only if it still differs with nothing touching it during that second look.

``repair`` marks the differing ranges dirty through the job's gate, like a guest write (so a
transaction sees them before its converge, or not at all), and makes the marks durable before
the event says so; the copy task then copies them.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any, Callable

import trio

from .. import fileio
from ..errors import MirrorfsError, StateError, TargetError
from . import verify_ranges as ranges
from .ratelimit import RateLimiter
from .verify_ranges import Range

if TYPE_CHECKING:
    from .job import MirrorJob

log = logging.getLogger(__name__)

#: The event that ends every verify.
VERIFY_COMPLETED = "__org.mirrorfs_VERIFY_COMPLETED"
#: Largest comparison: two buffers of this size are held while it runs.
VERIFY_CHUNK = 1024 * 1024
#: A differing cluster still busy after this many looks, this far apart (seconds), is left to the
#: job: something is writing it, and its write or the copy brings the target up to date.
SETTLE_LOOKS = 50
SETTLE_PAUSE = 0.02


class VerifyEnded(Exception):
    """The job can no longer be verified (it ended, its target went away)."""


def check_can_verify(job: MirrorJob) -> None:
    """Refuse a verify of a job whose target cannot be read now, or that has one running.

    Raises:
        StateError: the job ended or is failing, its target is not connected, or it is being
            verified already.
    """
    if job.finished:
        raise StateError(f"job {job.id!r} has ended: there is no target to verify")
    if job.error is not None:
        raise StateError(f"job {job.id!r} is failing ({job.error}): its target cannot be verified")
    if not job.target_ok:
        raise StateError(f"the target of job {job.id!r} is not connected; verify once "
                         f"MIRROR_TARGET_RESTORED says it is back")
    if job.verifier is not None:
        raise StateError(f"job {job.id!r} is already being verified; wait for its "
                         f"{VERIFY_COMPLETED} event")


def start(job: MirrorJob, nursery: trio.Nursery | None, *, repair: bool, speed: int,
          emit: Callable[[str, dict], None]) -> Verifier:
    """Start a verify of ``job`` in ``nursery`` (the job's own, so its end cancels the verify).

    Raises:
        StateError: as ``check_can_verify``, or the job's task has not started.
    """
    check_can_verify(job)
    if nursery is None:
        raise StateError(f"job {job.id!r} has not started yet; verify it once it runs")
    verifier = Verifier(job, repair=repair, speed=speed, emit=emit)
    nursery.start_soon(verifier.run)
    return verifier


class Verifier:
    """One verify of one job.

    Args:
        job: the job whose source and target are compared.
        repair: mark the differing ranges dirty, so the job copies them.
        speed: bytes per second compared (0: unlimited).
        emit: the job's event callback.
    """

    def __init__(self, job: MirrorJob, *, repair: bool, speed: int,
                 emit: Callable[[str, dict], None]) -> None:
        self._job = job
        self._emit = emit
        self.repair = repair
        self.limiter = RateLimiter(speed)
        self._granularity = job.params.granularity
        self.position = 0
        self._source_twin: int | None = None
        self._source_path = ""
        #: clusters compared equal or found differing, and clusters left out as busy or dirty
        self.compared = 0
        self.skipped = 0
        self.differing: list[Range] = []
        #: the differing ranges are marked dirty (and durable)
        self.repaired = False
        self.outcome = "cancelled"
        self.error: str | None = None

    def info(self) -> dict[str, Any]:
        """Progress, for the job's entry in ``query-block-jobs``."""
        return {"offset": self.position, "len": self._job.size, "repair": self.repair,
                "speed": self.limiter.rate, "compared-bytes": self.compared,
                "skipped-bytes": self.skipped}

    def event_data(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "device": self._job.id, "result": self.outcome,
            "ranges": [{"offset": o, "length": n} for o, n in self.differing],
            "differing-bytes": ranges.total(self.differing), "repaired": self.repaired,
            "compared-bytes": self.compared, "skipped-bytes": self.skipped}
        if self.error is not None:
            data["error"] = self.error
        return data

    # ------------------------------------------------------------------ the task

    async def run(self) -> None:
        """The job's task: verify, then emit the event, however it ended. Raises nothing but
        ``trio.Cancelled`` (the job ended: reported as cancelled)."""
        try:
            await self._verify()
        except VerifyEnded as exc:
            self.outcome, self.error = "cancelled", str(exc)
        except MirrorfsError as exc:
            self.outcome, self.error = "failed", str(exc)
        except trio.Cancelled:
            self.outcome, self.error = "cancelled", "the job ended"
            raise
        except Exception as exc:  # a bug of the verify must not end the job or the mount
            log.exception("BUG: verify of job %s failed", self._job.id)
            self.outcome, self.error = "failed", f"internal error: {type(exc).__name__}: {exc}"
        finally:
            if self._job.verifier is self:
                self._job.verifier = None
            self._emit(VERIFY_COMPLETED, self.event_data())
            log.info("job %s: verify %s (%d bytes differ)", self._job.id, self.outcome,
                     ranges.total(self.differing))

    async def _verify(self) -> None:
        job = self._job
        self._source_path = job.node.backing_path
        try:
            fd = os.open(self._source_path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise StateError(f"cannot read image {job.params.image!r}: {exc.strerror}") from None
        # as the copy: a full pass does not fill the page cache
        self._source_twin = fileio.open_copy_twin(fd)
        try:
            suspects: list[Range] = []
            while self.position < job.size:
                self._check_going()
                chunk = self.limiter.chunk_size(self._granularity, VERIFY_CHUNK)
                length = min(chunk, job.size - self.position)
                await self.limiter.take(length)
                suspects += await self._compare_clean(fd, self.position, length)
                self.position += length
            confirmed = await self._recheck(fd, ranges.merge(suspects))
            self._check_going()  # a pivot meanwhile: what fd gave is no longer the image
            self.differing = confirmed
            if confirmed and self.repair:
                await self._mark_dirty(confirmed)
            self.outcome = "differ" if confirmed else "identical"
        finally:
            fileio.close_twin(self._source_twin)
            self._source_twin = None
            os.close(fd)

    def _check_going(self) -> None:
        job = self._job
        if job.finished:
            raise VerifyEnded("the job ended")
        if job.error is not None:
            raise VerifyEnded(f"the job failed: {job.error}")
        if not job.target_ok:
            raise VerifyEnded("the target was lost")
        if job.node.backing_path != self._source_path:
            raise VerifyEnded("another job pivoted the image to a new file")

    # ------------------------------------------------------------------ comparing

    async def _compare_clean(self, fd: int, offset: int, length: int) -> list[Range]:
        """Compare the clean clusters of one chunk; returns the ranges found differing."""
        dirty = self._dirty_in(offset, length)
        found: list[Range] = []
        for start, n in ranges.subtract([(offset, length)], dirty):
            differ, busy = await self._compare(fd, start, n)
            found += differ
            self.skipped += ranges.total(busy)
            self.compared += n - ranges.total(busy)
        self.skipped += ranges.total(dirty)
        return found

    async def _compare(self, fd: int, offset: int, length: int) -> tuple[list[Range], list[Range]]:
        """Read [offset, offset+length) on both sides, watched.

        Returns:
            (the ranges that differ and nothing touched, the ranges something touched).
        """
        job = self._job
        watcher = job.inflight.watch(offset, length)
        try:
            try:
                source = await fileio.pread(fd, length, offset, self._source_twin)
            except OSError as exc:
                raise StateError(f"reading image {job.params.image!r} at offset {offset} failed: "
                                 f"{exc.strerror or exc}") from None
            self._check_going()
            try:
                target = await job.target.pread(offset, length)
            except TargetError as exc:
                self._check_going()  # lost, or the job ended meanwhile: say that instead
                raise TargetError(f"reading the target at offset {offset} failed: {exc}") from None
        finally:
            job.inflight.unwatch(watcher)
        if len(source) < length:  # the source may not shrink while the job runs; treat as zeroes
            source += bytes(length - len(source))
        busy = ranges.intersect(
            ranges.cluster_spans(watcher.spans, self._granularity) + self._dirty_in(offset, length),
            [(offset, length)])
        return ranges.subtract(ranges.differing(source, target, offset, self._granularity), busy), busy

    async def _recheck(self, fd: int, suspects: list[Range]) -> list[Range]:
        """Look again at each differing range once it has settled; returns what still differs."""
        confirmed: list[Range] = []
        pending = suspects
        looks = 0
        while pending and looks < SETTLE_LOOKS:
            looks += 1
            await trio.sleep(SETTLE_PAUSE)
            self._check_going()
            still: list[Range] = []
            for offset, length in pending:
                if self._dirty_in(offset, length) or self._job.inflight.overlaps(offset, length):
                    still.append((offset, length))  # not settled yet
                    continue
                await self.limiter.take(length)
                differ, busy = await self._compare(fd, offset, length)
                confirmed += differ
                still += busy
            pending = ranges.merge(still)
        if pending:
            log.info("job %s: verify left %d busy bytes to the job", self._job.id,
                     ranges.total(pending))
            self.skipped += ranges.total(pending)
            self.compared -= ranges.total(pending)
        return ranges.merge(confirmed)

    def _dirty_in(self, offset: int, length: int) -> list[Range]:
        """The dirty clusters' parts of [offset, offset+length)."""
        if not self._job.bitmap.is_dirty(offset, length):
            return []  # the common case, and a listing would scan on to the next dirty run
        end = offset + length
        found = []
        for run_offset, run_length in self._job.bitmap.runs(offset):
            if run_offset >= end:
                break
            found.append((run_offset, run_length))
        return ranges.intersect(found, [(offset, length)])

    # ------------------------------------------------------------------ repair

    async def _mark_dirty(self, found: list[Range]) -> None:
        """Mark ``found`` dirty as a guest write would, and make the marks durable."""
        job = self._job
        async with job.gate.hold():
            self._check_going()
            for offset, length in found:
                job.bitmap.mark(offset, length)
            job.copy.dirtied()
            await job.durable_point()
        self.repaired = True
