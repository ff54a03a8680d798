"""The persistent dirty bitmap: a :class:`DirtyBitmap` whose set bits are also in a file.

Role: the job's whole remaining work, kept so that it survives the mirrorfs process (SIGKILL) and,
after a flush, a power loss. File format: ``docs/bitmap-format.md`` (codec in ``format.py``).

Two arrays of words:
    * ``_words``: the in-memory bitmap, authoritative for every query and for the copy task;
    * ``_file``: a view of the file's bits through a ``MAP_SHARED`` mmap.

Invariant (the durability rule, as Linux md's write-intent bitmap): ``_words ⊆ _file`` at every
instant. ``mark`` stores new bits into the mmap before it returns, and a store into a shared
mapping is in the kernel's page cache at once, so a SIGKILL right after ``mark`` returns loses
nothing. ``clear`` clears only ``_words``; the file's bits follow lazily through the clear commit
protocol, and only for clusters whose data the target has flushed:

    token = bitmap.begin_clear_commit()     # snapshot of the clusters cleared so far
    target.flush()                          # the data those clears stand for is now durable
    bitmap.finish_clear_commit(token)       # file bit := memory bit for those clusters
    bitmap.flush()                          # msync: the file survives a power loss too

A cluster cleared again after ``begin_clear_commit`` (its newest copy is not covered by that
target flush) is skipped and left for the next commit; a cluster re-marked since keeps its bit
because the memory bit is set again.
The bookkeeping of the clears (the pending mask, the commit's arithmetic, the file's ring of the
clusters the last commits cleared) is in ``clears.py``.

Threading: every method except :meth:`flush` and :meth:`statistics` belongs to one thread (the
engine's trio thread). ``flush`` may be called from worker threads concurrently: callers whose
changes another caller's msync already covered return without a second msync (group commit).

Header updates (open: not clean + generation bump; close: clean/pivoted/ended flags) rewrite the
whole file as temp file → fsync → rename → fsync of the directory, so a crash never leaves a torn
header. The file is never reached through a symbolic link, is created exclusively (mode 0600) and
replaces only a bitmap of the same source and target: ``--bitmap`` naming an image or any other
file must not destroy it.

One job at a time: while open, the file is held with ``flock(LOCK_EX)``. Because every header
update replaces the inode, the new file is locked before it is renamed into place, and an opener
that locked an inode checks that the path still names it. A second ``open``/``create`` of a bitmap
in use is refused; otherwise its rename would detach the first job's mapping from the path.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import mmap
import os
import secrets
import stat
import threading
import time
from typing import Any

import numpy as np

from ..errors import BitmapFormatError, UsageError, reason_of
from . import format as fmt
from .clears import ClearToken, PendingClears, RecentRing
from .memory import (DEFAULT_GRANULARITY, _WORD_DTYPE, DirtyBitmap, _clear_range, _grown, _popcount,
                     _set_range, check_granularity)

log = logging.getLogger(__name__)

def _fsync_dir(path: str) -> None:
    fd = os.open(os.path.dirname(os.path.abspath(path)) or ".", os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


#: mode of a new bitmap file: anyone who may write it can clear bits and fake "clean".
FILE_MODE = 0o600


def _mode_for(path: str) -> int:
    """The permission bits a rewrite of ``path`` gets: its own, never group/other-writable (a
    file written by an older mirrorfs under umask 0 is tightened), 0600 for a new file."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return FILE_MODE
    return st.st_mode & 0o7755 if stat.S_ISREG(st.st_mode) else FILE_MODE


def _still_names(path: str, fd: int) -> bool:
    try:
        return os.path.samestat(os.lstat(path), os.fstat(fd))
    except FileNotFoundError:
        return False


def atomic_write(path: str, chunks: list[bytes | memoryview], *, keep_locked: bool = False,
                 replacing: int | None = None) -> int | None:
    """Put a file holding ``chunks`` at ``path``: temp file, fsync, rename/link, fsync directory.

    Never follows a symbolic link and never clobbers a file it was not told about: with
    ``replacing=None`` the path must not exist (the new file is linked into place, which fails
    if anything appeared there); otherwise ``replacing`` is a descriptor of the file the path
    must still name right before the rename. On any failure the temp file is removed and
    ``path`` is untouched.

    Args:
        path: the file to create or replace.
        chunks: its new contents.
        keep_locked: lock the new file (``flock(LOCK_EX)``) before it becomes visible and return
            its read-write descriptor instead of closing it.
        replacing: an open descriptor of the file now at ``path``, or None to create.

    Raises:
        FileExistsError: creating, and ``path`` exists.
        BitmapFormatError: replacing, and ``path`` no longer names that file.
        OSError: the write, fsync or rename failed.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}."
                                  f"{threading.get_ident()}.{secrets.token_hex(4)}.tmp")
    mode = _mode_for(path) if replacing is not None else FILE_MODE
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, FILE_MODE)
    try:
        if keep_locked:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # nobody else knows this inode yet
        os.fchmod(fd, mode)  # whatever the umask
        for chunk in chunks:
            view = memoryview(chunk)
            while len(view):
                view = view[os.write(fd, view):]
        os.fsync(fd)
        if replacing is None:
            os.link(tmp, path)  # fails on anything at path, a dangling symlink included
            os.unlink(tmp)
        else:
            if not _still_names(path, replacing):
                raise BitmapFormatError(f"bitmap {path} was replaced by another file meanwhile: "
                                        f"left it untouched")
            os.replace(tmp, path)
    except BaseException:
        os.close(fd)
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    try:
        _fsync_dir(path)
    except BaseException:
        os.close(fd)
        raise
    if keep_locked:
        return fd
    os.close(fd)
    return None


def _in_use_error(path: str) -> BitmapFormatError:
    return BitmapFormatError(f"bitmap {path} is in use by a running job (it is locked): stop or "
                             f"cancel that job first, or use another bitmap file")


def lock_existing(path: str, *, missing_ok: bool = False) -> int | None:
    """Open ``path`` and take its exclusive lock, making sure the path still names that inode.

    Refuses a symbolic link (every header update renames over the path, which would replace the
    link and leave the file it names stale) and anything but a regular file.

    Returns:
        the locked descriptor, or None if the file does not exist and ``missing_ok``.

    Raises:
        BitmapFormatError: the file is locked by a job, a link, not a regular file, or cannot be
            opened.
    """
    for _ in range(10):
        try:
            # O_NONBLOCK: opening a FIFO planted at the path must not hang
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            if missing_ok:
                return None
            raise BitmapFormatError(f"cannot read bitmap {path}: No such file or directory") from None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise BitmapFormatError(f"bitmap {path} is a symbolic link: give the path of the "
                                        f"file itself") from None
            raise BitmapFormatError(f"cannot read bitmap {path}: {exc.strerror}") from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise BitmapFormatError(f"bitmap {path} is not a regular file: give the path of a "
                                    f"bitmap file (or of a new one to create)")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise _in_use_error(path) from None
        if _still_names(path, fd):
            return fd
        os.close(fd)  # replaced between open and lock: look again
    raise _in_use_error(path)


def is_in_use(path: str) -> bool:
    """Whether a job holds the bitmap file (its lock), without disturbing it."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # also drops the shared lock
    return False


def read_bitmap_file(path: str, *, fd: int | None = None) -> tuple[fmt.BitmapHeader, bytes]:
    """Read and validate a whole bitmap file (header, size, tail bits); no match checks.

    Args:
        path: the file (named in errors).
        fd: read from this open descriptor instead of opening ``path``; it stays open.

    Returns:
        the header and the file's bytes.

    Raises:
        BitmapFormatError: unreadable, truncated, corrupt.
    """
    path = os.fspath(path)
    own = fd is None
    if fd is None:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)  # a FIFO must not hang
        except OSError as exc:
            raise BitmapFormatError(f"cannot read bitmap {path}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            what = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file"
            raise BitmapFormatError(f"cannot read bitmap {path}: it is {what}")
        size = st.st_size
        head = os.pread(fd, fmt.BITS_OFFSET, 0)
        header = fmt.decode_header(head, name=path)
        fmt.check_file_size(header, size, name=path)  # before reading: never read absurd files
        data = bytearray()
        while len(data) < size:
            chunk = os.pread(fd, min(size - len(data), 16 << 20), len(data))
            if not chunk:
                break
            data += chunk
    except OSError as exc:
        if exc.errno == errno.EISDIR:
            raise BitmapFormatError(f"cannot read bitmap {path}: it is a directory") from None
        raise BitmapFormatError(f"cannot read bitmap {path}: {exc.strerror}") from None
    finally:
        if own:
            os.close(fd)
    fmt.check_file_size(header, len(data), name=path)  # it may have shrunk while we read
    if header.words:
        last = int(np.frombuffer(data, _WORD_DTYPE, count=1,
                                 offset=header.bits_offset + 8 * (header.words - 1))[0])
        fmt.check_tail_bits(header, last, name=path)
    return header, bytes(data)


def _ctime(source: str) -> int | None:
    """The ctime (ns) of the source image file, None if it cannot be read."""
    if not source.startswith("/"):
        return None
    try:
        return os.stat(source).st_ctime_ns
    except (OSError, ValueError):
        return None


def _check_replaceable(path: str, fd: int, *, source_id: str, target_id: str) -> None:
    """Refuse to replace anything but a valid bitmap of the same source and target."""
    try:
        header, _ = read_bitmap_file(path, fd=fd)
    except BitmapFormatError:
        raise BitmapFormatError(f"{path} exists and is not a valid mirrorfs bitmap: refusing to "
                                f"overwrite it; give --bitmap a new path") from None
    if (header.source_id, header.target_id) != (source_id, target_id):
        raise BitmapFormatError(f"{path} is the bitmap of {header.source_id!r} to "
                                f"{header.target_id!r}, not of this job: refusing to overwrite "
                                f"it; give --bitmap a new path")


def _switch_flag(mm: mmap.mmap, header: fmt.BitmapHeader, flag: int, on: bool) -> fmt.BitmapHeader:
    """Set or clear one header flag of a mapped file in place, msync'ed before returning.

    The flags and the header checksum share the file's first sector, rewritten in one store: a
    disk writes a sector whole, so the header is never torn. Returns the header now on file.
    """
    new = header.replace(flags=(header.flags & ~flag) | (flag if on else 0))
    if new != header:
        mm[:fmt.FLAGS_SECTOR] = fmt.flags_sector(new)
        mm.flush(0, mmap.PAGESIZE)
    return new


def _closing_header(header: fmt.BitmapHeader, *, clean: bool, pivoted: bool, ended: bool,
                    recent: tuple[int, ...]) -> fmt.BitmapHeader | None:
    """The header a close writes (``PersistentBitmap.close``); None: none, the file keeps
    saying "not clean". The INCONSISTENT flag is about the target and outlives the close."""
    flags = ((fmt.FLAG_CLEAN if clean else 0) | (fmt.FLAG_PIVOTED if pivoted else 0)
             | (fmt.FLAG_ENDED if ended else 0))
    if not flags:
        return None
    flags |= header.flags & fmt.FLAG_INCONSISTENT
    # shut down (a resume point): note the image's ctime, so that a resume sees writes made
    # while nothing recorded them
    ctime = _ctime(header.source_id) if clean and not ended else None
    return header.replace(flags=flags, ended_at=time.time_ns() if ended else 0,
                          source_ctime=ctime or 0, recent_cleared=recent)


def _map(fd: int, header: fmt.BitmapHeader) -> tuple[mmap.mmap, np.ndarray, RecentRing]:
    """Map the bitmap file open at ``fd`` read-write: the mapping, its bits and its ring of
    recently cleared clusters. On failure ``fd`` is closed."""
    try:
        mm = mmap.mmap(fd, header.file_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    except BaseException:
        os.close(fd)
        raise
    bits = np.frombuffer(mm, dtype=_WORD_DTYPE, count=header.words, offset=header.bits_offset)
    return mm, bits, RecentRing.mapped(mm)


class PersistentBitmap(DirtyBitmap):
    """A dirty bitmap whose set bits are in a file before ``mark`` returns.

    Build one with :meth:`create` or :meth:`open`, never directly. The query API is
    :class:`DirtyBitmap`'s and answers from memory.

    Attributes:
        path: the bitmap file.
        header: the header as last written.
        was_clean: whether the file had been closed cleanly before this open.
    """

    volatile = False
    path: str
    header: fmt.BitmapHeader
    was_clean: bool

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError("use PersistentBitmap.create() or PersistentBitmap.open()")

    # -- construction -----------------------------------------------------------------------------
    @classmethod
    def create(cls, path: str | os.PathLike[str], size: int, granularity: int = DEFAULT_GRANULARITY, *,
               source_id: str, target_id: str, fill: bool,
               inconsistent: bool = False) -> "PersistentBitmap":
        """Write a new bitmap file (mode 0600) and open it.

        The file is created exclusively. An existing file is replaced (atomically) only if it is a
        valid mirrorfs bitmap of the same source and target, not in use; anything else at
        ``path`` is refused and left untouched.

        Args:
            path: where the file goes.
            size: image size in bytes.
            granularity: bytes per cluster.
            source_id: identity of the source (the engine: the source image's canonical path).
            target_id: identity of the target (its canonical path or NBD URI).
            fill: set every bit (a full job's whole remaining work); else all clear.
            inconsistent: written with FLAG_INCONSISTENT (an initial copy is about to begin).

        Raises:
            UsageError: bad granularity, size or identity, or the file cannot be written.
            BitmapFormatError: something else is at ``path`` (a file that is no bitmap, the
                bitmap of another image or target, a link, a bitmap in use).
        """
        path = os.fspath(path)
        check_granularity(granularity)
        if size < 0:
            raise UsageError(f"invalid image size {size}: must not be negative")
        # Written straight in the "in use" state (not clean, generation 1) that open() would
        # leave it in: a crash right after create() then reads as an interrupted job.
        header = fmt.BitmapHeader(image_size=size, granularity=granularity, source_id=source_id,
                                  target_id=target_id, generation=1,
                                  flags=fmt.FLAG_INCONSISTENT if inconsistent else 0)
        head = fmt.encode_header(header)
        bits = np.zeros(header.words, dtype=_WORD_DTYPE)
        if fill:
            _set_range(bits, 0, header.clusters)
        old = lock_existing(path, missing_ok=True)  # never replace the file of a running job
        try:
            if old is not None:
                _check_replaceable(path, old, source_id=source_id, target_id=target_id)
            fd = atomic_write(path, [head, bits.data], keep_locked=True, replacing=old)
        except FileExistsError:
            raise BitmapFormatError(f"bitmap {path} appeared while it was being created: left it "
                                    f"untouched; give --bitmap a new path") from None
        except OSError as exc:
            raise UsageError(f"cannot create bitmap {path}: {exc.strerror}") from None
        finally:
            if old is not None:
                os.close(old)
        assert fd is not None
        return cls._attach(path, header, fd, was_clean=True)

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, size: int, granularity: int | None = None,
             source_id: str | None = None, target_id: str | None = None,
             verify: bool = False) -> "PersistentBitmap":
        """Open an existing bitmap file for use by a job.

        Marks the file not clean (and no longer ended) and bumps its generation (atomically)
        before returning.

        Args:
            path: the bitmap file.
            size: the image's size; must equal the file's.
            granularity: if given, must equal the file's.
            source_id: if given, must equal the file's source identity.
            target_id: if given, must equal the file's target identity.
            verify: the job compares every cluster (a verified resync), so a file whose job
                ended is accepted too; every bit is set.

        Raises:
            BitmapFormatError: unreadable, truncated, corrupt, mismatched, recording a pivot
                (the target became the live image) or, without ``verify``, recording that its
                job ended (later writes are not in it).
        """
        path = os.fspath(path)
        old = lock_existing(path)
        try:
            header, data = read_bitmap_file(path, fd=old)
            fmt.check_not_pivoted(header, name=path)
            fmt.check_match(header, size=size, granularity=granularity, source_id=source_id,
                            target_id=target_id, name=path)
            fmt.check_resumable(header, verify=verify, name=path)
            fmt.check_source_unchanged(header, _ctime(header.source_id), verify=verify, name=path)
            if not header.clean:
                log.info("bitmap %s was not shut down cleanly (generation %d): its set bits are still "
                         "trustworthy (they over-approximate)", path, header.generation)
            kept = header.flags & fmt.FLAG_INCONSISTENT  # about the target: an open keeps it
            new = header.replace(flags=kept, generation=header.generation + 1, version=fmt.VERSION,
                                 ended_at=0, source_ctime=0)
            bits: memoryview = memoryview(data)[header.bits_offset:]
            if verify:
                # Every cluster is to be compared: written with the header in one atomic step, so
                # the file never says "recording" with the bits of an ended job.
                every = np.zeros(header.words, dtype=_WORD_DTYPE)
                _set_range(every, 0, header.clusters)
                bits = every.data
            try:
                fd = atomic_write(path, [fmt.encode_header(new), bits],
                                  keep_locked=True, replacing=old)
            except OSError as exc:
                raise BitmapFormatError(f"cannot update bitmap {path}: {exc.strerror}") from None
        finally:
            os.close(old)  # the new inode is locked already
        assert fd is not None
        return cls._attach(path, new, fd, was_clean=header.clean)

    @classmethod
    def _attach(cls, path: str, header: fmt.BitmapHeader, fd: int, *, was_clean: bool
                ) -> "PersistentBitmap":
        """Map the file open (and locked) at ``fd``; the bitmap owns ``fd`` from here on."""
        self = cls.__new__(cls)
        self.path = path
        self.header = header
        self.was_clean = was_clean
        self.size = header.image_size
        self.granularity = header.granularity
        self._shift = header.granularity.bit_length() - 1
        self.clusters = header.clusters
        self._mm, self._file, self._recent = _map(fd, header)  # the ring: ``clears.py``
        self._lock_fd = fd  # holds the flock for as long as the job uses the file
        self._words = self._file.copy()
        self._count = _popcount(self._words)
        self._pending = PendingClears(header.words)
        self._flush_lock = threading.Lock()
        self._mod_seq = 0  # bumped whenever the mapped bits change
        self._synced_seq = 0  # the _mod_seq the last msync covered
        self._closed = False
        self._stats = {"marks": 0, "file_bits_set": 0, "file_bits_cleared": 0, "commits": 0,
                       "flushes": 0, "flushes_skipped": 0, "flushes_shared": 0}
        return self

    # -- marking: memory and file -----------------------------------------------------------------
    def mark(self, offset: int, length: int) -> int:
        """Mark every cluster the byte range touches, in memory and in the file, before returning.

        Only 0→1 transitions touch the file: a range already set in memory is set in the file too
        (``_words ⊆ _file``), so it costs one word test.

        Returns:
            the number of clusters that were clean (in memory) before.

        Raises:
            UsageError: the range is outside the image.
        """
        first, end = self._touched(offset, length)
        self._stats["marks"] += 1
        n = _set_range(self._words, first, end)
        if n:
            self._count += n
            written = _set_range(self._file, first, end)
            if written:
                self._mod_seq += 1
                self._stats["file_bits_set"] += written
        return n

    def mark_cluster_range(self, first: int, end: int) -> int:
        """Mark clusters [first, end) in memory and in the file."""
        n = super().mark_cluster_range(first, end)
        if n:
            self._file_set(first, end)
        return n

    def _file_set(self, first: int, end: int) -> None:
        written = _set_range(self._file, first, end)
        if written:
            self._mod_seq += 1
            self._stats["file_bits_set"] += written

    def mark_clusters(self, indices: np.ndarray) -> None:
        """Mark the given cluster indices in memory and in the file."""
        super().mark_clusters(indices)
        self._file_or(self._words)

    def _file_or(self, words: np.ndarray) -> None:
        missing = words & ~self._file
        changed = np.flatnonzero(missing)
        if len(changed):
            self._file[changed] |= missing[changed]
            self._mod_seq += 1
            self._stats["file_bits_set"] += _popcount(missing[changed])

    def set_all(self) -> None:
        """Mark every cluster dirty, in memory and in the file."""
        super().set_all()
        self._file_set(0, self.clusters)

    def merge(self, other: DirtyBitmap) -> None:
        """OR ``other`` into this bitmap, in memory and in the file.

        Raises:
            UsageError: sizes or granularities differ.
        """
        super().merge(other)
        self._file_or(other._words)

    # -- clearing: memory now, file lazily --------------------------------------------------------
    def clear(self, offset: int, length: int) -> None:
        """Clear the clusters wholly inside the range in memory; the file follows at the next
        clear commit (see the module docstring).

        Raises:
            UsageError: the range is outside the image.
        """
        first, end = self._inside(offset, length)
        if end > first:
            self._count -= _clear_range(self._words, first, end)
            self._pending.add(first, end)

    def clear_all(self) -> None:
        """Clear every cluster in memory; the file follows at the next clear commit."""
        super().clear_all()
        self._pending.add(0, self.clusters)

    def begin_clear_commit(self) -> ClearToken:
        """Snapshot and reset the clusters cleared since the last commit.

        Call it BEFORE flushing the target, then :meth:`finish_clear_commit` after the flush
        returned. Tokens must be finished in the order they were begun (a dropped token is
        harmless: its clusters simply stay set in the file).
        """
        return self._pending.take(self)

    def finish_clear_commit(self, token: ClearToken) -> None:
        """Clear in the file the token's clusters that were not cleared again since.

        For those clusters the file bit becomes the memory bit, so a cluster re-marked since
        ``begin_clear_commit`` stays set. Call it AFTER the target flush returned; then
        :meth:`flush` makes it durable.

        Raises:
            UsageError: the token belongs to another bitmap.
        """
        if token._owner is not self:
            raise UsageError("clear token from another bitmap")
        if token._mask is None:
            return  # finished already, or nothing was cleared
        self._stats["commits"] += 1
        changed, cleared = self._pending.settle(token, self._words, self._file)
        if len(changed):
            self._mod_seq += 1
            self._stats["file_bits_cleared"] += _popcount(cleared)
            self._recent.record(changed, cleared)

    def recent_cleared(self) -> tuple[int, ...]:
        """The clusters the last clear commits cleared in the file, oldest first (at most
        ``format.RECENT_SLOTS``; those of earlier jobs on this file too)."""
        return self._recent.clusters(self.clusters)

    # -- growth -----------------------------------------------------------------------------------
    def resize(self, new_size: int) -> None:
        """Grow to cover an image that grew to ``new_size`` bytes (a qcow2 file allocating).

        The file is rewritten atomically with the new image size (temp file, fsync, rename), so at
        every instant the file on disk is a valid bitmap holding every set bit: the old one until
        the rename, the new one after. New clusters are clean. Blocking: call it where no other
        task can mark concurrently (the engine calls it from the trio thread).

        Raises:
            UsageError: ``new_size`` is smaller than the current size.
            BitmapFormatError: the file cannot be rewritten; the old file stays in place.
        """
        if new_size < self.size:
            raise UsageError(f"cannot shrink a bitmap from {self.size} to {new_size} bytes")
        if new_size == self.size:
            return
        header = self.header.replace(image_size=new_size, recent_cleared=self.recent_cleared())
        self._rewrite(header, _grown(np.array(self._file), header.words), "grow")
        super().resize(new_size)
        self._pending.grow(header.words)

    def rebind_source(self, source_id: str) -> None:
        """Record that the image now lives in another file, ``source_id`` (another job of the
        image pivoted it there while this one ran): a later resume must find it there, not in
        the file it left. Rewritten atomically as ``resize`` does.

        Raises:
            BitmapFormatError: the file cannot be rewritten; the old file stays in place.
        """
        if self._closed or source_id == self.header.source_id:
            return
        header = self.header.replace(source_id=source_id, recent_cleared=self.recent_cleared())
        self._rewrite(header, np.array(self._file), "update")

    def _rewrite(self, header: fmt.BitmapHeader, bits: np.ndarray, verb: str) -> None:
        """Replace the file by ``header`` and ``bits`` (temp file, fsync, rename) and map it."""
        with self._flush_lock:
            try:
                fd = atomic_write(self.path, [fmt.encode_header(header), bits.data], keep_locked=True,
                                  replacing=self._lock_fd)
            except OSError as exc:
                raise BitmapFormatError(f"cannot {verb} bitmap {self.path}: {exc.strerror}") from None
            assert fd is not None
            old_mm, old_fd = self._mm, self._lock_fd
            # The old array view pins the old mapping: replace it before closing that mapping.
            self._mm, self._file, self._recent = _map(fd, header)
            self._lock_fd, self.header = fd, header
            self._synced_seq = self._mod_seq  # the rewrite was fsync'ed
            old_mm.close()
            os.close(old_fd)

    # -- durability -------------------------------------------------------------------------------
    def flush(self) -> None:
        """msync the bits so they survive a power loss (free when nothing changed).

        Thread-safe: concurrent callers share one msync; a caller returns once an msync that
        started after its last change has completed.
        """
        target = self._mod_seq
        if self._synced_seq >= target or self._closed:
            self._stats["flushes_skipped"] += 1
            return
        with self._flush_lock:
            if self._synced_seq >= target:
                self._stats["flushes_shared"] += 1
                return
            seq = self._mod_seq
            self._mm.flush()
            self._synced_seq = seq
            self._stats["flushes"] += 1

    def close(self, *, clean: bool = True, pivoted: bool = False, ended: bool = False) -> None:
        """msync, then rewrite the header with the clean, pivoted and ended flags, fsync'ed.

        Commits no pending clear: the engine commits after its own target flush. Idempotent.
        With no flag the header stays "not clean".

        Args:
            clean: the job stopped in order (every write so far is recorded).
            pivoted: the job ended by pivot: the target is the live image and holds every write.
            ended: the job ended (cancel, complete, failure, pivot): from now on writes are not
                recorded; the header says so and when. Not for an unmount, after which the job
                resumes from the file.
        """
        if self._closed:
            return
        with self._flush_lock:
            try:
                self._mm.flush()
                self._synced_seq = self._mod_seq
                ended = ended or pivoted
                header = _closing_header(self.header, clean=clean, pivoted=pivoted, ended=ended,
                                         recent=self.recent_cleared())
                if header is not None:
                    bits = self._mm[self.header.bits_offset:self.header.file_size]
                    try:
                        fd = atomic_write(self.path, [fmt.encode_header(header), bits], keep_locked=True,
                                          replacing=self._lock_fd)
                    except (OSError, BitmapFormatError) as exc:
                        if ended:
                            self._set_every_file_bit()
                        raise BitmapFormatError(
                            f"cannot update bitmap {self.path}: {reason_of(exc)}; it stays marked not "
                            f"clean" + ("; every bit is set, as the job no longer records writes"
                                        if ended else " (its bits are still valid)")) from None
                    assert fd is not None
                    os.close(self._lock_fd)  # the old inode is released once the new one is in place
                    self._lock_fd = fd
                    self.header = header
            finally:
                # even after a failed header update: the bitmap is unusable from here on, and the
                # file (still "not clean") keeps valid bits
                self._closed = True
                os.close(self._lock_fd)
                # queries keep working on the in-memory words; the file view goes away
                self._file = self._file.copy()
                self._file.flags.writeable = False
                self._recent = self._recent.detached()
                self._mm.close()  # also drops the lock (the mapping holds a dup of the descriptor)

    inconsistent = property(lambda self: self.header.inconsistent)

    def set_inconsistent(self, inconsistent: bool) -> None:
        """Switch FLAG_INCONSISTENT durably (``_switch_flag``; raises OSError)."""
        if not self._closed:
            with self._flush_lock:
                self.header = _switch_flag(self._mm, self.header, fmt.FLAG_INCONSISTENT, inconsistent)

    def _set_every_file_bit(self) -> None:
        """The header cannot say that recording stopped: make the bits say "copy everything", so
        the file still never claims less than the truth (best effort: stores and an msync)."""
        try:
            _set_range(self._file, 0, self.clusters)
            self._mm.flush()
        except (OSError, ValueError):
            log.warning("bitmap %s: cannot set its bits either; do not resume from it", self.path)

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> "PersistentBitmap":
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self.close(clean=exc_type is None)

    def statistics(self) -> dict[str, Any]:
        """Counters and state, for status output and the benchmark."""
        return {
            "path": self.path,
            "size": self.size,
            "granularity": self.granularity,
            "clusters": self.clusters,
            "dirty_clusters": self._count,
            "dirty_bytes": self.dirty_bytes(),
            "file_dirty_clusters": _popcount(self._file),
            "pending_clear_clusters": self._pending.count(),
            "generation": self.header.generation,
            "was_clean": self.was_clean,
            "closed": self._closed,
            "unsynced_changes": self._synced_seq < self._mod_seq,
            **self._stats,
        }
