"""Several jobs on one image: one guest write, every job's bitmap, every job's target.

While one job runs on an image the node's ``job`` slot holds that ``MirrorJob`` and nothing here
is on the request path. A second job that attaches puts a ``JobGroup`` in the slot instead; it
does what one job's write path does, once for the source and once per job for the rest: every
job marks its bitmap before the source write, the source is written once, and then each job
duplicates to its own target, the write-blocking ones awaited side by side, the background ones
as their own tasks. So a slow or lost target holds up only the writer waiting for it: a lost one
is not written at all (its job journals or marks the write), and the guest waits only for the
targets of write-blocking jobs. When all but one job have ended the slot holds that job again.

All jobs of an image share one I/O gate (the first job's, handed to the next by the manager), so
a transaction or a pivot that closes it quiesces the image for every job. A request that waited
at the closed gate goes on through whatever serves the image once it opens (``serve_held``):
the job set may have changed meanwhile (a job ended, attached, pivoted).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Awaitable, Callable

import trio

from .. import fileio
from ..errors import StateError
from .seams import Handle, Node
from .writes import source_pread, source_pwrite

if TYPE_CHECKING:
    from .gate import IOGate
    from .job import MirrorJob


def live_jobs(node: Node) -> list[MirrorJob]:
    """The jobs that serve ``node`` now (none, one, or a group's)."""
    from .job import MirrorJob  # here: the job module imports this one

    io = node.job
    if isinstance(io, JobGroup):
        return [job for job in io.jobs if not job.finished]
    return [io] if isinstance(io, MirrorJob) and not io.finished else []


def attach(node: Node, job: MirrorJob) -> None:
    """From now on ``job`` sees every request of ``node`` (idempotent). The caller made sure no
    request is inside the image's gate, or that the job is the image's only one."""
    io = node.job
    if io is job or (isinstance(io, JobGroup) and job in io.jobs):
        return
    if isinstance(io, JobGroup):
        io.jobs.append(job)
    elif io is None or io.finished:
        node.job = job
    else:
        node.job = JobGroup(node, [io, job])  # type: ignore[list-item]


def detach(node: Node, job: MirrorJob) -> None:
    """``job`` no longer sees the requests of ``node``; a group of one becomes that job."""
    io = node.job
    if io is job:
        node.job = None
    elif isinstance(io, JobGroup) and job in io.jobs:
        io.jobs.remove(job)
        if len(io.jobs) == 1:
            node.job = io.jobs[0]
        elif not io.jobs:
            node.job = None


#: How each request is served where no job (nor successor) is attached any more.
_PASSTHROUGH: dict[str, Callable[..., Awaitable[Any]]] = {
    "read": lambda handle, offset, size: source_pread(handle, size, offset),
    "write": lambda handle, offset, data: source_pwrite(handle, data, offset),
    "fsync": lambda handle, datasync: fileio.fsync(handle.fd, datasync),
}


async def serve_held(node: Node, kind: str, handle: Handle, *args: Any) -> Any:
    """A request (``kind``: read, write or fsync, with its arguments after the handle) that
    passed the image's gate, served by whatever serves the image now: a job or a group inside
    the gate (``read_held`` ...), a successor after a pivot to NBD (``read`` ...), or the
    source."""
    io = node.job
    if io is None:
        return await _PASSTHROUGH[kind](handle, *args)
    serve = getattr(io, f"{kind}_held", None) or getattr(io, kind)
    return await serve(handle, *args)


class JobGroup:
    """Every job of one image, as the one ``ImageIO`` the FUSE layer calls.

    Args:
        node: the image's node.
        jobs: the jobs, in the order they attached; they share one gate.
    """

    def __init__(self, node: Node, jobs: list[MirrorJob]) -> None:
        self.node = node
        self.jobs = jobs
        self.gate: IOGate = jobs[0].gate

    @property
    def id(self) -> str:
        return ", ".join(job.id for job in self.jobs)

    @property
    def finished(self) -> bool:
        return all(job.finished for job in self.jobs)

    def _live(self) -> list[MirrorJob]:
        return [job for job in self.jobs if not job.finished]

    # ------------------------------------------------------------------ the FUSE seam

    async def read(self, handle: Handle, offset: int, size: int) -> bytes:
        if not self.gate.closed and handle.runs_inline(size):
            return fileio.pread_now(handle.fd, size, offset)
        async with self.gate.hold():
            return await serve_held(self.node, "read", handle, offset, size)

    async def write(self, handle: Handle, offset: int, data: bytes) -> int:
        if not self.gate.closed and handle.runs_inline(len(data)):
            written = self._write_inline(handle, offset, data)
            if written is not None:
                return written
        async with self.gate.hold():
            return await serve_held(self.node, "write", handle, offset, data)

    async def fsync(self, handle: Handle, datasync: bool = False) -> None:
        async with self.gate.hold():
            await serve_held(self.node, "fsync", handle, datasync)

    def check_modify(self, op: str) -> None:
        live = self._live()
        if live:
            names = ", ".join(repr(job.id) for job in live)
            raise StateError(f"cannot {op} {live[0].params.image!r}: mirror jobs {names} are "
                             f"running on it; complete or cancel them first")

    # ------------------------------------------------------------------ inside the gate

    async def read_held(self, handle: Handle, offset: int, size: int) -> bytes:
        return await source_pread(handle, size, offset)

    def _write_inline(self, handle: Handle, offset: int, data: bytes) -> int | None:
        """The write without a yield, when every job can take it so (each job's inline steps,
        ``writes.py``); None, having done nothing, when one cannot."""
        live = self._live()
        length = len(data)
        plans = []
        for job in live:
            duplicate = job._inline_duplicates(offset, length)
            if duplicate is None:
                return None
            plans.append(duplicate)
        begun: list[tuple[MirrorJob, Any, Any, bool]] = []
        try:
            for job, duplicate in zip(live, plans):
                op, edges = job._inline_begin(offset, length)
                begun.append((job, op, edges, duplicate))
            written = fileio.pwrite_now(handle.fd, data, offset)
        except BaseException:
            for job, op, _, _ in begun:
                job._abandon(op, offset, length)
            raise
        payload = data if written == length else data[:written]
        for job, op, edges, duplicate in begun:
            job._inline_end(op, edges, offset, length, payload, duplicate)
        return written

    async def write_held(self, handle: Handle, offset: int, data: bytes) -> int:
        """Mark every job, write the source once, and duplicate to every job's target.

        Where the source write waits for a device, the write-blocking jobs' duplicates go out
        with it (``_write_both``'s halves, one per job), so the writer waits for the slowest
        device, not for the source and then the targets. Otherwise (and for jobs that do not
        duplicate now) each job's part follows the source write: a background duplicate, the
        bits left dirty, or a write-blocking duplicate, those side by side. The guest is
        answered once every write-blocking duplicate ended (failures are their jobs' business).
        """
        length = len(data)
        live = self._live()
        if length == 0 or not live:
            return await source_pwrite(handle, data, offset)
        tracking = [job for job in live if await job._grown_for(offset, length)]
        begun: list[tuple[MirrorJob, Any, Any, Any]] = []  # job, operation, edges, landing
        written = 0
        try:
            for job in tracking:
                op, edges = job._begin_write(offset, length)
                landing = (job._launch_target_write(op, offset, data, handle.direct)
                           if job._writes_alongside(handle, length) else None)
                begun.append((job, op, edges, landing))
            written = await source_pwrite(handle, data, offset)
            for _, _, _, landing in begun:
                if landing is not None:
                    await landing.done.wait()
        except BaseException:  # the target writes still end: registered until then (rule 2)
            with trio.CancelScope(shield=True):
                for _, _, _, landing in begun:
                    if landing is not None:
                        await landing.done.wait()
            for job, op, edges, landing in begun:
                if landing is not None:
                    job._both_ended(op, offset, data, written, edges, landing.error)
                else:
                    job._abandon(op)
            raise
        payload = data if written == length else data[:written]
        blocking = []
        for job, op, edges, landing in begun:
            if landing is not None:
                job._both_ended(op, offset, data, written, edges, landing.error)
            elif job._after_source_write(op, offset, payload, edges, handle.direct):
                blocking.append((job, op, edges))
        if len(blocking) == 1:
            job, op, edges = blocking[0]
            await job._blocking_duplicate(op, offset, payload, edges, handle.direct)
        elif blocking:
            async with trio.open_nursery() as nursery:  # side by side: neither waits for the other
                for job, op, edges in blocking:
                    nursery.start_soon(job._blocking_duplicate, op, offset, payload, edges,
                                       handle.direct)
        return written

    async def fsync_held(self, handle: Handle, datasync: bool) -> None:
        await flush_all(handle, datasync, self._live())


async def flush_all(handle: Handle, datasync: bool, jobs: list[MirrorJob]) -> None:
    """A guest flush: the source's and every job's (target, bitmap, journal: ``flush_job``)
    side by side. They go to different files or servers and none's durability depends on
    another's; the guest is answered once all have completed, with the source's error if any."""
    failed: list[OSError] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_source_fsync, handle.fd, datasync, failed)
        for job in jobs[1:]:
            nursery.start_soon(job.flush_job)
        if jobs:  # the first in this task: one task fewer for the common case of one job
            await jobs[0].flush_job()
    if failed:
        raise failed[0]


async def _source_fsync(fd: int, datasync: bool, failed: list[OSError]) -> None:
    """The source's part of a guest flush, its error kept for the caller (a nursery would wrap
    it in an exception group, which the FUSE layer does not map to the errno)."""
    try:
        await fileio.fsync(fd, datasync)
    except OSError as exc:
        failed.append(exc)
