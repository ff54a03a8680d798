"""What the target of a job is, as a disk: the replica's states (pure, no I/O).

A job's ``JobState`` says what the job does; a ``Replica`` says whether its target is a disk the
source was at some earlier moment (a prefix of the acknowledged write stream: "consistent"), which
``__org.mirrorfs_replica-consistent`` shows. The rules are in ``docs/replication-design.md``:

- INITIAL_COPY: a full or top copy fills the target: not consistent until the job is ready.
- IN_SYNC: writes reach the target in the order they were acknowledged (duplicates on), or the
  target lags behind by a prefix that the copy loop finishes.
- JOURNALING: the target is away; every write also goes to the journal, in order.
- REPLAYING: the journal goes to the target in order, a target flush at each FLUSH record.
- RESYNCING: the bitmap drives the copy (no journal, an overflow, an unclean resume): the target
  mixes older and newer clusters until the job is ready again.
"""

from __future__ import annotations

import enum


class Replica(enum.Enum):
    INITIAL_COPY = "initial-copy"
    IN_SYNC = "in-sync"
    JOURNALING = "journaling"
    REPLAYING = "replaying"
    RESYNCING = "resyncing"

    @property
    def consistent(self) -> bool:
        """The target is a state the source had (a prefix of the acknowledged writes)."""
        return self not in (Replica.INITIAL_COPY, Replica.RESYNCING)

    @property
    def journaled(self) -> bool:
        """Writes go to the journal (and not to the target) after their source write."""
        return self in (Replica.JOURNALING, Replica.REPLAYING)


class JournalFound(enum.Enum):
    """What a starting job found of its journal file."""

    NONE = "none"  # no journal (journal-size 0, no bitmap file), or a new empty one
    EMPTY = "empty"  # an existing journal with nothing left to replay
    PENDING = "pending"  # records the target does not have yet
    UNUSABLE = "unusable"  # overflowed, refused (corrupt, another image's) or missing records


def initial_replica(sync: str, *, flagged: bool = False, verify: bool = False, dirty: bool = False,
                    background: bool = True, journal: JournalFound = JournalFound.NONE) -> Replica:
    """The replica's state when a job starts.

    Args:
        sync: the job's sync mode.
        flagged: the resumed bitmap file says INCONSISTENT (a copy driven by the bitmap was under
            way when it was closed).
        verify: a verified resync (``verify-resync``) compares and copies every cluster.
        dirty: the resumed bitmap has bits set.
        background: copy-mode background: acknowledged writes may be missing from the target
            where their bits are set, so without a journal a resumed dirty bitmap is a resync.
        journal: what the start found of the journal file.
    """
    if sync in ("full", "top"):
        return Replica.INITIAL_COPY
    if sync == "none":
        return Replica.IN_SYNC
    if flagged or verify:
        return Replica.RESYNCING
    if journal is JournalFound.PENDING:
        return Replica.JOURNALING
    if not dirty:
        return Replica.IN_SYNC
    if journal is JournalFound.UNUSABLE or background:
        return Replica.RESYNCING
    # write-blocking: a set bit is a write that was never acknowledged (it was in flight at a
    # crash), and any subset of those is a state the guest may see after a crash
    return Replica.IN_SYNC


def on_target_lost(replica: Replica, *, journal_usable: bool, window_covers_dirt: bool) -> Replica:
    """The replica's state when the target goes away.

    Args:
        journal_usable: the job has a journal that is neither overflowed nor being reset.
        window_covers_dirt: every dirty cluster belongs to a write not acknowledged yet or to one
            whose duplicate is still in the window (so the journal can continue the target's
            prefix); a cluster dirty for another reason (a skipped or conflicting duplicate) means
            the target already misses an acknowledged write.
    """
    if replica is not Replica.IN_SYNC:
        return replica  # journaling on, or inconsistent already
    if journal_usable and window_covers_dirt:
        return Replica.JOURNALING
    return Replica.RESYNCING
