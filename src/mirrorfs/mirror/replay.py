"""The ordered replay of a write journal to a target that is back (``docs/replication-design.md``).

One record at a time, in order: a WRITE is written, a ZERO zeroed, and at a FLUSH the target is
flushed and the journal marks the records up to it applied (durably, before any later record
reaches the target: a replay after a crash must never write an older record over a newer one).
So at every instant the target is the source as of some earlier acknowledged write.

The journal follows the writer: records appended while the replay runs are replayed too. The loop
returns once the target holds and has flushed every record, with no await between its last check
and its return, so the caller can stop journaling at that exact point. Runs on the engine's trio
thread (``replay()`` and ``truncate_to`` read and append to the page cache); the fsync of the
applied mark runs in a worker thread.
"""

from __future__ import annotations

from typing import Any, Awaitable, Callable, Protocol

import trio

from ..journal.format import Kind


class ReplayTarget(Protocol):
    async def pwrite(self, offset: int, data: Any, *, direct: bool = False) -> None: ...
    async def write_zeroes(self, offset: int, length: int) -> None: ...
    async def flush(self) -> None: ...


async def _in_thread(fn: Callable[[], None]) -> None:
    await trio.to_thread.run_sync(fn)


async def replay_journal(journal: Any, target: ReplayTarget, *,
                         going: Callable[[], bool] = lambda: True,
                         run_sync: Callable[[Callable[[], None]], Awaitable[None]] = _in_thread,
                         on_record: Callable[[Any], None] | None = None) -> int | None:
    """Replay ``journal`` (a ``WriteJournal``) to ``target`` until caught up.

    Args:
        going: checked before each record; False stops the replay where it is (the job left
            the replaying state: an overflow, a failure).
        run_sync: runs a blocking call (the journal's fsync) off the event loop.
        on_record: called after each record reached the target (statistics).

    Returns:
        the sequence number of the last record on the target and flushed (None: stopped by
        ``going`` first). Every record the journal holds is then on the target.

    Raises:
        TargetError: the target failed; the records up to the last APPLIED mark are on it.
        JournalFormatError: a record changed on disk.
        JournalFullError: the APPLIED mark did not fit.
    """
    last = journal.applied_through
    while True:
        for record in journal.replay():
            if record.seq <= last:
                continue  # written already, since the last applied mark
            if not going():
                return None
            if record.kind is Kind.WRITE:
                await target.pwrite(record.offset, record.payload)
            elif record.kind is Kind.ZERO:
                await target.write_zeroes(record.offset, record.length)
            else:  # FLUSH: the guest flushed here; nothing after it may land before
                await target.flush()
                journal.truncate_to(record.seq, sync=False)
                await run_sync(journal.sync)
            last = record.seq
            if on_record is not None:
                on_record(record)
        if not going():
            return None
        await target.flush()
        # No await from here to the return: the caller stops journaling at this very point.
        if not journal.has_records_after(last):
            return last


def finish_journal(journal: Any) -> None:
    """After a catch-up or a resync: mark every record applied, then start the journal empty
    (the next outage begins a new one). Blocking: run it in a thread while nothing appends."""
    if not journal.overflowed and journal.next_seq - 1 > journal.applied_through:
        journal.truncate_to(journal.next_seq - 1)
    journal.reset()
