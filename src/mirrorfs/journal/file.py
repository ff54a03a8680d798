"""The write journal file in use: append while the target is away, replay in order when it is back.

Format: ``docs/journal-format.md`` (codec in ``format.py``). Blocking and synchronous: the engine
appends from its one thread (a pwritev into the page cache) and runs :meth:`WriteJournal.sync`
(fsync) in a worker thread, which is safe beside further appends: a sync covers what was
appended before it was called.

Durability (the crash-consistency argument, in full in ``docs/journal-format.md``):

* a record is one ``pwritev`` into the page cache before ``append_*`` returns, so a SIGKILL of
  mirrorfs loses no appended record;
* :meth:`append_flush` fsyncs the file after appending the FLUSH record, before it returns; the
  engine acknowledges the guest's flush only then, so a power loss keeps every record up to the
  last acknowledged flush;
* whatever else a crash leaves at the end (a torn record, stale or garbage bytes) fails the
  record checks and is cut off when the journal is opened again: the journal is always a prefix
  of the appended records, in order, with no gap.

Overflow: an append that does not fit the bound (``capacity``) or fails (ENOSPC, EIO) marks the
journal overflowed in the header block's state word, fsynced, and raises
:class:`JournalFullError`; so does every later append until :meth:`reset`. An overflowed journal
misses writes: the job resyncs from its bitmap instead, and a reopened journal says so.

One job at a time: the file is held with ``flock(LOCK_EX)`` while open, is created exclusively
with mode 0600 and is never opened through a symbolic link.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import stat
import threading
import time
from array import array
from collections.abc import Iterator
from typing import Any

from ..bitmap.persistent import _still_names, atomic_write
from ..errors import BitmapFormatError, JournalFormatError, JournalFullError, UsageError, reason_of
from ..units import parse_size
from . import format as fmt
from .format import Kind, Record

log = logging.getLogger(__name__)

#: ``--journal-size`` when not given.
DEFAULT_SIZE = 1 << 30


def parse_journal_size(text: str | int | None) -> int:
    """``--journal-size``: a SIZE, 0 for no journal, DEFAULT_SIZE when None.

    Raises:
        UsageError: not a size, or too small to hold the largest record.
    """
    if text is None:
        return DEFAULT_SIZE
    size = parse_size(text, what="journal size")
    if 0 < size < fmt.MIN_CAPACITY:
        raise UsageError(f"invalid journal size {text}: at least {fmt.MIN_CAPACITY} bytes "
                         f"(1 MiB and a page), or 0 to turn the journal off")
    return size


def _open_error(path: str, exc: OSError) -> JournalFormatError:
    if exc.errno == errno.ELOOP:
        return JournalFormatError(f"journal {path} is a symbolic link: give the path of the file itself")
    if exc.errno == errno.EEXIST:
        return JournalFormatError(f"journal {path} exists already: remove it or give another path")
    return JournalFormatError(f"cannot open journal {path}: {exc.strerror}")


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


class WriteJournal:
    """An open journal file: build one with :meth:`create` or :meth:`open`.

    Attributes:
        path: the file.
        header: its header as last written.
        discarded_bytes: bytes of torn or invalid tail cut off when it was opened.
    """

    path: str
    header: fmt.JournalHeader
    discarded_bytes: int

    def __init__(self, path: str, fd: int, header: fmt.JournalHeader, state: int) -> None:
        """Take over ``fd`` (open, locked) holding ``header``; for :meth:`create` and
        :meth:`open`, which have checked the file."""
        self.path = path
        self._stats = {"writes": 0, "zeroes": 0, "flushes": 0, "fsyncs": 0, "bytes": 0}
        self._start(fd, header, state)

    # -- construction -----------------------------------------------------------------------------
    @classmethod
    def create(cls, path: str | os.PathLike[str], *, capacity: int, image_size: int,
               source_id: str, target_id: str, first_seq: int = 1) -> "WriteJournal":
        """Create an empty journal (exclusively, mode 0600) and open it.

        Raises:
            UsageError: a field cannot be represented (capacity below the minimum, identity).
            JournalFormatError: something is at ``path`` already, or it cannot be written.
        """
        path = os.fspath(path)
        header = fmt.JournalHeader(image_size=image_size, capacity=capacity, first_seq=first_seq,
                                   created_at=time.time_ns(), source_id=source_id,
                                   target_id=target_id)
        block = fmt.encode_header(header)  # refuses bad fields before anything is created
        try:
            fd = atomic_write(path, [block], keep_locked=True)
        except OSError as exc:
            raise _open_error(path, exc) from None
        assert fd is not None
        return cls(path, fd, header, fmt.STATE_OK)

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, image_size: int, source_id: str,
             target_id: str) -> "WriteJournal":
        """Open an existing journal, check that it belongs to this job, and cut off its torn tail.

        Raises:
            JournalFormatError: missing, a link, not a regular file, in use, not a journal, a
                corrupt header, or made for another image or target.
        """
        path = os.fspath(path)
        try:
            # O_NONBLOCK: opening a FIFO planted at the path must not hang
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            raise _open_error(path, exc) from None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise JournalFormatError(f"journal {path} is not a regular file")
            if not _try_lock(fd):
                raise JournalFormatError(f"journal {path} is in use by a running job (it is "
                                         f"locked): stop that job first, or use another journal file")
            if not _still_names(path, fd):
                raise JournalFormatError(f"journal {path} was replaced while it was opened: try again")
            block = os.pread(fd, fmt.RECORDS_OFFSET, 0)
            header, state = fmt.decode_header(block, name=path)
            if len(block) < fmt.RECORDS_OFFSET:
                raise JournalFormatError(f"journal {path} is truncated ({len(block)} bytes, the "
                                         f"header block is {fmt.RECORDS_OFFSET}): remove the "
                                         f"journal; the job resyncs from its bitmap")
            fmt.check_match(header, size=image_size, source_id=source_id, target_id=target_id,
                            name=path)
        except BaseException:
            os.close(fd)
            raise
        self = cls(path, fd, header, state)
        try:
            self._recover()
        except BaseException:
            self.close()
            raise
        return self

    def _start(self, fd: int, header: fmt.JournalHeader, state: int) -> None:
        """Take over ``fd`` (open, locked) holding ``header`` and no record indexed yet."""
        self._fd = fd  # holds the flock while the journal is open
        self.header = header
        self._overflowed = state != fmt.STATE_OK
        self._end = fmt.RECORDS_OFFSET
        self._offsets = array("Q")  # file offset of record first_seq + i
        self._times = array("Q")
        self._kinds = array("B")
        #: bytes of the WRITE and ZERO records up to and including record first_seq + i
        self._data_through = array("Q")
        self._applied = header.first_seq - 1  # records up to here are on the target
        # File offset up to which an fsync covers the records: appends run on the engine's
        # thread while an fsync of earlier ones may run in a worker thread.
        self._synced_end = self._end
        self._sync_lock = threading.Lock()
        self._closed = False
        self.discarded_bytes = 0

    def _recover(self) -> None:
        """Index every valid record and cut the file after the last one."""
        size = os.fstat(self._fd).st_size
        pos = fmt.RECORDS_OFFSET
        while True:
            head = os.pread(self._fd, fmt.RECORD_HEADER_SIZE, pos)
            rec = fmt.decode_record_header(head, expected_seq=self.next_seq)
            if rec is None or pos + rec.size > size:
                break
            payload = os.pread(self._fd, rec.payload_length, pos + fmt.RECORD_HEADER_SIZE)
            if not fmt.check_payload(head, rec, payload):
                break
            if rec.kind is Kind.APPLIED:
                if rec.offset < self._applied:
                    break  # applied marks never go back: this is not a record mirrorfs wrote
                self._applied = rec.offset
            self._index(pos, rec.time_ns, rec.kind, rec.length)
            pos += rec.size
        self._end = pos
        self._synced_end = pos
        self.discarded_bytes = size - pos
        if size != pos:
            log.info("journal %s: cut off %d bytes after its last whole record (seq %d)",
                     self.path, size - pos, self.next_seq - 1)
            os.ftruncate(self._fd, pos)
            os.fsync(self._fd)

    # -- state ------------------------------------------------------------------------------------
    @property
    def capacity(self) -> int:
        """The bound on the file's size in bytes."""
        return self.header.capacity

    @property
    def used(self) -> int:
        """Bytes the file takes now (header block and records)."""
        return self._end

    @property
    def overflowed(self) -> bool:
        """Whether a write was missed: replay is not enough, the bitmap must resync."""
        return self._overflowed

    @property
    def next_seq(self) -> int:
        """The sequence number the next record gets."""
        return self.header.first_seq + len(self._offsets)

    @property
    def applied_through(self) -> int:
        """Records up to this sequence number are on the target (see :meth:`truncate_to`)."""
        return self._applied

    def _unapplied(self) -> Iterator[int]:
        """Indexes of the WRITE, ZERO and FLUSH records not yet applied."""
        for i in range(self._applied + 1 - self.header.first_seq, len(self._kinds)):
            if self._kinds[i] != Kind.APPLIED:
                yield i

    @property
    def pending(self) -> int:
        """Records replay still has to yield."""
        return sum(1 for _ in self._unapplied())

    def has_records_after(self, seq: int) -> bool:
        """Whether a WRITE, ZERO or FLUSH record newer than ``seq`` exists (replay is behind)."""
        start = max(seq + 1, self._applied + 1) - self.header.first_seq
        return any(self._kinds[i] != Kind.APPLIED for i in range(max(0, start), len(self._kinds)))

    def oldest_pending_ns(self) -> int | None:
        """When the oldest record not yet on the target was appended (ns since the epoch): the
        recovery point. None when every record is applied."""
        for i in self._unapplied():
            return self._times[i]
        return None

    def pending_bytes(self) -> int:
        """Bytes the WRITE and ZERO records not yet applied write to the target (a range written
        twice counts twice: the replay writes it twice)."""
        applied = self._applied + 1 - self.header.first_seq  # records before this index
        if not self._data_through:
            return 0
        return self._data_through[-1] - (self._data_through[applied - 1] if applied > 0 else 0)

    # -- appending --------------------------------------------------------------------------------
    def _append(self, kind: Kind, offset: int, length: int, payload: bytes | memoryview = b"") -> int:
        if self._closed:
            raise UsageError(f"journal {self.path} is closed")
        if self._overflowed:
            raise JournalFullError(f"journal {self.path} overflowed: resync from the bitmap, then "
                                   f"reset it")
        seq = self.next_seq
        now = time.time_ns()
        head = fmt.encode_record(kind, seq, offset, length, now, payload)
        size = len(head) + len(payload)
        if self._end + size > self.capacity:
            self._overflow(f"it would exceed its size bound of {self.capacity} bytes")
        try:
            written = os.pwritev(self._fd, [head, payload], self._end)
            if written != size:
                raise OSError(errno.ENOSPC, "short write")
        except OSError as exc:
            self._overflow(exc.strerror or str(exc))
        self._index(self._end, now, kind, length)
        self._end += size
        return seq

    def _index(self, pos: int, time_ns: int, kind: Kind, length: int) -> None:
        """Remember the next record (at file offset ``pos``) in memory."""
        self._offsets.append(pos)
        self._times.append(time_ns)
        self._kinds.append(kind)
        data = length if kind in (Kind.WRITE, Kind.ZERO) else 0
        self._data_through.append((self._data_through[-1] if self._data_through else 0) + data)

    def _overflow(self, why: str) -> None:
        """Mark the journal overflowed, durably, and raise JournalFullError."""
        self._overflowed = True
        message = f"journal {self.path} is full ({why}): the job resyncs from its bitmap"
        try:
            os.pwrite(self._fd, fmt.STATE_STRUCT.pack(fmt.STATE_OVERFLOWED), fmt.STATE_OFFSET)
            os.fsync(self._fd)
        except OSError as exc:
            message += f"; marking it overflowed failed too ({exc.strerror}): do not replay it"
        raise JournalFullError(message)

    def append_write(self, offset: int, data: bytes | memoryview) -> int:
        """Append the guest's write (split into records of at most MAX_PAYLOAD bytes).

        Returns:
            the sequence number of the (last) record.

        Raises:
            JournalFullError: the journal overflowed (now or before).
        """
        view = memoryview(data)
        if not len(view):
            raise UsageError("an empty write has nothing to journal")
        seq = 0
        for start in range(0, len(view), fmt.MAX_PAYLOAD):
            seq = self._append(Kind.WRITE, offset + start, len(view[start:start + fmt.MAX_PAYLOAD]),
                               view[start:start + fmt.MAX_PAYLOAD])
        self._stats["writes"] += 1
        self._stats["bytes"] += len(view)
        return seq

    def append_zero(self, offset: int, length: int) -> int:
        """Append a zeroed or discarded range (no payload)."""
        seq = self._append(Kind.ZERO, offset, length)
        self._stats["zeroes"] += 1
        return seq

    def append_flush(self, *, sync: bool = True) -> int:
        """Append a FLUSH record and fsync the journal; acknowledge the guest's flush only after.

        ``sync=False``: append only; the caller runs :meth:`sync` (in a worker thread) before it
        acknowledges, while further appends may go on from its own thread.

        Raises:
            JournalFullError: the journal overflowed, or the fsync failed (then it is marked
                overflowed: what reached the disk is unknown).
        """
        seq = self._append(Kind.FLUSH, 0, 0)
        self._stats["flushes"] += 1
        if sync:
            self.sync()
        return seq

    def sync(self) -> None:
        """fsync what was appended before the call (free when nothing was).

        May run in a worker thread while the owning thread appends: it covers the records
        appended before it was called, and concurrent callers share an fsync where they can.
        """
        end = self._end
        if self._synced_end >= end or self._closed:
            return
        with self._sync_lock:
            if self._synced_end >= end or self._closed:
                return
            try:
                os.fdatasync(self._fd)
            except OSError as exc:
                self._overflow(f"fsync failed: {exc.strerror}")
            self._synced_end = max(self._synced_end, end)
            self._stats["fsyncs"] += 1

    # -- replaying --------------------------------------------------------------------------------
    def replay(self) -> Iterator[Record]:
        """Yield the records not yet applied, in order, APPLIED marks left out.

        Follows the journal while it grows: records appended during the iteration are yielded
        too, so the iteration ends when replay has caught up with the writer. Call
        :meth:`truncate_to` with a yielded FLUSH's ``seq`` once the target has flushed.

        Raises:
            JournalFormatError: a record changed under the journal (it is re-checked on read).
        """
        index = self._applied + 1 - self.header.first_seq
        while index < len(self._offsets) and not self._closed:
            pos = self._offsets[index]
            head = os.pread(self._fd, fmt.RECORD_HEADER_SIZE, pos)
            rec = fmt.decode_record_header(head, expected_seq=self.header.first_seq + index)
            payload = b""
            if rec is not None:
                payload = os.pread(self._fd, rec.payload_length, pos + fmt.RECORD_HEADER_SIZE)
            if rec is None or not fmt.check_payload(head, rec, payload):
                raise JournalFormatError(f"journal {self.path}: record {self.header.first_seq + index} "
                                         f"changed on disk: resync from the bitmap")
            index += 1
            if rec.kind is not Kind.APPLIED:
                yield Record(rec.kind, rec.seq, rec.offset, rec.length, rec.time_ns, payload)

    def truncate_to(self, seq: int, *, sync: bool = True) -> None:
        """Record, durably, that every record up to ``seq`` is on the target and flushed there.

        A later replay (also after a crash) starts after ``seq``, so it never writes an older
        record over a newer one. Call it only after the target's flush returned. ``sync=False``:
        the caller runs :meth:`sync` before it writes any later record to the target.

        Raises:
            UsageError: ``seq`` is beyond the last record or before the last applied one.
            JournalFullError: the mark does not fit (the journal is marked overflowed).
        """
        if not self._applied <= seq < self.next_seq:
            raise UsageError(f"cannot mark records up to {seq} applied: the journal holds "
                             f"{self._applied + 1}..{self.next_seq - 1} unapplied")
        if seq == self._applied:
            return
        self._append(Kind.APPLIED, seq, 0)
        self._applied = seq
        if sync:
            self.sync()

    def reset(self, *, capacity: int | None = None) -> None:
        """Start empty (and not overflowed), numbering on from the last record.

        The file is replaced atomically by an empty journal (temp file, fsync, rename), so a crash
        leaves either the old journal or the new one. Call it once replay has caught up and
        every record is applied, or to start over after an overflow.

        Raises:
            UsageError: records are still unapplied, and the journal did not overflow.
            JournalFormatError: the file cannot be rewritten; the old one stays.
        """
        if self.pending and not self._overflowed:
            raise UsageError(f"journal {self.path} still holds {self.pending} records to replay")
        header = self.header.replace(first_seq=self.next_seq, created_at=time.time_ns(),
                                     capacity=self.capacity if capacity is None else capacity)
        block = fmt.encode_header(header)
        try:
            fd = atomic_write(self.path, [block], keep_locked=True, replacing=self._fd)
        except (OSError, BitmapFormatError) as exc:
            raise JournalFormatError(f"cannot reset journal {self.path}: {reason_of(exc)}") from None
        assert fd is not None
        os.close(self._fd)  # the old inode's lock; the new one is locked already
        self._start(fd, header, fmt.STATE_OK)

    def rebind_source(self, source_id: str) -> None:
        """Record that the image now lives in the file ``source_id`` (another job of the image
        pivoted it there): the records stay, a later open must name the new file. The header
        block is rewritten in place and fsync'ed; a crash that tears it leaves a header whose
        checksum fails, which refuses the journal (the job then resyncs from its bitmap).

        Raises:
            OSError: the header cannot be written.
        """
        if self._closed or source_id == self.header.source_id:
            return
        header = self.header.replace(source_id=source_id)
        state = fmt.STATE_OVERFLOWED if self._overflowed else fmt.STATE_OK
        os.pwrite(self._fd, fmt.encode_header(header, state), 0)
        os.fsync(self._fd)
        self.header = header

    def close(self) -> None:
        """fsync and release the file. Idempotent."""
        if self._closed:
            return
        try:
            self.sync()
        except JournalFullError:
            log.warning("journal %s: the fsync at close failed; it is marked overflowed", self.path)
        finally:
            self._closed = True
            os.close(self._fd)

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> "WriteJournal":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def statistics(self) -> dict[str, Any]:
        """Counters and state, for status output and the benchmark."""
        return {"path": self.path, "used": self.used, "capacity": self.capacity,
                "overflowed": self._overflowed, "next_seq": self.next_seq,
                "applied_through": self._applied, "pending": self.pending,
                "pending_bytes": self.pending_bytes(),
                "discarded_bytes": self.discarded_bytes, **self._stats}
