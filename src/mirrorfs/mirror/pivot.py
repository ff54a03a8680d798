"""Pivots, as plans; the reservations that keep two transactions from pivoting one image; and
what serves an image after a pivot to a target that is not a local file.

A pivot is prepared under the closed gate (everything that can fail: opening descriptors on the
target) and returns a plan; the transaction then either commits every plan (nothing in a commit
can fail) or discards them all (a later action failed).

A local pivot swaps every open handle's descriptor to the target file and the node's backing path,
after which the FUSE layer needs nothing from the engine. An NBD target has no descriptor, so the
node keeps this forwarder in its ``job`` slot for the rest of the mount: reads, writes and fsyncs of
every handle go to the target, and the image cannot be truncated, unlinked or renamed.
"""

from __future__ import annotations

import contextlib
import os
from typing import TYPE_CHECKING, Callable, Iterator, Protocol, Sequence

from ..errors import StateError, TargetError
from ..targets.base import Target
from .seams import Handle

if TYPE_CHECKING:
    from .job import MirrorJob


class Plan(Protocol):
    """The part of a transaction's action that cannot fail, prepared by what can."""

    def commit(self) -> None: ...
    def discard(self) -> None: ...


class EndPlan:
    """An action that only ends the job (cancel, complete without pivot)."""

    def __init__(self, end: Callable[[], None]) -> None:
        self._end = end

    def commit(self) -> None:
        self._end()

    def discard(self) -> None:
        pass


class NbdPivot:
    """The image moves to an NBD target: a forwarder takes the job's place on the node."""

    def __init__(self, job: MirrorJob) -> None:
        self._job = job

    def commit(self) -> None:
        job = self._job
        job.conclude("completed", successor=TargetForwarder(job.target, job.params.image))

    def discard(self) -> None:
        pass


class LocalPivot:
    """The image moves to a local target file: every open handle gets a descriptor on it, and
    so does the copy of every other job of the image (``siblings``), which goes on with the
    new file as its source. Their bitmaps stay valid: under the closed gate, after the
    converge, the old file and the new one are identical.

    Raises (from the constructor, having changed nothing):
        StateError: the target cannot be opened.
    """

    def __init__(self, job: MirrorJob, siblings: Sequence[MirrorJob] = ()) -> None:
        self._job = job
        self._siblings = list(siblings)
        self._fds: dict[int, int] = {}
        self._sibling_fds: list[int] = []
        target_path = job.params.target
        try:
            # The target must still be there and writable even when no handle is open now:
            # every later open of the image goes to it.
            os.close(os.open(target_path, os.O_RDWR | os.O_CLOEXEC))
            for fh, handle in job.node.handles.items():
                # As the FUSE layer opens the source: O_APPEND is the kernel's business (it
                # passes the end-of-file offset), and with pwrite it would misplace every write.
                flags = handle.flags & ~(os.O_APPEND | os.O_NOCTTY)
                self._fds[fh] = os.open(target_path, flags | os.O_CLOEXEC)
            for _ in self._siblings:
                self._sibling_fds.append(os.open(target_path, os.O_RDONLY | os.O_CLOEXEC))
            # what the siblings' bitmaps record as the image's file from now on
            self._source_id = os.path.realpath(target_path)
        except OSError as exc:
            self.discard()
            raise StateError(f"cannot pivot {job.params.image!r} to {target_path!r}: "
                             f"{exc.strerror}") from None

    def commit(self) -> None:
        node = self._job.node
        for fh, handle in node.handles.items():
            old = handle.fd
            handle.fd = self._fds.pop(fh)
            os.close(old)
        node.backing_path = self._job.params.target
        for sibling, fd in zip(self._siblings, self._sibling_fds):
            sibling.source_moved(fd, self._source_id)
        self._sibling_fds.clear()
        self._job.conclude("completed", pivoted=True)

    def discard(self) -> None:
        for fd in [*self._fds.values(), *self._sibling_fds]:
            os.close(fd)
        self._fds.clear()
        self._sibling_fds.clear()


def prepare_pivot(job: MirrorJob, siblings: list[MirrorJob]) -> Plan:
    """Prepare the switch of ``job``'s image to its target (under the closed gate, the copies
    of the image's other jobs, ``siblings``, held).

    Raises:
        StateError: the target cannot be opened; or it is an NBD export and the image has
            other jobs (their copies read the source from a file).
    """
    check_pivot(job, siblings)
    return LocalPivot(job, siblings) if not job.params.is_nbd else NbdPivot(job)


def check_pivot(job: MirrorJob, siblings: list[MirrorJob]) -> None:
    """Refuse a pivot to an NBD target while other jobs go on on the image: their copies read
    the image from a file, and after such a pivot it is no file any more.

    Raises:
        StateError: so.
    """
    if siblings and job.params.is_nbd:
        raise StateError(f"cannot pivot {job.params.image!r} to the NBD target of job {job.id!r} "
                         f"while job(s) {', '.join(repr(s.id) for s in siblings)} also run on it: "
                         f"end them first or in the same transaction, or complete {job.id!r} "
                         f"with pivot=false")


class PivotReservations:
    """The images that transactions are pivoting, each with its job, from the transaction's
    start (before it waits for its turn) to its end. A second pivot of such an image is refused:
    queued behind the first, it would move the image again, away from where the first put it."""

    def __init__(self) -> None:
        self._by_node: dict[object, MirrorJob] = {}

    @contextlib.contextmanager
    def reserve(self, pivots: Sequence[MirrorJob]) -> Iterator[None]:
        """Hold the images of ``pivots`` for the ``with`` block.

        Raises:
            StateError: another transaction is pivoting one of them; nothing is held.
        """
        mine: dict[object, MirrorJob] = {}
        for job in pivots:
            other = self._by_node.get(job.node)
            if other is not None:
                raise StateError(f"cannot pivot {job.params.image!r} with job {job.id!r}: job "
                                 f"{other.id!r} is pivoting it now; wait until that has ended")
            mine.setdefault(job.node, job)  # two pivots of one image: the transaction says so
        self._by_node.update(mine)
        try:
            yield
        finally:
            for node in mine:
                del self._by_node[node]


class TargetForwarder:
    """Serves an image pivoted to an NBD target (an ``ImageIO``): every request goes to the
    target, whichever handle it comes through."""

    finished = False

    def __init__(self, target: Target, image: str) -> None:
        self.target = target
        self.image = image
        self.id = f"{image} (pivoted)"

    async def read(self, handle: Handle, offset: int, size: int) -> bytes:
        size = max(0, min(size, self.target.size - offset))
        if size == 0:
            return b""
        try:
            return await self.target.pread(offset, size)
        except TargetError as exc:
            raise OSError(exc.errno, f"target {self.target.description}: {exc}") from None

    async def write(self, handle: Handle, offset: int, data: bytes) -> int:
        if offset + len(data) > self.target.size:
            raise OSError(28, "write beyond the end of the NBD target")  # ENOSPC, as a full disk
        try:
            await self.target.pwrite(offset, data)
        except TargetError as exc:
            raise OSError(exc.errno, f"target {self.target.description}: {exc}") from None
        return len(data)

    async def fsync(self, handle: Handle, datasync: bool = False) -> None:
        try:
            await self.target.flush()
        except TargetError as exc:
            raise OSError(exc.errno, f"target {self.target.description}: {exc}") from None

    def check_modify(self, op: str) -> None:
        raise StateError(f"cannot {op} {self.image!r}: it lives on the NBD target "
                         f"{self.target.description} since its pivot")
