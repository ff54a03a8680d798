"""The recovery point of a job: a mixin of ``MirrorJob``.

How old the oldest write not yet on the target is, the bytes behind, and the ``max-lag`` tick
with its two events. Computed when asked: nothing here runs on the write path. Two sources:

- while the replica is journaling or replaying, the journal: the oldest write not on the target
  is its oldest record not yet applied (``WriteJournal.oldest_pending_ns``), which moves forward
  as the replay marks records applied;
- otherwise ``behind_since``, kept by the job: set at the start when there is work and by the
  first write that is not duplicated, cleared when the job is ready and settled.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import trio

from .core import JobCore


log = logging.getLogger("mirrorfs.mirror.job")


class RecoveryPoint(JobCore):
    """The recovery point of a ``MirrorJob`` and its ``max-lag`` events.

    The class it is mixed into provides what is declared here (``MirrorJob.__init__`` sets the
    attributes; ``FailureHandling`` provides ``contain``).
    """

    # -- its own part of the job's state, besides JobCore's; it reads both (and, for ``_lag_exceeded``, changes)
    _lag_exceeded: bool

    if TYPE_CHECKING:  # the job's: a real stub here would shadow it in the job's MRO
        def contain(self, exc: Exception, where: str) -> None: ...

    def recovery_point_age(self, now: int) -> float:
        """Seconds from the oldest write not yet on the target to ``now`` (ns since the epoch,
        the journal's clock); 0 in sync. The one source of the recovery point for status and
        events."""
        journal = self.journal
        if journal is not None and self.replica.journaled:
            since = journal.oldest_pending_ns()  # None: every acknowledged write is on the target
        else:
            since = self.behind_since
        return 0.0 if since is None else max(0, now - since) / 1e9

    def bytes_behind(self) -> int:
        """Bytes the target lacks: the dirty clusters (which include writes in flight).

        While the replica is journaling or replaying, the journal's records not yet applied lie
        in dirty clusters (their bits stay set through the replay), so they add only what the
        clusters do not count: a range written N times is N writes for the replay to send.
        """
        dirty = self.bitmap.dirty_bytes()
        journal = self.journal
        if journal is not None and self.replica.journaled:
            return max(dirty, journal.pending_bytes())
        return dirty

    async def _watch_lag(self) -> None:
        """The job's tick for ``max-lag``: one event when the recovery point gets older than it,
        one when it is back under."""
        limit = self.params.max_lag
        tick = min(1.0, max(0.05, limit / 4))
        try:
            while True:
                await trio.sleep(tick)
                age = self.recovery_point_age(time.time_ns())
                if (age > limit) == self._lag_exceeded:
                    continue
                self._lag_exceeded = age > limit
                data = {"device": self.id, "recovery-point-age": round(age, 3), "max-lag": limit}
                if self._lag_exceeded:
                    log.warning("job %s: recovery point %.1f s old, more than max-lag %g s",
                                self.id, age, limit)
                    self._emit("__org.mirrorfs_MAX_LAG_EXCEEDED", data)
                else:
                    log.info("job %s: recovery point back under max-lag", self.id)
                    self._emit("__org.mirrorfs_MAX_LAG_RECOVERED", data)
        except Exception as exc:
            self.contain(exc, "the max-lag check")
