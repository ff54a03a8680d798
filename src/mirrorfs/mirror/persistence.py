"""Persistent jobs on the engine's side: the bridge between the job manager and the mount's state
directory (``state/``).

``Persistence`` turns ``mirror --persistent`` parameters into a record (bitmap and journal in the
state directory unless ``--bitmap`` names another place), saves it before the job runs (a failed
start removes it again), turns a record back into the parameters of a ``--sync dirty`` re-attach,
and removes the record and the journal of a job that ended by ``cancel`` or ``complete``. The
blocking calls (``StateDir.save/remove``, unlink) run in worker threads.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
from typing import Iterable

import trio

from ..errors import MirrorfsError, UsageError
from ..state.directory import StateDir
from ..state.record import JobRecord
from .job import MirrorJob
from .params import MirrorParams

log = logging.getLogger("mirrorfs.mirror.manager")


class Persistence:
    """The persistent jobs of one mount.

    Args:
        state: the mount's open state directory; None: ``persistent`` is refused.
    """

    def __init__(self, state: StateDir | None) -> None:
        self._state = state

    def params(self, params: MirrorParams) -> MirrorParams:
        """A persistent job's parameters: its bitmap defaults to the state directory's.

        Raises:
            UsageError: the mount has no state directory.
        """
        if self._state is None:
            raise UsageError("a persistent job is recorded in the mount's state directory, and "
                             "this mount has none: mount with --state-dir DIR (-o state_dir=DIR)")
        if params.bitmap is None:
            state_dir = self._state
            params = dataclasses.replace(params, bitmap=state_dir.bitmap_path(params.job_id),
                                         journal_path=state_dir.journal_path(params.job_id))
        return params

    @staticmethod
    def reattach_params(record: JobRecord) -> MirrorParams:
        """The parameters that resume a recorded job from its bitmap (and its journal)."""
        return MirrorParams(image=record.image, target=record.target, job_id=record.job_id,
                            sync="dirty", granularity=record.granularity, bitmap=record.bitmap,
                            speed=record.speed, copy_mode=record.copy_mode,
                            on_target_error=record.on_target_error, persistent=True,
                            journal_size=record.journal_size if record.journal else 0,
                            journal_path=record.journal)

    async def save(self, params: MirrorParams, size: int,
                   undo: contextlib.AsyncExitStack) -> None:
        """Record a job about to start; ``undo`` gets the step that removes the record again.

        Raises:
            StateDirError: the record cannot be saved (the start fails).
        """
        state = self._state
        assert state is not None and params.bitmap is not None
        journal = params.journal
        record = JobRecord(job_id=params.job_id, image=params.image, image_size=size,
                           target=params.target, bitmap=params.bitmap, journal=journal,
                           granularity=params.granularity, copy_mode=params.copy_mode,
                           on_target_error=params.on_target_error, speed=params.speed,
                           journal_size=params.journal_size if journal else 0,
                           created_at=time.time_ns())
        await trio.to_thread.run_sync(state.save, record)
        undo.callback(_remove_quietly, state, record.job_id)

    async def drop_ended(self, jobs: Iterable[MirrorJob]) -> None:
        """Jobs that ``cancel`` or ``complete`` ended (their bitmaps closed as ended): their
        records and journals go. A failure is logged: the job has ended either way."""
        state = self._state
        if state is None:
            return
        for job in jobs:
            if not job.params.persistent or job.outcome not in ("completed", "cancelled"):
                continue
            journal = job.params.journal
            try:
                await trio.to_thread.run_sync(state.remove, job.id)
                if journal is not None:
                    await trio.to_thread.run_sync(_unlink_missing_ok, journal)
            except (MirrorfsError, OSError) as exc:
                log.warning("job %s ended, but its record stays: %s", job.id, exc)


def _remove_quietly(state: StateDir, job_id: str) -> None:
    try:
        state.remove(job_id)
    except MirrorfsError as exc:
        log.warning("undoing a failed start: %s", exc)


def _unlink_missing_ok(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
