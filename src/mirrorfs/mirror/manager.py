"""The job manager: every mirror job of one mount, and the commands that act on them.

Role: starts jobs (target, bitmap and initial work per sync mode), answers queries, and runs
complete / cancel as transactions across images: every image in one transaction is quiesced
together (all gates closed first, then all drained), every precondition is checked for all of
them before anything changes, then every action runs, then I/O resumes. So no write to any of
them lands between the first and the last action (``docs/transactions.md``).

The manager owns no nursery of its own: the mount service passes the one it owns, and jobs run in
it. Nothing here knows about FUSE or QMP: the FUSE layer is reached through ``resolve_node`` and
the node objects it returns, QMP through the ``emit`` listeners.

Failure containment: a job's failure never reaches that nursery. The job contains the errors of
its own tasks (``job.py``); ``_run_job`` is the last line, where anything that still escapes a
started job ends that job as failed (with a "BUG" log line) and the mount goes on. One lock
serialises every command and every job's own end (``MirrorJob(end_lock=...)``), so a failing job
never reopens a gate that a transaction closed. A start that fails undoes, in reverse order,
everything it did (``start_mirror``): no job, no open target or bitmap, no file it created.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from typing import Any, Callable, Iterable

import trio

from ..errors import (JobNotFoundError, JournalFormatError, MirrorfsError, SourceError,
                      StateError, TargetError, TargetFatalError, UsageError)
from ..journal.file import WriteJournal
from ..nbd.uri import parse_nbd_uri
from ..state.directory import StateDir
from ..state.record import JobRecord
from ..targets.base import Target
from . import group, paths
from .extents import allocated_extents
from .job import MirrorJob
from .params import MirrorParams
from .persistence import Persistence
from .seams import JobBitmap
from .pivot import EndPlan, Plan, PivotReservations, check_pivot, prepare_pivot
from .replica import JournalFound, initial_replica

log = logging.getLogger(__name__)

#: Every write to an image is duplicated to each of its jobs' targets: past a few jobs, an image
#: gets slower with each one and nothing is gained, and many would be a script gone wrong.
MAX_JOBS_PER_IMAGE = 8


@dataclasses.dataclass(frozen=True)
class Action:
    """One action of a transaction: kind is "complete" or "cancel"."""

    kind: str
    job_id: str
    pivot: bool = True
    force: bool = False


class JobManager:
    """All jobs of one mount.

    Args:
        resolve_node: maps an image path relative to the mount to the FUSE layer's node;
            raises UsageError for a missing or non-regular file.
        nursery: where jobs run (owned by the mount service).
        mountpoint: the mount's path, to refuse paths that lead into the mount itself.
        source_dir: the mount's source directory, to refuse images reached through links and
            targets or bitmaps that are images of the mount.
        state: the mount's open state directory (``--state-dir``), where persistent jobs are
            recorded; None: ``persistent`` is refused.
    """

    def __init__(self, resolve_node: Callable[[str], Any], *, nursery: trio.Nursery,
                 mountpoint: str | None = None, source_dir: str | None = None,
                 state: StateDir | None = None) -> None:
        self._resolve_node = resolve_node
        self._nursery = nursery
        # abspath, not realpath: resolving it would stat the mount from the thread that serves it
        self._mountpoint = os.path.abspath(mountpoint) if mountpoint else None
        self._source_dir = os.path.abspath(source_dir) if source_dir else None
        self._persistence = Persistence(state)
        self.jobs: dict[str, MirrorJob] = {}
        #: files in use -> who uses them: a running job's target and bitmap, and a target a
        #: local pivot made an image's backing file (keyed by that node); see ``paths``.
        self._claims: dict[object, dict[object, str]] = {}
        self._listeners: list[Callable[[str, dict], None]] = []
        self._lock = trio.Lock()
        self._pivoting = PivotReservations()

    # ------------------------------------------------------------------ events

    def add_listener(self, listener: Callable[[str, dict], None]) -> None:
        self._listeners.append(listener)

    def emit(self, event: str, data: dict) -> None:
        for listener in list(self._listeners):
            try:
                listener(event, data)
            except Exception:  # a broken listener must not break the job that emitted
                log.exception("event listener failed for %s", event)

    # ------------------------------------------------------------------ queries

    def query(self) -> list[dict]:
        return [job.info() for job in self.jobs.values()]

    def get(self, job_id: Any) -> MirrorJob:
        """The job named by its job id, or by its image when that image has one job.

        Raises:
            JobNotFoundError: no job has that id or image.
            UsageError: the image has several jobs: the caller must name one by its id.
        """
        if isinstance(job_id, str) and job_id in self.jobs:
            return self.jobs[job_id]
        of_image = sorted(j.id for j in self.jobs.values() if j.params.image == job_id)
        running = [i for i in of_image if not self.jobs[i].finished]
        if len(of_image) > 1 and len(running) == 1:  # the others failed and stay listed
            of_image = running
        if len(of_image) == 1:
            return self.jobs[of_image[0]]
        if of_image:
            raise UsageError(f"image {job_id!r} has {len(of_image)} mirror jobs "
                             f"({', '.join(of_image)}): name one by its job id")
        known = ", ".join(sorted(self.jobs)) or "none"
        raise JobNotFoundError(f"no mirror job {job_id!r} (jobs: {known})")

    # ------------------------------------------------------------------ starting

    async def start_mirror(self, params: MirrorParams) -> MirrorJob:
        """Start a job. Everything is checked before anything is created: the image has one
        name, and no path the job names leads into the mount, onto an image or onto another
        job's file (``paths``, resolved off the trio thread). If the start fails after that,
        whatever it created or opened is undone (``undo``, in reverse order).

        An NBD target that cannot be reached now does not stop the start: the job starts with
        its target lost and reconnects with the usual backoff (only a target wrong for good is
        refused). A persistent job is recorded in the state directory before it runs; the
        record goes again if the start fails.

        Raises:
            UsageError: unknown image, an image with a second name, bad target or bitmap path,
                mismatched bitmap, a target locked by another program or wrong for good,
                ``persistent`` without a state directory.
            StateError: the image or job id already has a running job.
            SourceError: the image cannot be read.
            StateDirError: the record cannot be saved.
        """
        if params.persistent:
            params = self._persistence.params(params)
        return await self._start(params, None)

    async def reattach(self, record: JobRecord) -> MirrorJob:
        """Start a persistent job again from its record (a mount with ``--state-dir``): a
        ``--sync dirty`` resume from its bitmap, whether or not its target answers now.

        Raises:
            as ``start_mirror``: a bitmap that does not match, a target wrong for good.
        """
        return await self._start(self._persistence.reattach_params(record), record)

    async def _start(self, params: MirrorParams, record: JobRecord | None) -> MirrorJob:
        """``start_mirror``; ``record``: the saved record of a job being re-attached."""
        async with self._lock:
            old = self.jobs.get(params.job_id)
            if old is not None and not old.finished:
                extra = (" (the default, the image's name: a second job of an image needs its "
                         "own --job-id)" if params.job_id == params.image else "")
                raise StateError(f"job id {params.job_id!r} is in use{extra}; give another job-id")
            if self._source_dir is not None:
                # Before the node is looked up: that follows a symlink, on the trio thread.
                links = await paths.run_resolver(paths.image_links, self._source_dir, params.image)
                if links is not None:
                    paths.check_image_links(links)
            node = self._resolve_node(params.image)
            siblings = group.live_jobs(node)
            if node.job is not None and not node.job.finished and not siblings:
                # what serves an image pivoted to NBD: the image is no file here any more
                raise StateError(f"cannot mirror {params.image!r}: {node.job.id} serves it from "
                                 f"its NBD target for the rest of this mount")
            if record is None and len(siblings) >= MAX_JOBS_PER_IMAGE:  # a re-attach was let in once
                raise StateError(f"image {params.image!r} has {len(siblings)} mirror jobs, the "
                                 f"most one image may have; end one of them first")
            claims = await self._check_paths(params, node)
            source_stat = os.stat(node.backing_path)
            size = source_stat.st_size
            if size == 0:
                raise UsageError(f"image {params.image!r} is empty: there is nothing to mirror")
            async with contextlib.AsyncExitStack() as undo:
                target = await self._open_target(params, size, undo, like=source_stat)
                bitmap_is_new = params.bitmap is not None and params.sync != "dirty" \
                    and not os.path.lexists(params.bitmap)
                # In a thread: it resolves paths (canonical identities) and fsyncs the file.
                bitmap, params = await trio.to_thread.run_sync(
                    self._make_bitmap, params, node, target, size)
                undo.callback(_undo_bitmap, bitmap, params.bitmap if bitmap_is_new else None,
                              resumed=params.sync == "dirty")
                journal, found, journal_is_new = await trio.to_thread.run_sync(
                    _make_journal, params, node, target, size)
                if journal is not None:
                    undo.callback(_undo_journal, journal, journal_is_new)
                replica = initial_replica(params.sync, flagged=bitmap.inconsistent,
                                          verify=params.verify_resync, dirty=bitmap.count() > 0,
                                          background=params.copy_mode == "background",
                                          journal=found)
                if params.persistent and record is None:
                    await self._persistence.save(params, size, undo)
                job = MirrorJob(params, node, target, bitmap, size=size, emit=self.emit,
                                end_lock=self._lock, journal=journal, replica=replica,
                                gate=siblings[0].gate if siblings else None)
                undo.callback(self._forget, job, old)
                self.jobs[params.job_id] = job
                self._claims[job] = dict(claims)
                await self._nursery.start(self._run_job, job)
                undo.pop_all()  # started: the job owns all of it now
            log.info("job %s: mirroring %s to %s (sync %s%s)", job.id, params.image,
                     target.description, params.sync,
                     "" if job.target_ok else "; the target is not reachable yet")
            return job

    def _forget(self, job: MirrorJob, previous: MirrorJob | None) -> None:
        """Undo a job's registration; a failed job it replaced is listed again."""
        if self.jobs.get(job.id) is job:
            del self.jobs[job.id]
        self._claims.pop(job, None)
        if previous is not None and job.id not in self.jobs:
            self.jobs[job.id] = previous

    async def _run_job(self, job: MirrorJob, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        try:
            await job.run(task_status=task_status)
        except Exception as exc:
            if job.status == "created":
                raise  # not started: the error goes to start_mirror, which undoes the start
            # The last line of failure containment: this job ends, the mount goes on.
            log.error("BUG: job %s ended by an unexpected error; it fails, the mount goes on",
                      job.id, exc_info=exc)
            async with self._lock:
                job.abandon(f"internal error: {type(exc).__name__}: {exc}")
        finally:
            # Completed and cancelled jobs disappear (auto-dismiss); a failed one stays listed
            # with its error until a new job replaces it, so the user can see why it ended.
            if job.error is None and self.jobs.get(job.id) is job:
                del self.jobs[job.id]
            claims = self._claims.pop(job, {})
            if job.node.backing_path == job.params.target:
                # Pivoted: the target is the image's file now, and no other job may write it.
                self._claims[job.node] = {key: "file" for key, what in claims.items()
                                          if what == "target"}
            if job.successor is None:  # a forwarder serves the image from the target now
                with trio.CancelScope(shield=True):
                    await job.target.close()

    async def _open_target(self, params: MirrorParams, size: int,
                           undo: contextlib.AsyncExitStack, *,
                           like: os.stat_result | None = None) -> Target:
        """Connect the job's target (creating a local one if asked, with the mode and owner of
        ``like``); ``undo`` gets the steps that close it again and remove a file created here."""
        if params.is_nbd:
            from ..targets.nbd import NBDTarget  # imported lazily: only NBD jobs need it

            if params.create:
                raise UsageError("an NBD target cannot be created; drop --create / mode=absolute-paths")
            # The image's size is the target's from the start: a server that is away now is
            # checked when it first answers (the reconnect fails the job if it differs).
            target: Target = NBDTarget(params.target, expected_size=size)
            undo.push_async_callback(_close_target, target)
            try:
                await target.connect()
            except TargetFatalError as exc:
                raise UsageError(f"cannot use target {params.target}: {exc}") from None
            except TargetError as exc:
                # Away for now (refused, no socket, timeout): the job starts without it.
                log.warning("job %s: target %s cannot be reached now (%s); the job starts and "
                            "connects when it answers", params.job_id, target.description, exc)
            return target
        from ..targets.local import LocalFileTarget

        path = params.target
        # In a thread: a path that leads into our own mount would otherwise deadlock the trio
        # thread, which is the one that answers requests on the mount.
        created = await trio.to_thread.run_sync(check_local_target, path, params.create,
                                                size, like)
        if created is not None:
            undo.callback(_remove_created, path, created)
        target = LocalFileTarget(path, expected_size=size)
        undo.push_async_callback(_close_target, target)
        try:
            await target.connect()
        except TargetError as exc:
            raise UsageError(f"cannot use target {path!r}: {exc}") from None
        return target

    async def _check_paths(self, params: MirrorParams, node: Any) -> list[tuple[object, str]]:
        """Refuse a target, bitmap, socket or certificate directory that leads into the mount,
        onto an image or onto another job's file (``paths``); before anything is created.

        Returns:
            (key, role) of every file this job will write, to record as claimed.
        """
        written: list[tuple[str, str]] = []
        looked_at: list[tuple[str, str]] = []
        nbd_key = None
        if params.is_nbd:
            address = parse_nbd_uri(params.target)
            nbd_key = ("nbd", address.uri)
            if address.socket_path:
                looked_at.append(("NBD socket", address.socket_path))
            if address.tls_certificates:
                looked_at.append(("TLS certificate directory", address.tls_certificates))
        else:
            if not os.path.isabs(params.target):
                raise UsageError(f"target {params.target!r} must be an absolute path or an NBD URI")
            written.append(("target", params.target))
        if params.bitmap is not None:
            written.append(("bitmap", params.bitmap))
        if params.journal is not None:
            written.append(("journal", params.journal))
        everything = written + looked_at
        mountpoint, source_dir = self._mountpoint, self._source_dir

        def survey() -> tuple[tuple[str, int | None] | None, str | None, paths.Resolved,
                              list[paths.Resolved]]:
            mount = paths.mount_place(mountpoint) if mountpoint else None
            source_real = os.path.realpath(source_dir) if source_dir else None
            return (mount, source_real, paths.resolve(node.backing_path),
                    [paths.resolve(path) for _, path in everything])

        mount, source_real, source, resolved = await paths.run_resolver(survey)
        claimed: dict[object, str] = {}
        for owner, owner_claims in self._claims.items():
            for key, what in owner_claims.items():
                claimed[key] = (f"the {what} of job {owner.id!r}" if isinstance(owner, MirrorJob)
                                else f"the file of image {owner.relpath!r}")
        if nbd_key is not None and nbd_key in claimed:
            raise UsageError(f"target {params.target!r} is already {claimed[nbd_key]}; "
                             f"give another target")
        mount_real, mount_dev = mount if mount is not None else (None, None)
        places = paths.Places(mount_real, mount_dev, source_real, source, params.image, claimed)
        claims: list[tuple[object, str]] = [(nbd_key, "target")] if nbd_key is not None else []
        for (what, _), found in zip(everything, resolved):
            is_written = (what, found.given) in written
            paths.check_path(what, found, places, written=is_written)
            if is_written:
                # This job's own files must differ too (a bitmap on its target).
                for key in paths.claim_keys(found):
                    claimed[key] = f"this job's {what}"
                    claims.append((key, what))
        return claims

    def _make_bitmap(self, params: MirrorParams, node: Any, target: Target, size: int
                     ) -> tuple[Any, MirrorParams]:
        """The job's initial work: every cluster (full), the allocated extents (top), the
        interrupted job's bitmap (dirty; every cluster with verify-resync) or nothing (none).

        Blocking (paths, fsync): runs in a worker thread. A persistent bitmap it opened is closed
        again if anything after the open fails.
        """
        from ..bitmap.memory import DirtyBitmap
        from ..bitmap.persistent import PersistentBitmap

        # Before the bitmap exists: nothing may fail once it holds its file's lock.
        try:
            extents = allocated_extents(node.backing_path, size) if params.sync == "top" else []
        except OSError as exc:
            raise SourceError(f"cannot find the allocated extents of image {params.image!r}: "
                              f"{exc.strerror}", errno=exc.errno) from None
        if params.bitmap is None:
            bitmap = DirtyBitmap(size, params.granularity)
        else:
            source_id, target_id = bitmap_identities(node.backing_path, target)
            if params.sync == "dirty":
                if not os.path.lexists(params.bitmap):
                    raise UsageError(f"bitmap {params.bitmap!r} does not exist")
                bitmap = PersistentBitmap.open(params.bitmap, size=size, source_id=source_id,
                                               target_id=target_id, verify=params.verify_resync)
                params = dataclasses.replace(params, granularity=bitmap.granularity)
            else:
                if not os.path.isdir(os.path.dirname(params.bitmap)):
                    raise UsageError(f"bitmap directory {os.path.dirname(params.bitmap)!r} does not exist")
                bitmap = PersistentBitmap.create(params.bitmap, size, params.granularity,
                                                 source_id=source_id, target_id=target_id,
                                                 fill=params.sync == "full")
        if params.sync == "full" and bitmap.volatile:
            bitmap.set_all()
        for offset, length in extents:
            bitmap.mark(offset, length)
        return bitmap, params

    # ------------------------------------------------------------------ simple commands

    async def pause(self, job_id: str) -> None:
        await self.get(job_id).pause()

    def resume(self, job_id: str) -> None:
        self.get(job_id).resume()

    def set_speed(self, job_id: str, speed: int) -> None:
        job = self.get(job_id)
        if job.finished:
            raise StateError(f"job {job_id!r} has ended")
        job.set_speed(speed)

    def verify(self, job_id: str, *, repair: bool = False, speed: int = 0) -> None:
        """Start an online verify of a job (``verify.py``); its event reports the outcome.

        Raises:
            JobNotFoundError: no such job.
            StateError: the job's target cannot be read now, or it is being verified.
        """
        self.get(job_id).start_verify(repair=repair, speed=speed)

    async def complete(self, job_ids: Iterable[str], *, pivot: bool = True) -> None:
        await self.transaction([Action("complete", j, pivot=pivot) for j in job_ids])

    async def cancel(self, job_ids: Iterable[str], *, force: bool = False) -> None:
        await self.transaction([Action("cancel", j, force=force) for j in job_ids])

    # ------------------------------------------------------------------ transactions

    async def transaction(self, actions: list[Action]) -> None:
        """Run complete/cancel actions on several jobs as one all-or-nothing step at one
        point in time.

        Raises:
            UsageError: an unknown job, or a job named twice.
            StateError: a precondition fails for any job; nothing changed.
            TargetError: a target failed while converging; nothing was switched.
        """
        if not actions:
            raise UsageError("a transaction needs at least one action")
        with self._pivoting.reserve(self._pivots_of(actions)):
            await self._run_transaction(actions)

    def _pivots_of(self, actions: list[Action]) -> list[MirrorJob]:
        """The jobs ``actions`` would pivot (a name that names no job is the transaction's to
        report)."""
        found = []
        for action in actions:
            if action.kind == "complete" and action.pivot:
                try:
                    found.append(self.get(action.job_id))
                except MirrorfsError:
                    pass
        return found

    async def _run_transaction(self, actions: list[Action]) -> None:
        async with self._lock:
            jobs = [self.get(a.job_id) for a in actions]
            if len({id(j) for j in jobs}) != len(jobs):
                raise UsageError("a transaction may name each job only once")
            _check_actions(actions, jobs)
            siblings = _pivot_siblings(actions, jobs)
            for job in jobs:
                job.gate.close()
            held: list[MirrorJob] = []
            try:
                for job in jobs:
                    await job.gate.wait_drained()
                # A pivot moves the image under its other jobs too: their copies pause for it.
                for job in [*jobs, *(s for others in siblings.values() for s in others)]:
                    await job.hold_copy()
                    held.append(job)
                # The state may have moved while draining (a target lost): check again.
                _check_actions(actions, jobs)
                plans = []
                try:
                    for action, job in zip(actions, jobs):
                        plans.append(await _prepare(action, job, siblings.get(job, [])))
                    # A job may have failed while converging: its end waits for this lock,
                    # and the transaction is refused as a whole.
                    _check_actions(actions, jobs)
                except BaseException:
                    # A later action failed: undo what the earlier ones prepared (a pivot's
                    # descriptors on its target), since their switch will never run.
                    for plan in plans:
                        plan.discard()
                    raise
                for plan in plans:
                    plan.commit()
                for job in jobs:  # auto-dismiss: ended jobs leave the list at once
                    if self.jobs.get(job.id) is job:
                        del self.jobs[job.id]
                await self._persistence.drop_ended(jobs)
            finally:
                for job in held:
                    job.release_copy()
                for job in jobs:
                    job.gate.open()

    # ------------------------------------------------------------------ shutdown

    async def shutdown(self) -> None:
        """Stop every job cleanly (bitmaps flushed and closed as cleanly shut down)."""
        async with self._lock:
            for job in list(self.jobs.values()):
                try:
                    await job.stop()
                except MirrorfsError as exc:
                    log.warning("job %s: %s", job.id, exc)
                except Exception:  # the other jobs must still stop cleanly
                    log.exception("BUG stopping job %s; its bitmap may stay marked not clean",
                                  job.id)
            for job in list(self.jobs.values()):
                with trio.move_on_after(10):
                    await job.wait_ended()


def check_local_target(path: str, create: bool, size: int,
                       like: os.stat_result | None = None) -> tuple[int, int] | None:
    """Check (and with ``create``, create) a local target; returns the (st_dev, st_ino) of
    a file created here, None for an existing one."""
    from ..targets.local import LocalFileTarget

    real_dir = os.path.realpath(os.path.dirname(path))
    if not os.path.isdir(real_dir):
        raise UsageError(f"target directory {os.path.dirname(path)!r} does not exist")
    exists = os.path.exists(path)
    if exists and not os.path.isfile(path):
        raise UsageError(f"target {path!r} is not a regular file")
    if not exists:
        if not create:
            raise UsageError(f"target {path!r} does not exist; pass --create "
                             f"(mode=absolute-paths) to create it")
        try:
            LocalFileTarget.create(path, size, like=like)
            st = os.stat(path)
        except OSError as exc:
            raise UsageError(f"cannot create target {path!r}: {exc.strerror}") from None
        return st.st_dev, st.st_ino
    return None


def _check_actions(actions: list[Action], jobs: list[MirrorJob]) -> None:
    for action, job in zip(actions, jobs):
        if action.kind == "complete":
            job.check_can_complete()
        elif job.finished:
            raise StateError(f"job {job.id!r} has ended")


async def _prepare(action: Action, job: MirrorJob, siblings: list[MirrorJob]) -> Plan:
    """Do everything that can fail for one action; return the step that cannot.
    ``siblings``: the image's other jobs that go on after a pivot of ``job``."""
    if action.kind == "cancel" and (action.force or not job.ready):
        return EndPlan(lambda: job.conclude("cancelled"))
    # complete (either form) and cancel after ready: the target becomes an exact copy.
    await job.converge()
    if action.kind == "cancel" or not action.pivot:
        return EndPlan(lambda: job.conclude("completed"))
    return prepare_pivot(job, siblings)


def _pivot_siblings(actions: list[Action], jobs: list[MirrorJob]) -> dict[MirrorJob, list[MirrorJob]]:
    """For each job a transaction pivots: the other jobs of its image that go on running
    (those the transaction does not end). Checked before anything is closed.

    Raises:
        UsageError: two jobs of one image would pivot it.
        StateError: a pivot to NBD under jobs that go on (``check_pivot``).
    """
    ending = set(jobs)
    pivoting: dict[int, MirrorJob] = {}
    found: dict[MirrorJob, list[MirrorJob]] = {}
    for action, job in zip(actions, jobs):
        if action.kind != "complete" or not action.pivot:
            continue
        other = pivoting.setdefault(id(job.node), job)
        if other is not job:
            raise UsageError(f"jobs {other.id!r} and {job.id!r} would both pivot image "
                             f"{job.params.image!r}: pivot it once, and complete the other with "
                             f"pivot=false")
        found[job] = [s for s in group.live_jobs(job.node) if s not in ending]
        check_pivot(job, found[job])
    return found


def bitmap_identities(source_path: str, target: Target) -> tuple[str, str]:
    """The source and target identities a persistent bitmap records: canonical, so that another
    spelling of the same image or target matches and nothing else does.

    The source is the image file's real path; a local target its real path; an NBD target its
    URI as parsed (default port filled in, a UNIX socket's real path). Blocking: resolves paths.
    """
    return os.path.realpath(source_path), target.identity()


def _make_journal(params: MirrorParams, node: Any, target: Target, size: int
                  ) -> tuple[WriteJournal | None, JournalFound, bool]:
    """The job's journal beside its bitmap: the interrupted job's for ``--sync dirty`` (what it
    holds decides the replica's state), else a new one in place of a stale one of the same
    image and target. Blocking (fsync, paths): runs in a worker thread.

    Returns:
        the open journal (None: the job has none), what was found, whether it is new.

    Raises:
        UsageError: a file that is not this job's journal is in the way (of a new job).
    """
    path = params.journal
    if path is None:
        return None, JournalFound.NONE, False
    source_id, target_id = bitmap_identities(node.backing_path, target)
    if os.path.lexists(path):
        try:
            old = WriteJournal.open(path, image_size=size, source_id=source_id, target_id=target_id)
        except JournalFormatError as exc:
            if params.sync != "dirty":
                raise UsageError(f"{exc}; it is in the way of the job's journal") from None
            # Its records cannot be trusted: the bitmap, which holds every write, resyncs.
            log.warning("%s: the job resyncs from its bitmap", exc)
            return None, JournalFound.UNUSABLE, False
        if params.sync == "dirty":
            if old.overflowed:
                return old, JournalFound.UNUSABLE, False
            return old, (JournalFound.PENDING if old.pending else JournalFound.EMPTY), False
        old.close()  # a stale journal of this image and target: a new job starts a new one
        os.unlink(path)
    try:
        journal = WriteJournal.create(path, capacity=params.journal_size, image_size=size,
                                      source_id=source_id, target_id=target_id)
    except JournalFormatError as exc:
        raise UsageError(str(exc)) from None
    return journal, JournalFound.NONE, True


def _undo_journal(journal: WriteJournal, created: bool) -> None:
    """Release a journal a failed start opened; remove it if the start created it."""
    journal.close()
    if created:
        try:
            os.unlink(journal.path)
        except OSError as exc:
            log.warning("cannot remove journal %s created by a failed start: %s", journal.path,
                        exc.strerror)


async def _close_target(target: Target) -> None:
    with trio.CancelScope(shield=True):
        await target.close()


def _remove_created(path: str, identity: tuple[int, int]) -> None:
    """Remove a target file this start created, if that file is still the one at ``path``."""
    try:
        st = os.lstat(path)
        if (st.st_dev, st.st_ino) == identity:
            os.unlink(path)
    except OSError as exc:
        log.warning("cannot remove target %s created by a failed start: %s", path, exc.strerror)


def _undo_bitmap(bitmap: JobBitmap, created_path: str | None, *, resumed: bool) -> None:
    """Release a bitmap a failed start opened (its lock would be held until exit); remove its
    file if the start created it. A resumed file goes back to what it said (no job recorded
    anything into it); any other records that its job ended, so no --sync dirty trusts it."""
    try:
        if resumed:
            bitmap.close(clean=bitmap.was_clean)
        else:
            bitmap.close(clean=True, ended=True)
    except MirrorfsError as exc:
        log.warning("closing bitmap after a failed start: %s", exc)
    if created_path is not None:
        try:
            os.unlink(created_path)
        except OSError as exc:
            log.warning("cannot remove bitmap %s created by a failed start: %s", created_path,
                        exc.strerror)
