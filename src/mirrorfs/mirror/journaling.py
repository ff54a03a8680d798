"""The job's replica: journal while the target is away, replay it in order when it is back.

A mixin of ``MirrorJob`` (``docs/replication-design.md``). The job's attributes it owns, set in
``MirrorJob.__init__``: ``replica``, the replica's state (``replica.py``), changed only here, in
``_set_replica``; ``journal``, the job's ``WriteJournal`` (None: the job has none); ``_window``,
the background duplicates in flight in acknowledgement order (only with a journal). The hooks:

- ``_target_lost`` (failures.py) calls ``_start_journal``: a consistent replica with a usable
  journal enters JOURNALING (in background mode, the duplicates still in flight go first, in
  acknowledgement order); anything else RESYNCING.
- the write paths (writes.py) end a write the target did not get in ``_abandon(...,
  missed=...)``, which calls ``_journal_write`` after the source write and before the
  acknowledgement while the replica is journaled: nothing of this runs on the in-sync write path.
- ``fsync`` calls ``_journal_flush``: the guest's flush is acknowledged once the journal is durable.
- ``_reconnect`` calls ``_begin_replay``: the ordered replay (``replay.py``) runs with the copy
  loop and the duplicates held (``target_ok`` stays False); at the catch-up journaling stops at
  once, the target is the job's again, and the journal is emptied.
- ``become_ready`` calls ``_replica_ready``: the end of an initial copy or a resync.

The guest never sees a journal error: a full or failing journal makes the job resync from its
bitmap (RESYNCING), which holds every write.
"""

from __future__ import annotations

import collections
import logging
import os
from typing import TYPE_CHECKING, Any

import trio

from ..errors import JournalFormatError, JournalFullError, MirrorfsError, TargetError
from .core import JobCore
from .replay import finish_journal, replay_journal
from .replica import Replica, initial_replica, on_target_lost


log = logging.getLogger("mirrorfs.mirror.job")

#: The event of a replica that stops being a state the source had.
INCONSISTENT_EVENT = "__org.mirrorfs_REPLICA_INCONSISTENT"


class WindowEntry:
    """A background duplicate in flight: acknowledged to the guest, maybe not on the target."""

    __slots__ = ("offset", "data", "landed")

    def __init__(self, offset: int, data: bytes) -> None:
        self.offset = offset
        self.data = data
        self.landed = False


class Journaling(JobCore):
    """The replica of a ``MirrorJob``: its state, the journal hooks and the replay task.

    The class it is mixed into provides what is declared here (``MirrorJob.__init__`` sets the
    attributes and calls ``_init_journaling``; the job and the other mixins provide the methods).
    """

    # -- its own part of the job's state, besides JobCore's; it reads both (and, for ``replica``, ``target_ok``, ``journal`` and the
    # ``_journal_*`` fields, changes)
    _journal_syncs: int
    _journal_idle: trio.Event
    _journal_resetting: bool
    _close_after_reset: bool | None

    if TYPE_CHECKING:  # the job's and other mixins': a real stub here would shadow them
        def contain(self, exc: Exception, where: str) -> None: ...
        def _target_lost(self, exc: TargetError) -> None: ...
        def _bitmap_write_failed(self, exc: OSError) -> None: ...

    def _initial_replica(self) -> Replica:
        """What the sync mode and the bitmap say (the manager, which sees the journal, passes
        its own)."""
        return initial_replica(self.params.sync, flagged=self.bitmap.inconsistent,
                               verify=self.params.verify_resync, dirty=self.bitmap.count() > 0,
                               background=self.params.copy_mode == "background")

    def _init_journaling(self) -> None:
        self._journal_syncs = 0
        self._journal_idle = trio.Event()
        self._journal_idle.set()
        #: the journal is being emptied in a worker thread: it must not be appended to (nor
        #: closed: the job's end leaves that to the reset, ``_close_after_reset``)
        self._journal_resetting = False
        self._close_after_reset: bool | None = None
        #: journal records the current outage's replay wrote to the target
        self.stats["replayed-records"] = 0

    # ------------------------------------------------------------------ state

    def _start_replica(self) -> None:
        """At the job's start: an inconsistent replica says so before the copy writes its first
        cluster; a journal with records goes to the target before anything else does."""
        if not self.replica.consistent:
            self._flag_inconsistent(f"{self.replica.value} at the start of the job")
        elif self.replica.journaled:
            self.target_ok = False
            if self.target.connected:
                self._begin_replay()

    def _replica_info(self) -> dict[str, Any]:
        """The job's fields about its replica (``info()``)."""
        return {"__org.mirrorfs_target-connected": self.target_ok or self.replica is Replica.REPLAYING,
                "__org.mirrorfs_replica-state": self.replica.value,
                "__org.mirrorfs_replica-consistent": self.replica.consistent}

    def _resumed_replica(self) -> None:
        """A user's resume: writes made while paused are not on the target."""
        if self.bitmap.count() and self.replica is Replica.IN_SYNC:
            self._enter_resync("writes made while paused")

    def _set_replica(self, new: Replica, reason: str = "") -> None:
        old = self.replica
        if new is old:
            return
        self.replica = new
        log.info("job %s: replica %s -> %s%s", self.id, old.value, new.value,
                 f" ({reason})" if reason else "")

    def _flag_inconsistent(self, reason: str) -> None:
        """The bitmap file says INCONSISTENT (msync'ed) and the event goes out."""
        try:
            self.bitmap.set_inconsistent(True)
        except OSError as exc:
            self._bitmap_write_failed(exc)
        self._emit(INCONSISTENT_EVENT, {"device": self.id, "state": self.replica.value,
                                        "reason": reason})

    def _enter_resync(self, reason: str) -> None:
        """From a consistent replica to RESYNCING, before the copy writes a cluster (a replay
        under way stops at its next record and hands the target back)."""
        if self.replica.consistent:
            self._set_replica(Replica.RESYNCING, reason)
            self._flag_inconsistent(reason)

    def _replica_ready(self) -> None:
        """The job is ready: the target is a copy of the source again."""
        if not self.replica.consistent:
            try:
                self.bitmap.set_inconsistent(False)
            except OSError as exc:
                self._bitmap_write_failed(exc)
                return
            self._set_replica(Replica.IN_SYNC, "ready")
        journal = self.journal
        if journal is not None and (journal.overflowed or journal.next_seq != journal.header.first_seq) \
                and not self._journal_resetting and self._nursery is not None:
            self._journal_resetting = True
            self._nursery.start_soon(self._reset_journal)

    # ------------------------------------------------------------------ the window

    def _window_add(self, offset: int, data: bytes) -> WindowEntry | None:
        if self._window is None:
            return None
        entry = WindowEntry(offset, data)
        self._window.append(entry)
        return entry

    def _window_landed(self, entry: WindowEntry) -> None:
        entry.landed = True
        window = self._window
        while window and window[0].landed:
            window.popleft()

    def _window_covers_dirt(self) -> bool:
        """Every dirty cluster is one of a write not acknowledged yet (registered, its source
        write or duplicate in flight) or of a duplicate still in the window."""
        shift = self.params.granularity.bit_length() - 1
        covered = self.inflight.guest_writes()
        for entry in self._window or ():
            if not entry.landed:
                covered.append((entry.offset >> shift,
                                (entry.offset + max(len(entry.data), 1) - 1) >> shift))
        merged: list[list[int]] = []  # disjoint, not touching: a run is covered inside one
        for lo, hi in sorted(covered):
            if merged and lo <= merged[-1][1] + 1:
                merged[-1][1] = max(merged[-1][1], hi)
            else:
                merged.append([lo, hi])
        for offset, length in self.bitmap.runs():
            first, last = offset >> shift, (offset + length - 1) >> shift
            if not any(lo <= first and last <= hi for lo, hi in merged):
                return False
        return True

    # ------------------------------------------------------------------ journaling

    def _start_journal(self) -> None:
        """The target was lost (no await since): journal from here, or resync."""
        if self.replica is not Replica.IN_SYNC:
            return  # journaling on already, or inconsistent anyway
        journal = self.journal
        usable = journal is not None and not journal.overflowed and not self._journal_resetting
        new = on_target_lost(self.replica, journal_usable=usable,
                             window_covers_dirt=usable and self._window_covers_dirt())
        window, self._window = self._window, (collections.deque() if journal is not None else None)
        if new is Replica.RESYNCING:
            reason = ("the job has no journal" if journal is None else
                      "its journal is not usable" if not usable else
                      "the target already missed acknowledged writes")
            self._enter_resync(f"target lost and {reason}")
            return
        if new is not Replica.JOURNALING:
            return
        self._set_replica(Replica.JOURNALING, "target lost")
        for entry in window or ():
            if not entry.landed:
                self._journal_write(entry.offset, entry.data)

    def _journal_write(self, offset: int, data: bytes) -> None:
        """After the source write, before the acknowledgement."""
        try:
            self.journal.append_write(offset, data)
        except MirrorfsError as exc:  # JournalFullError; a journal closed by the job's end
            self._journal_failed(exc)

    async def _journal_flush(self) -> None:
        """The guest flushed: while the writes go to the journal, a FLUSH record, and the
        journal durable before the acknowledgement."""
        if not self.replica.journaled:
            return
        journal = self.journal
        self._journal_syncs += 1
        if self._journal_idle.is_set():
            self._journal_idle = trio.Event()
        try:
            journal.append_flush(sync=False)
            await trio.to_thread.run_sync(journal.sync)
        except MirrorfsError as exc:
            self._journal_failed(exc)
        finally:
            self._journal_syncs -= 1
            if not self._journal_syncs:
                self._journal_idle.set()

    def _journal_failed(self, exc: Exception) -> None:
        if self.replica.journaled:
            log.warning("job %s: %s", self.id, exc)
            self._enter_resync(f"journal: {exc}")

    # ------------------------------------------------------------------ replay

    def _begin_replay(self) -> None:
        """The target is connected again and the journal holds what it misses."""
        self._set_replica(Replica.REPLAYING, "target back")
        assert self._nursery is not None
        self._nursery.start_soon(self._replay)

    def _target_back(self) -> None:
        """The target is the copy loop's and the duplicates' again."""
        self.target_ok = True
        self.copy.poke()

    async def _replay(self) -> None:
        journal = self.journal
        try:
            while True:
                last = await replay_journal(journal, self.target, going=self._replaying,
                                            on_record=self._replayed)
                if last is not None or not self.paused or not self._replaying(paused_too=True):
                    break
                while self.paused and self._replaying(paused_too=True):  # a user's pause
                    await trio.sleep(0.05)
        except TargetError as exc:
            self._replay_lost(exc)
            return
        except (JournalFormatError, JournalFullError) as exc:
            log.warning("job %s: %s", self.id, exc)
            self._enter_resync(f"journal: {exc}")
        except Exception as exc:
            if not self.finished:  # an end closes the journal under a replay about to stop
                self.contain(exc, "the journal replay")
            return
        else:
            if last is not None:
                # Caught up, with no await since the last record: stop journaling right here.
                self._set_replica(Replica.IN_SYNC, f"journal replayed through record {last}")
        if self.error is None and not self.finished:
            self._target_back()
        if self.replica is Replica.IN_SYNC and not self._journal_resetting:
            self._journal_resetting = True
            await self._reset_journal()

    def _replaying(self, paused_too: bool = False) -> bool:
        return (self.replica is Replica.REPLAYING and self.error is None and not self.finished
                and (paused_too or not self.paused))

    def _replayed(self, record: Any) -> None:
        self.stats["replayed-records"] += 1

    def _replay_lost(self, exc: TargetError) -> None:
        """The target failed during the replay: journal on; the next reconnect replays on from
        the last applied mark."""
        if self.replica is Replica.REPLAYING:
            self._set_replica(Replica.JOURNALING, "target lost during the replay")
        if self.error is not None or self.finished:
            return
        # The target was the replay's: lost now as any target is (events, reconnect); a
        # journaling replica stays so, and an overflow meanwhile resyncs once it is back.
        self.target_ok = True
        self._target_lost(exc)

    async def _reset_journal(self) -> None:
        """Empty the journal once the target holds every record (after a catch-up or a resync),
        in a thread, while nothing appends (``_start_journal`` resyncs instead meanwhile)."""
        journal = self.journal
        try:
            while self._journal_syncs:  # a guest flush's fsync of this journal
                await self._journal_idle.wait()
            if self.replica.journaled or journal is None or journal.closed:
                return
            await trio.to_thread.run_sync(finish_journal, journal)
        except MirrorfsError as exc:
            log.warning("job %s: cannot empty journal: %s; the next outage resyncs", self.id, exc)
        finally:
            self._journal_resetting = False
            if self._close_after_reset is not None:
                self._close_journal(remove=self._close_after_reset)

    def _close_journal(self, *, remove: bool) -> None:
        """The job ends (``remove``: its journal file goes) or stops for an unmount (kept, synced)."""
        journal = self.journal
        if journal is None or journal.closed:
            return
        if self._journal_resetting:  # its worker thread still uses the file: it closes it after
            self._close_after_reset = remove
            return
        try:
            journal.close()
        except OSError as exc:
            log.warning("job %s: closing journal %s: %s", self.id, journal.path, exc.strerror)
        if remove:
            try:
                os.unlink(journal.path)
            except OSError as exc:
                log.warning("job %s: cannot remove journal %s: %s", self.id, journal.path,
                            exc.strerror)
