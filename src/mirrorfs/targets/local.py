"""A local file (or block device) as a mirror target.

The file is opened ``O_RDWR``, and a second time with ``O_DIRECT`` where that is safe; the
target is then in *direct mode*, as QEMU's ``cache.direct=on``: ALL its data I/O (reads, writes,
duplicates of buffered and O_DIRECT clients alike, the copy task, verify and resume reads) goes
through the O_DIRECT descriptor, unaligned requests as aligned reads-modify-writes in a bounce
buffer (``fileio.pwrite_aligned``). Mixing the two on one file is a data-integrity bug: a direct
write whose range shares a (large) page-cache folio with a dirty buffered write cannot invalidate
it, so the kernel records EIO for the next ``fdatasync`` and the cache may keep stale bytes that a
later buffered read returns. ``flush`` (``fdatasync``) and hole punching stay on the buffered
descriptor: they act on the file, not on cached pages.

Direct mode needs: a filesystem that takes O_DIRECT at page alignment (not tmpfs, whose pages
are the file, so the inline fast path stays), a size that is a multiple of the page size (an
O_DIRECT write of the last partial page would grow the file, and a buffered one would be the mix
again: such a target is all-buffered, one log line), and clusters that are whole pages (a
read-modify-write is then alone on its page unless another operation touches the same cluster,
which the engine leaves dirty for a later copy). A target that grows to a size that is not a
multiple of the page size leaves direct mode once its requests in flight are done.
``write_zeroes`` punches a hole (``fallocate(PUNCH_HOLE|KEEP_SIZE)``; in direct mode only over
whole pages, since the file system zeroes partial blocks through the page cache) and falls back
to writing zeroes where the file system cannot.

Locking: while connected, the file carries QEMU's "writer, sharing no writes" locks
(open-file-description read locks on bytes 101 and 201, as QEMU's file-posix driver takes them),
taken without waiting. A second mirrorfs job (in this or another mount) or a QEMU that has the
file open for writing cannot use the file at the same time: whoever comes second is refused.
``qemu-img -U`` can still read it. OFD locks belong to the descriptor, so other opens and closes
of the file in this process do not drop them; closing the descriptor releases them.

Invariants: the target never changes size (writes past the end are refused with EINVAL), and a
file of a size other than the expected one is refused at ``connect()``. The descriptor is closed
only once no request is using it, so a concurrent ``close()`` can never let a later ``open()``
reuse the number under a request still running in a worker thread.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno as _errno
import fcntl
import logging
import os
import stat

import trio

from mirrorfs import fileio
from mirrorfs.bitmap.memory import MIN_GRANULARITY
from mirrorfs.errors import TargetError, TargetFatalError, TargetNoSpaceError, TargetRetryableError
from mirrorfs.targets.base import Target

log = logging.getLogger(__name__)

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
#: largest zero buffer written at once when holes cannot be punched
_ZERO_CHUNK = 4 * 1024 * 1024

_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
_fallocate = getattr(_libc, "fallocate64", None) or getattr(_libc, "fallocate", None)
if _fallocate is not None:
    _fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
    _fallocate.restype = ctypes.c_int


class _Flock(ctypes.Structure):
    """``struct flock`` of Linux (64-bit ``off_t``)."""

    _fields_ = [("l_type", ctypes.c_short), ("l_whence", ctypes.c_short),
                ("l_start", ctypes.c_int64), ("l_len", ctypes.c_int64), ("l_pid", ctypes.c_int)]


#: QEMU's file locking (block/file-posix.c): a read lock on byte 100+N says "I hold permission
#: N", one on byte 200+N "I do not let others hold N"; N=1 is BLK_PERM_WRITE.
_QEMU_WRITE_BYTES = (100 + 1, 200 + 1)


def _ofd_lock(fd: int, command: int, kind: int, start: int) -> _Flock:
    request = _Flock(l_type=kind, l_whence=os.SEEK_SET, l_start=start, l_len=1, l_pid=0)
    return _Flock.from_buffer_copy(fcntl.fcntl(fd, command, bytes(request)))


def lock_for_writing(fd: int) -> bool:
    """Claim ``fd``'s file as its only writer, the way QEMU does, without waiting; False if
    another descriptor writes it or forbids writing (another job, a QEMU with the file open).

    QEMU's own locks are used so that QEMU sees the claim (it then refuses to open the file for
    writing, and ``qemu-img`` without ``-U`` refuses to read it) while ``qemu-img -U`` still can.

    Raises:
        OSError: locking failed for another reason.
    """
    try:
        for byte in _QEMU_WRITE_BYTES:
            _ofd_lock(fd, fcntl.F_OFD_SETLK, fcntl.F_RDLCK, byte)
        # Taken first, then tested, as QEMU does: of two racing claimants neither wins.
        for byte in _QEMU_WRITE_BYTES:
            if _ofd_lock(fd, fcntl.F_OFD_GETLK, fcntl.F_WRLCK, byte).l_type != fcntl.F_UNLCK:
                return False
    except OSError as exc:
        if exc.errno in (_errno.EAGAIN, _errno.EACCES):
            return False
        raise
    return True


def punch_hole(fd: int, offset: int, length: int) -> None:
    """Deallocate a range of ``fd`` keeping its size; the range reads as zeroes afterwards.

    Raises:
        OSError: EOPNOTSUPP/ENOSYS where the file system cannot, or any other failure.
    """
    if _fallocate is None:
        raise OSError(_errno.ENOSYS, "fallocate is not available")
    if _fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


class LocalFileTarget(Target):
    """A mirror target that is a local file.

    Args:
        path: the file (must exist; see :meth:`create`).
        expected_size: refuse a file of any other size at ``connect()``.
    """

    def __init__(self, path: str | os.PathLike, *, expected_size: int | None = None) -> None:
        self.path = os.path.abspath(os.fspath(path))
        self.description = self.path
        self._size = expected_size
        self._fd: int | None = None
        self._dfd: int | None = None  # the O_DIRECT descriptor: set in direct mode only
        self._switching: trio.Event | None = None  # set while direct mode ends (see resize)
        self._inflight = 0
        self._idle = trio.Event()
        self._idle.set()
        self._punch = True  # until the file system says it cannot
        self._inline = False  # writes may run on the trio thread (fileio.inline_capable)

    @classmethod
    def create(cls, path: str | os.PathLike, size: int, *,
               like: os.stat_result | None = None) -> LocalFileTarget:
        """Create a sparse file of ``size`` bytes; it must not exist yet.

        Args:
            like: the source's stat: the new file gets its permission bits (without set-id
                bits) and, where this process may give them, its owner and group. Without it
                the file is 0600.

        Returns:
            A (not yet connected) target for it, expecting that size.

        Raises:
            OSError: the file exists (FileExistsError) or cannot be created.
        """
        # 0600 until it is complete: nobody else may open it before its real mode is set.
        fd = os.open(os.fspath(path), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, size)
            if like is not None:
                # On the descriptor: the path may be swapped between creating and chowning.
                with contextlib.suppress(PermissionError):  # an ordinary user cannot give files away
                    os.fchown(fd, like.st_uid, like.st_gid)
                os.fchmod(fd, stat.S_IMODE(like.st_mode) & 0o777)
        except OSError:
            os.close(fd)
            os.unlink(path)
            raise
        os.close(fd)
        return cls(path, expected_size=size)

    @property
    def connected(self) -> bool:
        return self._fd is not None

    @property
    def size(self) -> int:
        if self._size is None:
            raise TargetError(f"size of {self.path} is not known before connect()")
        return self._size

    def _error(self, exc: OSError, what: str) -> TargetError:
        message = f"{what} on target {self.path} failed: {exc.strerror or exc}"
        if exc.errno in (_errno.ENOSPC, _errno.EDQUOT):
            return TargetNoSpaceError(message)
        return TargetError(message, errno=exc.errno)

    async def connect(self) -> None:
        """Open the file read-write and check its size.

        Raises:
            TargetFatalError: the size differs from the expected (or previously seen) size.
            TargetError: it cannot be opened (with the errno).
        """
        await self.close()
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise self._error(exc, "open") from None
        try:
            size = os.lseek(fd, 0, os.SEEK_END)
        except OSError as exc:
            os.close(fd)
            raise self._error(exc, "seek") from None
        if self._size is not None and size != self._size:
            os.close(fd)
            raise TargetFatalError(f"target {self.path} is {size} bytes but {self._size} are "
                                   f"expected: give a target of the image's size")
        try:
            locked = lock_for_writing(fd)
        except OSError as exc:
            os.close(fd)
            raise self._error(exc, "lock") from None
        if not locked:
            os.close(fd)
            raise TargetFatalError(f"target {self.path} is in use by another program (another "
                                   f"mirrorfs job or a QEMU holds a lock on it); stop that first")
        try:
            dfd = await trio.to_thread.run_sync(self._open_direct, fd, size)
        except OSError as exc:
            os.close(fd)
            raise self._error(exc, "open") from None
        self._size = size
        self._fd = fd
        self._dfd = dfd
        self._inline = fileio.inline_capable(fd)
        self._punch = True

    def _open_direct(self, fd: int, size: int) -> int | None:
        """The O_DIRECT descriptor for direct mode, or None where the target stays buffered."""
        # tmpfs: O_DIRECT keeps nothing out of memory there (the file is its page cache)
        if fileio.memory_backed(fd):
            return None
        if size % fileio.ALIGN or MIN_GRANULARITY % fileio.ALIGN:
            log.info("target %s stays buffered: its size (%d) or the smallest cluster (%d) is not "
                     "a multiple of the page size (%d)", self.path, size, MIN_GRANULARITY, fileio.ALIGN)
            return None
        dfd = fileio.open_direct(self.path, os.O_RDWR, "target")
        if dfd is not None and size:
            try:  # a filesystem may want more than page alignment: better all-buffered then
                fileio.pread_only_direct(dfd, fileio.ALIGN, 0)
            except OSError as exc:
                os.close(dfd)
                if exc.errno != _errno.EINVAL:
                    raise
                log.info("target %s stays buffered: O_DIRECT at page alignment is refused", self.path)
                return None
        return dfd

    async def _leave_direct(self) -> None:
        """Go from direct mode to buffered once no request uses the O_DIRECT descriptor; new
        requests wait meanwhile, so no buffered request ever runs beside a direct one."""
        switching = self._switching = trio.Event()
        try:
            with trio.CancelScope(shield=True):
                await self._idle.wait()
            dfd, self._dfd = self._dfd, None
            if dfd is not None:
                os.close(dfd)
                log.info("target %s leaves direct mode: its new size is not a multiple of the "
                         "page size", self.path)
        finally:
            self._switching = None
            switching.set()

    async def _enter(self) -> int:
        """``_begin`` for the async requests: waits while direct mode ends."""
        if self._switching is not None:
            await self._switching.wait()
        return self._begin()

    async def resize(self, size: int) -> None:
        """Grow the file to ``size`` bytes (sparse: the new range reads as zeroes).

        Raises:
            TargetError: the file cannot be extended (with the errno).
        """
        if self._dfd is not None and size % fileio.ALIGN:
            await self._leave_direct()
        fd = await self._enter()
        try:
            await trio.to_thread.run_sync(os.ftruncate, fd, size)
        except OSError as exc:
            raise self._error(exc, "resize") from None
        finally:
            self._end()
        self._size = size

    def _begin(self) -> int:
        if self._fd is None:
            raise TargetRetryableError(f"target {self.path} is not open")
        self._inflight += 1
        if self._inflight == 1:
            self._idle = trio.Event()
        return self._fd

    def _end(self) -> None:
        self._inflight -= 1
        if self._inflight == 0:
            self._idle.set()

    def _check_range(self, what: str, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise TargetError(f"{what} of {length} bytes at {offset} is outside target "
                              f"{self.path} ({self.size} bytes)", errno=_errno.EINVAL)

    async def pread(self, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0:
            self._check_range("read", offset, length)
        fd = await self._enter()
        try:
            size = max(0, min(length, self.size - offset))
            dfd = self._dfd
            if dfd is not None:
                return await fileio.pread_aligned(None, dfd, size, offset)
            return await fileio.pread(fd, size, offset)
        except OSError as exc:
            raise self._error(exc, "read") from None
        finally:
            self._end()

    async def _write_all(self, fd: int, offset: int, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data).cast("B")
        dfd = self._dfd
        done = 0
        while done < len(view):
            # returns short only when an error stopped it; the retry reports it
            if dfd is not None:
                n = await fileio.pwrite_aligned(None, dfd, view[done:], offset + done)
            else:
                n = await fileio.pwrite(fd, view[done:], offset + done)
            if n <= 0:
                raise OSError(_errno.EIO, "short write")
            done += n

    async def pwrite(self, offset: int, data: bytes | bytearray | memoryview, *,
                     direct: bool = False) -> None:
        self._check_range("write", offset, len(data))
        fd = await self._enter()
        try:
            dfd = self._dfd
            if dfd is not None and await fileio.pwrite_aligned(None, dfd, data, offset) == len(data):
                return
            await self._write_all(fd, offset, data)
        except OSError as exc:
            raise self._error(exc, "write") from None
        finally:
            self._end()

    def can_write_now(self, length: int) -> bool:
        return (self._inline and self._fd is not None and self._dfd is None
                and length <= fileio.DIRECT_MAX)

    def pwrite_now(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        fd = self._fd
        if fd is None:
            raise TargetRetryableError(f"target {self.path} is not open")
        if offset < 0 or offset + len(data) > self._size:  # connected: _size is known
            self._check_range("write", offset, len(data))
        try:
            done = fileio.pwrite_now(fd, data, offset)
            while done < len(data):
                # short only when an error stopped it: writing the rest reports that error
                n = fileio.pwrite_now(fd, memoryview(data).cast("B")[done:], offset + done)
                if n <= 0:
                    raise OSError(_errno.EIO, "short write")
                done += n
        except OSError as exc:
            raise self._error(exc, "write") from None

    async def write_zeroes(self, offset: int, length: int) -> None:
        self._check_range("write-zeroes", offset, length)
        if length == 0:
            return
        fd = await self._enter()
        try:
            if self._punch:
                try:
                    if self._dfd is not None:
                        # whole pages only: the edges would be zeroed through the page cache
                        await self._punch_pages(fd, offset, length)
                    elif fileio.memory_backed(fd):  # tmpfs: cheaper than a thread hop (perf)
                        await trio.lowlevel.checkpoint()
                        punch_hole(fd, offset, length)
                    else:
                        await trio.to_thread.run_sync(punch_hole, fd, offset, length,
                                                      limiter=fileio.LIMITER)
                    return
                except OSError as exc:
                    if exc.errno not in (_errno.EOPNOTSUPP, _errno.ENOSYS, _errno.EINVAL):
                        raise
                    self._punch = False  # this file system cannot punch: write zeroes from now on
            zeroes = memoryview(bytes(min(_ZERO_CHUNK, length)))
            pos = 0
            while pos < length:
                n = min(len(zeroes), length - pos)
                await self._write_all(fd, offset + pos, zeroes[:n])
                pos += n
        except OSError as exc:
            raise self._error(exc, "write-zeroes") from None
        finally:
            self._end()

    async def _punch_pages(self, fd: int, offset: int, length: int) -> None:
        """Punch the whole pages of the range and write zeroes over its partial edge pages."""
        first = -(-offset // fileio.ALIGN) * fileio.ALIGN
        end = offset + length
        last = end - end % fileio.ALIGN
        if first >= last:
            await self._write_all(fd, offset, bytes(length))
            return
        await trio.to_thread.run_sync(punch_hole, fd, first, last - first, limiter=fileio.LIMITER)
        if offset < first:
            await self._write_all(fd, offset, bytes(first - offset))
        if last < end:
            await self._write_all(fd, last, bytes(end - last))

    async def flush(self) -> None:
        fd = await self._enter()
        try:
            await fileio.fsync(fd, datasync=True)
        except OSError as exc:
            raise self._error(exc, "flush") from None
        finally:
            self._end()

    async def close(self) -> None:
        fd, self._fd = self._fd, None
        dfd, self._dfd = self._dfd, None
        if fd is None:
            return
        with trio.CancelScope(shield=True):
            await self._idle.wait()  # requests still running keep using fd until they finish
        if dfd is not None:
            os.close(dfd)
        os.close(fd)
