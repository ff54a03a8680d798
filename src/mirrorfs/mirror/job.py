"""One mirror job: the FUSE seam, the commands and the commit step.

Role: everything that happens to one image between ``drive-mirror`` and the end of the job. The
FUSE layer calls ``read``/``write``/``fsync``/``check_modify`` for every request on the image while
the job is attached to its node; the manager drives ``pause``/``resume``/``set_speed`` and the
ending actions (complete, cancel, shutdown), which it runs under the job's I/O gate. The write
interception is in ``writes.py``, the background copy in ``copy.py``, the error policies in
``failures.py``, the states in ``state.py``, the check of a ``dirty`` resume in
``resume_check.py``, the recovery point in ``lag.py``, the one end path in ``ending.py``.

Invariants (each stated with its code in ``docs/architecture.md``):
- The bitmap over-approximates the clusters where target and source differ: bits are set
  before a registered write reaches the source (the unregistered inline write settles them
  before it yields), and cleared only by an operation that ran alone on its clusters
  (``inflight.py``) or under the closed gate (``converge``).
- A persistent bitmap's file clears bits only after a target flush (``_flush_and_commit``);
  sets reach the mmap before the source write.
- Target errors never reach the writer: the source write's result is the writer's result.

Failure containment: nothing raised in a job's tasks reaches the mount's service nursery (it
would end the mount and every image in it). Every task the job starts is wrapped:
- the copy loop (``CopyTask.run``), each copy (``CopyTask._copy_chunk``), each duplicate
  (``_duplicate``) and the reconnect task catch ``Exception``: a ``TargetError`` follows
  ``on-target-error``, a ``SourceError`` (a failed read of the source) ``on-source-error``,
  anything else is a bug that is logged with its traceback and fails the job (``contain``).
- a failed job ends in its own task (``_finish_failed``) under the manager's lock, so it never
  interleaves with a transaction or a shutdown that holds the job's gate.
- what still escapes ``run`` is caught by ``JobManager._run_job`` (``abandon``).
Guest requests never see a target error; a source error reaches them as the source's errno through
the FUSE layer, which turns every exception into an errno (``fs/operations.py``).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from typing import Any, Callable

import trio

from .. import fileio
from ..errors import SourceError, StateError, TargetError
from ..targets.base import Target
from .gate import ActivityCounter, IOGate
from .copy import CopyTask
from .ending import Ending
from .failures import FailureHandling
from .lag import RecoveryPoint
from .resume_check import ResumeCheck
from .inflight import InflightOps
from .journaling import Journaling, WindowEntry
from .params import MirrorParams
from .replica import Replica
from .seams import Handle, ImageIO, JobBitmap, Node
from .state import PAUSED_STATES, READY_STATES, JobState, transition
from .ratelimit import RateLimiter, RateMeter
from . import group, verify
from .writes import WritePath, source_pread, source_pwrite

log = logging.getLogger(__name__)

EmitFn = Callable[[str, dict], None]


class MirrorJob(WritePath, FailureHandling, Journaling, ResumeCheck, RecoveryPoint, Ending):
    """A running mirror of one image to one target.

    Args:
        params: validated job parameters.
        node: the FUSE layer's ImageNode of the image (``handles``, ``backing_path``, ``job``).
        target: a connected target of the image's size.
        bitmap: a DirtyBitmap or PersistentBitmap already holding the job's initial work.
        size: the image size (fixed while the job runs: truncation is refused).
        emit: callback for QMP events.
        end_lock: the manager's lock. The job's own end (a failure) takes it, so it never runs
            in the middle of a transaction or a shutdown acting on the job.
        gate: the image's I/O gate when other jobs run on it (all jobs of an image share one,
            ``group.py``); None: a new one.
    """

    def __init__(self, params: MirrorParams, node: Node, target: Target, bitmap: JobBitmap, *,
                 size: int, emit: EmitFn, end_lock: trio.Lock | None = None,
                 journal: Any = None, replica: Replica | None = None,
                 gate: IOGate | None = None) -> None:
        self.params = params
        self.id = params.job_id
        self.node = node
        self.target = target
        self.bitmap = bitmap
        self.size = size
        self._emit = emit
        self.gate = gate if gate is not None else IOGate()
        self.inflight = InflightOps(params.granularity)
        self.limiter = RateLimiter(params.speed)
        self.meter = RateMeter()
        #: Changed only by ``_set_state``, which also keeps ``ready`` and ``paused`` in step
        #: (plain attributes: the write path reads them per request).
        self.state = JobState.CREATED
        self.ready = False
        self.paused = False
        #: The user paused the job (an error pause alone is lifted by a resume just the same).
        self.user_paused = False
        self.io_status = "ok"
        #: Why the job failed; set once, by ``_fail`` (the job then ends in its own task) or by
        #: ``abandon``.
        self.error: str | None = None
        #: How the job ended (``_end``): completed, cancelled, failed or stopped (an unmount).
        self.outcome: str | None = None
        self.finished = False
        #: What serves the image after a pivot to an NBD target (set by the manager). Requests
        #: that waited at the closed gate during the pivot still come through this job.
        self.successor: ImageIO | None = None
        self.stats = {"copied-bytes": 0, "zeroed-bytes": 0, "duplicated-bytes": 0,
                      "skipped-duplicates": 0, "conflicts": 0, "verified-equal-bytes": 0,
                      "reconnects": 0, "outages": 0, "resume-samples": 0}
        #: A ``dirty`` resume compares clean clusters before it trusts the bitmap (``resume.py``):
        #: at the start, or at the first connect of a target that was away then.
        self.resume_check_pending = (params.sync == "dirty" and not params.verify_resync
                                     and not bitmap.volatile)
        #: When the oldest write not yet on the target was made (ns since the epoch; None: in
        #: sync). Set at the start when there is work, and by the first write that is not
        #: duplicated (``_abandon``); cleared once the job is ready and settled. No clock read
        #: on the duplicated write path.
        self.behind_since: int | None = time.time_ns() if bitmap.count() else None
        self._lag_exceeded = False
        self._dup_bytes = 0
        self._duplicates = ActivityCounter()
        #: The target answers (False from a lost connection until a reconnect).
        self.target_ok = target.connected
        self._reconnecting = False
        self._cancel_scope: trio.CancelScope | None = None
        self._nursery: trio.Nursery | None = None
        self._ended = trio.Event()
        self.copy = CopyTask(self)
        self.verifier: verify.Verifier | None = None  # the one running (``verify.py``)
        self._fsync_lock = trio.Lock()
        self._durable_requested = 0
        self._durable_done = 0
        self._grow_lock = trio.Lock()
        self._end_lock = end_lock if end_lock is not None else trio.Lock()
        self.replica = replica or self._initial_replica()  # these three: see journaling.py
        self.journal = journal
        self._window: deque[WindowEntry] | None = None if journal is None else deque()
        self._init_journaling()

    # ------------------------------------------------------------------ lifecycle

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Run the copy until the job ends. Started by the manager in its nursery.

        Raises (only before ``task_status.started()``, to the starter):
            SourceError: the image cannot be opened for reading.
        """
        try:
            self.copy.open_source(self.node.backing_path)
        except OSError as exc:
            raise SourceError(f"cannot read image {self.params.image!r}: {exc.strerror}",
                              errno=exc.errno) from None
        if self.resume_check_pending and self.target_ok:
            try:
                await self._check_before_start()
            except BaseException:
                self.copy.close_source()
                raise
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                await self._attach_drained()
                self._set_state(JobState.RUNNING)  # the manager's sign that the job started
                self._start_replica()
                if not self.target_ok and self.replica is not Replica.REPLAYING:
                    # Started while its server is away: connect with the usual backoff.
                    self._reconnecting = True
                    nursery.start_soon(self._reconnect)
                task_status.started()
                if self.params.max_lag > 0:
                    nursery.start_soon(self._watch_lag)
                await self.node.wait_passthrough_idle()
                with trio.CancelScope() as scope:
                    self._cancel_scope = scope
                    try:
                        if self.error is None:
                            await self.copy.run(nursery)
                    except Exception as exc:
                        self.contain(exc, "the copy loop")
                # Asked to end from inside (a failure): finish in the job's own task, once no
                # transaction or shutdown is acting on the job (one that ends it cancels this).
                if self.error is not None and not self.finished:
                    async with self._end_lock:
                        if not self.finished:
                            await self._finish_failed()
                nursery.cancel_scope.cancel()
        finally:
            # However the task ended, writes are no longer recorded from here on; a no-op when
            # an ending (or an unmount's stop) already closed the bitmap.
            self._close_bitmap(clean=True, ended=True)
            self._detach()
            self._ended.set()

    def _attach_node(self) -> None:
        """From now on the FUSE layer sends the image's requests to the job (and to the image's
        other jobs: ``group.py``). With other jobs on the image, the caller has drained the
        shared gate: a write inside it would reach the source unseen by this job."""
        group.attach(self.node, self)
        # Writes that began before we attached bypass the write path: mark their ranges and let
        # them land before the first copy (or resume sample) reads the source.
        for offset, length in list(self.node.passthrough_writes.values()):
            end = min(offset + length, self.size)
            if end > offset:
                self.bitmap.mark(offset, end - offset)

    async def _attach_drained(self) -> None:
        """``_attach_node`` at a point where no request is inside the image's gate (the gate
        stays closed while the caller's block runs, when it is the caller's)."""
        if group.live_jobs(self.node) and not self.gate.closed:
            self.gate.close()
            try:
                await self.gate.wait_drained()
                self._attach_node()
            finally:
                self.gate.open()
            return
        await self.gate.wait_drained()
        self._attach_node()

    def _detach(self) -> None:
        self._detach_node()
        self.copy.detach()
        self.copy.close_source()

    def _detach_node(self) -> None:
        """From now on the FUSE layer serves the image without the engine."""
        group.detach(self.node, self)

    async def wait_ended(self) -> None:
        await self._ended.wait()

    def _set_state(self, new: JobState) -> None:
        """The one place a job's state changes (checked against ``state.TRANSITIONS``)."""
        old = self.state
        if new is old:
            return
        self.state = transition(old, new)
        self.ready = new in READY_STATES
        self.paused = new in PAUSED_STATES
        if new.status != old.status:
            self._emit("JOB_STATUS_CHANGE", {"id": self.id, "status": new.status})

    @property
    def status(self) -> str:
        """The QMP status."""
        return self.state.status

    def _event_data(self) -> dict:
        return {"type": "mirror", "device": self.id, "len": self.size, "offset": self.offset,
                "speed": self.limiter.rate}

    @property
    def offset(self) -> int:
        return self.size - self.bitmap.dirty_bytes()

    def info(self) -> dict:
        """This job as a QMP BlockJobInfo (plus mirrorfs's fields)."""
        entry = {
            "type": "mirror", "device": self.id, "len": self.size, "offset": self.offset,
            "busy": self.copy.busy, "paused": self.paused, "speed": self.limiter.rate,
            "io-status": self.io_status, "ready": self.ready, "status": self.status,
            "auto-finalize": True, "auto-dismiss": True,
            "target": self.target.description, "dirty-bytes": self.bitmap.dirty_bytes(),
            "copy-mode": self.params.copy_mode, "rate": int(self.meter.rate),
            "__org.mirrorfs_image": self.params.image,
            **self._replica_info(),
            "__org.mirrorfs_recovery-point-age": round(self.recovery_point_age(time.time_ns()), 3),
            "__org.mirrorfs_bytes-behind": self.bytes_behind(),
        }
        entry.update({f"__org.mirrorfs_{k}": v for k, v in self.stats.items()})
        if self.verifier is not None:
            entry["__org.mirrorfs_verify"] = self.verifier.info()
        if self.error is not None:
            entry["error"] = self.error
        return entry

    # ------------------------------------------------------------------ the FUSE seam

    async def read(self, handle: Handle, offset: int, size: int) -> bytes:
        if not self.gate.closed and self.successor is None and handle.runs_inline(size):
            # Nothing else runs until this returns, so the open gate needs no holding.
            return fileio.pread_now(handle.fd, size, offset)
        async with self.gate.hold():
            if self.node.job is not self:  # a successor, the image's jobs, or nothing now
                return await group.serve_held(self.node, "read", handle, offset, size)
            return await self.read_held(handle, offset, size)

    async def read_held(self, handle: Handle, offset: int, size: int) -> bytes:
        return await source_pread(handle, size, offset)

    async def write(self, handle: Handle, offset: int, data: bytes) -> int:
        if not self.gate.closed and self.successor is None and handle.runs_inline(len(data)):
            if self.finished:
                return fileio.pwrite_now(handle.fd, data, offset)
            written = self._write_inline(handle, offset, data)
            if written is not None:
                return written
        async with self.gate.hold():
            if self.node.job is not self:  # e.g. pivoted to NBD: handle.fd is still the source
                return await group.serve_held(self.node, "write", handle, offset, data)
            return await self.write_held(handle, offset, data)

    async def write_held(self, handle: Handle, offset: int, data: bytes) -> int:
        if self.finished:
            return await source_pwrite(handle, data, offset)
        return await self._intercepted_write(handle, offset, data)

    async def fsync(self, handle: Handle, datasync: bool = False) -> None:
        async with self.gate.hold():
            if self.node.job is not self:
                return await group.serve_held(self.node, "fsync", handle, datasync)
            await self.fsync_held(handle, datasync)

    async def fsync_held(self, handle: Handle, datasync: bool) -> None:
        if self.finished:
            return await fileio.fsync(handle.fd, datasync)
        await group.flush_all(handle, datasync, [self])

    async def flush_job(self) -> None:
        """The job's part of a guest flush: the durable point, then (while the target is away
        or replayed to) the journal's FLUSH record. After the target flush, so that a flush
        that lost the target still puts its FLUSH record after the writes it covered."""
        await self.durable_point()
        await self._journal_flush()

    def source_moved(self, fd: int, source_id: str) -> None:
        """Another job of the image pivoted it to the file ``source_id``: read it through ``fd``
        from now on (a pivot's commit, with this job's copy held). A persistent bitmap records
        the new file, so that no later resume trusts the file the image left; if it cannot,
        the job fails (its bitmap then says ended, and a resume must verify)."""
        self.copy.switch_source(fd)
        try:
            self.bitmap.rebind_source(source_id)
            if self.journal is not None:
                self.journal.rebind_source(source_id)
        except Exception as exc:
            self._fail(f"cannot record the image's new file in bitmap {self.params.bitmap} or "
                       f"its journal: {exc}")

    def check_modify(self, op: str) -> None:
        if not self.finished:
            raise StateError(f"cannot {op} {self.params.image!r}: mirror job {self.id!r} is "
                             f"running on it; complete or cancel the job first")

    async def durable_point(self) -> None:
        """Make the invariant hold across power loss: flush target, commit clears, msync bits.

        Concurrent callers share flushes: a caller returns as soon as a flush that started after
        its call has finished, so N parallel fsyncs cost about two target flushes, not N.
        """
        self._durable_requested += 1
        ticket = self._durable_requested
        async with self._fsync_lock:
            if self._durable_done >= ticket or self.finished:
                return
            covers = self._durable_requested
            await self._flush_and_commit()
            self._durable_done = covers

    async def _flush_and_commit(self, *, strict: bool = False) -> None:
        """The commit step: flush the target, commit the clears that flush made durable, and
        make the bits durable.

        ``strict`` (``converge``): a target error raises (TargetError) and so does a bitmap
        that cannot be written (StateError; the job fails). Otherwise a target error follows
        ``on-target-error`` and the clears stay uncommitted.
        """
        token = self.bitmap.begin_clear_commit()  # before the flush: see bitmap docs
        if strict:
            await self.target.flush()
            self.bitmap.finish_clear_commit(token)
        elif self.target_ok:
            try:
                await self.target.flush()
            except TargetError as exc:
                self.on_target_error(exc)
            else:
                self.bitmap.finish_clear_commit(token)
        if self.bitmap.volatile:
            return
        try:
            await trio.to_thread.run_sync(self.bitmap.flush)
        except OSError as exc:
            self._bitmap_write_failed(exc)
            if strict:
                raise StateError(f"job {self.id!r} failed: {self.error}") from None

    def _bitmap_write_failed(self, exc: OSError) -> None:
        """msync of the bitmap file failed (its storage did): the job cannot keep its promise."""
        log.warning("job %s: cannot write bitmap %s: %s", self.id, self.params.bitmap, exc)
        self._fail(f"cannot write bitmap {self.params.bitmap}: {exc.strerror or exc}")

    # ------------------------------------------------------------------ states and errors

    def become_ready(self) -> None:
        self.behind_since = None
        self._replica_ready()
        self._set_state(JobState.READY)
        self._emit("BLOCK_JOB_READY", self._event_data())

    # ------------------------------------------------------------------ commands

    def check_can_pause(self) -> None:
        if self.finished:
            raise StateError(f"job {self.id!r} has ended")
        if self.user_paused:
            raise StateError(f"job {self.id!r} is already paused")

    async def pause(self) -> None:
        """Stop all I/O to the target; returns once the target writes in flight have landed."""
        self.check_can_pause()
        self.user_paused = True
        self._set_state(JobState.STANDBY if self.ready else JobState.PAUSED)
        await self.copy.wait_idle()
        await self._duplicates.wait_idle()

    def resume(self) -> None:
        if not self.paused:
            raise StateError(f"job {self.id!r} is not paused")
        self.user_paused = False
        self.io_status = "ok"
        # Writes made while paused are not on the target: ready (len == offset) must be
        # earned again, and BLOCK_JOB_READY says when, as after a lost target.
        again_ready = self.ready and not self.bitmap.count()
        self._resumed_replica()
        self._set_state(JobState.READY if again_ready else JobState.RUNNING)
        self.copy.poke()

    def set_speed(self, speed: int) -> None:
        self.limiter.set_rate(speed)

    def start_verify(self, *, repair: bool = False, speed: int = 0) -> None:
        """Start a verify as one of the job's tasks (``verify.start``; StateError if refused)."""
        self.verifier = verify.start(self, self._nursery, repair=repair, speed=speed, emit=self._emit)

    def check_can_complete(self) -> None:
        """Refuse complete (either form) unless the job is ready (QEMU's rule)."""
        if self.finished:
            raise StateError(f"job {self.id!r} has ended")
        if self.error is not None:
            raise StateError(f"job {self.id!r} is failing: {self.error}")
        if not self.ready or self.paused:
            state = "paused" if self.paused else "not ready yet"
            raise StateError(f"job {self.id!r} cannot be completed: it is {state} "
                             f"({self.bitmap.dirty_bytes()} bytes still differ); wait for "
                             f"BLOCK_JOB_READY")

    async def hold_copy(self) -> None:
        """Stop issuing copies and durable points, and wait for the ones in flight (used under
        a closed gate, by the task that later calls ``release_copy``).

        Holding the durable points too serialises the copy loop's flush and clear commit with
        whatever the holder does: converge's own commit, closing the bitmap at the job's end.
        """
        self.copy.hold()
        try:
            await self.copy.wait_idle()
            await self._fsync_lock.acquire()
        except BaseException:
            self.copy.release()
            raise

    def release_copy(self) -> None:
        """Undo ``hold_copy`` (also after the holder ended the job)."""
        self._fsync_lock.release()
        self.copy.release()

    async def converge(self) -> None:
        """With the gate closed and copies held: finish every write and copy every dirty cluster
        inline, then flush the target and commit. Afterwards the target equals the source.

        Raises:
            TargetError: the target failed; nothing has been switched.
            SourceError: a read of the source failed; nothing has been switched.
            StateError: the bitmap file cannot be written; the job fails.
        """
        await self.inflight.wait_idle()
        while True:
            run = self.bitmap.next_dirty(0)
            if run is None:
                break
            offset, length = run
            for start in range(offset, offset + length, self.copy.chunk_size):
                n = min(self.copy.chunk_size, offset + length - start)
                await self.copy.copy_range(start, n)
                self.bitmap.clear(start, n)
        await self._flush_and_commit(strict=True)
