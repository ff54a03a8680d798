"""The job's one path to its end: a mixin of ``MirrorJob``.

A job ends in ``_end`` only, with one of four outcomes: ``completed`` and ``cancelled`` (a
transaction's commit, ``conclude``), ``failed`` (in the job's own task, ``_finish_failed``, or
``abandon`` after its task died) and ``stopped`` (an unmount, ``stop``). Except ``abandon``, every
caller has first quiesced the job (``_quiesced``, or a transaction's closed gates and
``hold_copy``), so nothing of the job is in flight while its bitmap and journal close.
"""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, AsyncIterator

import trio

from .core import JobCore
from .seams import ImageIO
from .state import JobState

log = logging.getLogger("mirrorfs.mirror.job")


class Ending(JobCore):
    """How a ``MirrorJob`` ends: the outcomes, the events, closing the bitmap and the journal.

    The class it is mixed into provides what is declared here (``MirrorJob.__init__`` sets the
    attributes; the job and ``Journaling`` provide the methods).
    """

    # -- its own part of the job's state, besides JobCore's; it reads both (and, for ``finished``, ``outcome``, ``successor``,
    # ``io_status`` and ``error``, changes)
    outcome: str | None
    successor: ImageIO | None

    if TYPE_CHECKING:  # the job's and other mixins': a real stub here would shadow them
        def _set_state(self, new: JobState) -> None: ...
        def _event_data(self) -> dict: ...
        def _detach_node(self) -> None: ...
        def _close_journal(self, *, remove: bool) -> None: ...
        async def hold_copy(self) -> None: ...
        def release_copy(self) -> None: ...
        async def _flush_and_commit(self, *, strict: bool = False) -> None: ...

    def conclude(self, kind: str, *, pivoted: bool = False,
                 successor: ImageIO | None = None) -> None:
        """End the job under the closed gate (a transaction's commit).

        ``kind`` is "completed" or "cancelled". ``successor``: what serves the image from now on
        (a pivot to NBD); it keeps the target open.
        """
        self._end(kind, pivoted=pivoted or successor is not None, successor=successor)

    def _end(self, outcome: str, *, clean: bool = True, pivoted: bool = False,
             successor: ImageIO | None = None) -> None:
        """The one way a job ends; every caller has quiesced the job (or its task is gone).

        ``outcome``: completed, cancelled, failed, or stopped (an unmount: no events, and the
        bitmap file does not say ended, so a later ``--sync dirty`` may resume from it).
        ``clean``: every write so far is recorded (False after an unexpected death).
        """
        self.finished = True
        self.outcome = outcome
        if outcome != "stopped":
            self._detach_node()
        if successor is not None:
            self.successor = successor
            self.node.job = successor
        if outcome == "failed":
            if self.io_status == "ok":
                self.io_status = "failed"
            if self.error is None:
                self.error = "job failed"
        self._close_bitmap(clean=clean, pivoted=pivoted, ended=outcome != "stopped")
        if outcome == "stopped":
            if self._nursery is not None:
                self._nursery.cancel_scope.cancel()
            return
        self._set_state(JobState.CONCLUDED)
        event = "BLOCK_JOB_CANCELLED" if outcome == "cancelled" else "BLOCK_JOB_COMPLETED"
        data = self._event_data()
        if self.error is not None:
            data["error"] = self.error
        self._emit(event, data)
        if outcome == "failed":  # stays listed with its error (no auto-dismiss)
            return
        self._set_state(JobState.NULL)
        if self._cancel_scope is not None:
            self._cancel_scope.cancel()
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    def _close_bitmap(self, *, clean: bool, pivoted: bool = False, ended: bool = False) -> None:
        """Close the bitmap and the journal; ``ended``: the job ended (not an unmount), so a
        persistent file must say that it stopped recording, and the journal goes. Idempotent."""
        self._close_journal(remove=ended)
        try:
            self.bitmap.close(clean=clean, pivoted=pivoted, ended=ended)
        except Exception as exc:  # a bitmap that cannot be closed stays marked unclean
            log.warning("job %s: closing bitmap: %s", self.id, exc)

    @asynccontextmanager
    async def _quiesced(self) -> AsyncIterator[None]:
        """The job's own point in time: no request inside the gate, no copy, durable point or
        operation in flight, until the block ends."""
        self.gate.close()
        try:
            await self.gate.wait_drained()
            await self.hold_copy()
            try:
                await self.inflight.wait_idle()
                yield
            finally:
                self.release_copy()
        finally:
            self.gate.open()

    async def _finish_failed(self) -> None:
        """End a failed job in order (its own task, under the manager's lock): every request
        and operation in flight done, then the bitmap closed with what it recorded."""
        async with self._quiesced():
            self._end("failed")
            with trio.CancelScope(shield=True):
                await self.target.close()

    def abandon(self, message: str) -> None:
        """End the job at once as failed, after its task died of an unexpected error (the
        manager's last line of failure containment). Requests may still be in flight, so the
        bitmap is left marked not clean, as after a crash."""
        if not self.finished:
            if self.error is None:
                self.error = message
            self._end("failed", clean=False)
        self.gate.open()

    async def stop(self) -> None:
        """End the job for an unmount: no events, bitmap closed cleanly with its dirty bits."""
        if self.finished:
            return
        async with self._quiesced():
            if self.target_ok:
                await self._flush_and_commit()  # a target error is the policy's business
            self._end("stopped")
