"""The job's resume check: a mixin of ``MirrorJob`` that compares sampled clean clusters.

A ``--sync dirty`` job runs it before it answers writes (``_check_before_start``, from ``run``),
or, when its target was away at the start, at the target's first connect, before any copy or
duplicate writes the target (``_resume_check_at_connect``, from ``_reconnect``). Which clusters
and the refusal's wording are ``resume.py``'s.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Awaitable, Callable, Sequence

from ..errors import StateError, TargetError, UsageError
from . import resume
from .core import JobCore
from .resume import Mismatch


log = logging.getLogger("mirrorfs.mirror.job")

ReadFn = Callable[[int, int], Awaitable[bytes]]


async def first_mismatch(samples: Sequence[int], *, granularity: int, size: int,
                         read_source: ReadFn, read_target: ReadFn,
                         still_clean: Callable[[int], bool] = lambda c: True) -> Mismatch | None:
    """Compare each sampled cluster of image and target; the first that differs, or None.

    ``still_clean``: asked after the reads; a cluster that was written meanwhile (dirty now) is
    not evidence either way and is skipped.

    Raises:
        SourceError, TargetError: a read failed.
    """
    for n, cluster in enumerate(samples, 1):
        offset = cluster * granularity
        length = min(granularity, size - offset)
        if length <= 0:
            continue
        source = await read_source(offset, length)
        target = await read_target(offset, length)
        if source != target and still_clean(cluster):
            return Mismatch(cluster, offset, length, n, len(samples))
    return None


class ResumeCheck(JobCore):
    """The resume check of a ``MirrorJob``, and what ``on-mismatch`` makes of it.

    The class it is mixed into provides what is declared here (``MirrorJob.__init__`` sets the
    attributes; the job and ``FailureHandling`` provide the methods).
    """

    # -- its own part of the job's state, besides JobCore's; it reads both (and, for ``finished``, ``resume_check_pending``,
    # ``behind_since`` and ``stats``, changes)
    resume_check_pending: bool

    if TYPE_CHECKING:  # the job's: a real stub here would shadow it in the job's MRO
        async def _attach_drained(self) -> None: ...
        def _detach_node(self) -> None: ...
        def _close_bitmap(self, *, clean: bool, pivoted: bool = False,
                          ended: bool = False) -> None: ...
        def _fail(self, message: str) -> None: ...

    async def _check_before_start(self) -> None:
        """The resume check of a start: attached with the gate closed, so every write is
        recorded and none lands on a sampled cluster while it runs; writes wait until it ends.

        A refusal closes the bitmap as it was found (its ctime noted) before the waiting writes
        go on, unrecorded, to the source: a later resume then sees that the image changed.

        Raises:
            StateError: a sampled clean cluster differs and ``on-mismatch`` is ``refuse``.
            UsageError: the target cannot be read.
            SourceError: the image cannot be read.
        """
        self.gate.close()
        try:
            await self._attach_drained()
            await self.node.wait_passthrough_idle()
            try:
                await self._check_resume()
            except TargetError as exc:
                raise UsageError(f"cannot use target {self.target.description}: {exc}") from None
        except BaseException:
            self.finished = True
            self._close_bitmap(clean=self.bitmap.was_clean)
            self._detach_node()
            raise
        finally:
            self.gate.open()

    async def _check_resume(self) -> None:
        """Compare sampled clean clusters of image and target and apply ``on-mismatch``.

        Raises:
            StateError: a cluster differs and ``on-mismatch`` is ``refuse``.
            TargetError, SourceError: a read failed (the check is still pending).
        """
        g = self.params.granularity
        samples = resume.pick_samples(self.bitmap, self.bitmap.recent_cleared(),
                                      resume.RANDOM_SAMPLES, resume.seeded_rng())
        found = await first_mismatch(
            samples, granularity=g, size=self.size, read_source=self.copy.read_source,
            read_target=self.target.pread, still_clean=lambda c: not self.bitmap.is_dirty(c * g, 1))
        self.resume_check_pending = False
        self.stats["resume-samples"] = len(samples) if found is None else found.compared
        if found is None:
            log.info("job %s: resume check: the %d sampled clean clusters are equal on the "
                     "target", self.id, len(samples))
            return
        if self.params.on_mismatch != "full":
            raise StateError(resume.mismatch_message(self.id, self.params.image,
                                                     self.target.description, self.params.bitmap,
                                                     found))
        log.warning("job %s: cluster %d differs on the target although the bitmap calls it "
                    "clean; on-mismatch full: copying every cluster", self.id, found.cluster)
        self.bitmap.set_all()
        if self.behind_since is None:
            self.behind_since = time.time_ns()
        self.copy.dirtied()

    async def _resume_check_at_connect(self) -> None:
        """A target that was away at the start is checked at its first connect, before any
        copy or duplicate writes it; a refused mismatch fails the job.

        Raises:
            TargetError: the target went away again (the check stays pending).
        """
        if self.resume_check_pending:
            try:
                await self._check_resume()
            except StateError as exc:
                self._fail(str(exc))
