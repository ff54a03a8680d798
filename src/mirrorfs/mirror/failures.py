"""The job's error policies, failure and lost-target handling.

A mixin of ``MirrorJob``: ``on-target-error`` and ``on-source-error`` (QEMU's BlockdevOnError),
a failure that ends the job in its own task (``_fail``), an unexpected exception contained to
the job (``contain``), and the reconnect of a lost target.
"""

from __future__ import annotations

import errno
import logging
from typing import TYPE_CHECKING

import trio

from ..errors import (MirrorfsError, SourceError, TargetError, TargetFatalError,
                      TargetNoSpaceError, TargetRetryableError)
from .core import JobCore
from .state import JobState


log = logging.getLogger("mirrorfs.mirror.job")

#: Reconnect backoff for a lost target: doubles from the first value up to the cap (seconds).
RECONNECT_BACKOFF = (0.25, 8.0)


class FailureHandling(JobCore):
    """Errors of a ``MirrorJob``'s tasks: the policies, failing, a lost and restored target.

    The class it is mixed into provides what is declared here (``MirrorJob.__init__`` sets the
    attributes; the job provides ``_set_state``).
    """

    # -- its own part of the job's state, besides JobCore's; it reads both (and, for ``error``, ``io_status``, ``target_ok`` and
    # ``_reconnecting``, changes)
    _reconnecting: bool


    if TYPE_CHECKING:  # the job's and other mixins': a real stub here would shadow them
        def _set_state(self, new: JobState) -> None: ...
        async def _resume_check_at_connect(self) -> None: ...
        def _start_journal(self) -> None: ...
        def _begin_replay(self) -> None: ...
        def _target_back(self) -> None: ...
        def _enter_resync(self, reason: str) -> None: ...

    def on_target_error(self, exc: TargetError) -> str | None:
        """Apply ``on-target-error``; returns the action taken (None: none, or a lost target)."""
        if self.error is not None or self.finished:
            return None
        if isinstance(exc, TargetRetryableError):
            self._target_lost(exc)
            return None
        nospace = isinstance(exc, TargetNoSpaceError) or exc.errno == errno.ENOSPC
        if isinstance(exc, TargetFatalError):
            action = "report"
        else:
            action = _policy_action(self.params.on_target_error, nospace)
        self._apply_error_action(action, "write", exc, nospace)
        return action

    def on_source_error(self, exc: SourceError) -> str | None:
        """Apply ``on-source-error`` (QEMU's rules: a failed read of the source by the copy);
        returns the action taken. The range stays dirty in every case."""
        if self.error is not None or self.finished:
            return None
        nospace = exc.errno == errno.ENOSPC
        action = _policy_action(self.params.on_source_error, nospace)
        self._apply_error_action(action, "read", exc, nospace)
        return action

    def _apply_error_action(self, action: str, operation: str, exc: MirrorfsError,
                            nospace: bool) -> None:
        side = "source" if operation == "read" else "target"
        log.warning("job %s: %s error (%s): %s", self.id, side, action, exc)
        self._emit("BLOCK_JOB_ERROR", {"device": self.id, "operation": operation, "action": action})
        if operation == "write" and action in ("ignore", "stop"):
            # the cluster is copied again later, out of the order it was written in
            self._enter_resync(f"target write error: {exc}")
        if action == "ignore":
            return
        self.io_status = "nospace" if nospace else "failed"
        if action == "stop":
            if not self.paused:
                self._set_state(JobState.STANDBY if self.ready else JobState.PAUSED)
            return
        self._fail(str(exc))

    def contain(self, exc: Exception, where: str) -> None:
        """An unexpected exception in one of the job's tasks: fail this job, not the mount."""
        log.error("BUG in job %s (%s); the job fails, the mount goes on", self.id, where,
                  exc_info=exc)
        self._fail(f"internal error in {where}: {type(exc).__name__}: {exc}")

    def _fail(self, message: str) -> None:
        """End the job as failed (the ``report`` policy); the job's own task finishes it.
        The first reason stays the job's error."""
        if self.error is not None or self.finished:
            return
        if self.io_status == "ok":
            self.io_status = "failed"
        self.error = message
        if self._cancel_scope is not None:
            self._cancel_scope.cancel()

    def _target_lost(self, exc: TargetError) -> None:
        if not self.target_ok:
            return
        self.target_ok = False
        self.stats["outages"] += 1
        log.warning("job %s: target %s lost: %s", self.id, self.target.description, exc)
        if self.ready:  # standby: still paused, no longer ready
            self._set_state(JobState.PAUSED if self.paused else JobState.RUNNING)
        self._start_journal()  # before any other write is acknowledged
        self._emit("MIRROR_TARGET_LOST", {"device": self.id, "target": self.target.description,
                                          "reason": str(exc)})
        if not self._reconnecting and self._nursery is not None:
            self._reconnecting = True
            self._nursery.start_soon(self._reconnect)

    async def _reconnect(self) -> None:
        delay, cap = RECONNECT_BACKOFF
        try:
            while True:
                await trio.sleep(delay)
                try:
                    await self.target.connect()
                    await self._resume_check_at_connect()
                except TargetFatalError as exc:
                    self._emit("BLOCK_JOB_ERROR", {"device": self.id, "operation": "write",
                                                   "action": "report"})
                    self._fail(str(exc))
                    return
                except TargetError as exc:
                    log.info("job %s: reconnect failed: %s", self.id, exc)
                    delay = min(cap, delay * 2)
                    continue
                if self.error is not None:  # the resume check refused the target
                    return
                self.stats["reconnects"] += 1
                self._emit("MIRROR_TARGET_RESTORED", {"device": self.id,
                                                      "target": self.target.description})
                if self.replica.journaled:
                    self._begin_replay()  # the target is the replay's until it caught up
                else:
                    self._target_back()
                return
        except Exception as exc:
            self.contain(exc, "the reconnect task")
        finally:
            self._reconnecting = False


def _policy_action(policy: str, nospace: bool) -> str:
    """The action of an ``on-*-error`` policy for one error (QEMU's BlockdevOnError)."""
    if policy == "enospc":
        return "stop" if nospace else "report"
    return policy
