"""Blocking file I/O for the trio world: the one place that decides where pread/pwrite/fsync run.

Every component that touches a file descriptor of an image (the FUSE passthrough, the mirror
engine, local targets) goes through ``pread``/``pwrite``/``fsync``, and the FUSE layer runs every
metadata call on the source (lookup, stat, open, create, rename, unlink, truncate, statfs,
directory listing, close) through ``call``, so the choice below is made once.

Where the calls run: in a worker thread (``trio.to_thread.run_sync`` with a shared
``CapacityLimiter``), except on memory-backed filesystems. Running a call on the trio thread is
cheaper, but a single request against slow storage (a stalled disk, NFS, a FUSE-on-FUSE source)
would then freeze *every* other request of the mount, including ``.mirrorfs/`` control files and
the QMP socket (tests/test_fs_concurrency.py proves it does not). A descriptor on tmpfs or ramfs
(no device, no network: the call costs a memory copy) never blocks, so in ``auto`` mode its
pread/pwrite run directly on the trio thread, where the thread hand-off would cost more than the
I/O itself. The question is asked per call (one ``fstatfs``), not per open, so the answer stays
right when a descriptor number is reused for another file. (``RWF_NOWAIT``, the kernel's own
"would this block" test, would be more general, but tmpfs answers it with EOPNOTSUPP.) ``fsync``
always runs in a thread: it is the call that can take seconds. The measurements behind this are
in docs/performance.md.

The FUSE request paths go one step further (``inline_capable``, ``pread_now``/``pwrite_now``):
the owner of a descriptor asks once (an ``OpenHandle`` at open and at a pivot, a local target at
connect) and keeps the answer with the descriptor, and a request on tmpfs then runs its whole I/O
without an ``await``, so it needs no gate and no in-flight bookkeeping (``MirrorJob.write``).

O_DIRECT (see ``open_direct_twin``): a descriptor opened for an O_DIRECT client gets a second
descriptor of the same file opened with O_DIRECT, its "twin" (as does the descriptor a copy
reads a disk-backed image through), which its owner keeps beside it. ``pread``/``pwrite``/
``preadinto`` and the ``_thread`` forms, given the twin, send aligned requests through it, never
on the trio thread (O_DIRECT I/O waits for the device): requests of up to a MiB by Linux AIO
(``aio.py``: no thread hop, which costs more CPU than the I/O), the rest and whatever AIO does not
take in a worker thread, via a reused page-aligned (mmap) buffer of that thread; unaligned
requests take the buffered descriptor, a whole request at a time: a read-modify-write of partial
blocks through the twin would race with concurrent writers of the same blocks. A local target in
direct mode (``targets/local.py``) is the exception: it never uses its buffered descriptor for
data, so its unaligned requests are reads-modify-writes (``pwrite_only_direct``), which the
mirror engine makes safe (an operation sharing a cluster with another leaves it dirty).

``MIRRORFS_IO_MODE`` in the environment: ``auto`` (default), ``thread`` (always a worker thread)
or ``direct`` (never; benchmarks only).
"""

from __future__ import annotations

import ctypes
import errno
import logging
import mmap
import os
import struct
import threading
import time
from typing import Any, Callable, TypeVar

import trio

from . import aio

T = TypeVar("T")

log = logging.getLogger(__name__)

#: "auto" (default), "thread" or "direct": where pread/pwrite run. fsync always runs in a thread.
IO_MODE: str = os.environ.get("MIRRORFS_IO_MODE", "auto")
if IO_MODE not in ("auto", "thread", "direct"):
    IO_MODE = "auto"

#: statfs f_type of filesystems whose reads and writes never wait for a device: tmpfs, ramfs.
_MEMORY_FS_TYPES = frozenset({0x01021994, 0x858458F6})
try:
    _fstatfs = ctypes.CDLL(None, use_errno=True).fstatfs
    _fstatfs.argtypes = (ctypes.c_int, ctypes.c_void_p)
    _fstatfs.restype = ctypes.c_int
except (OSError, AttributeError):  # not Linux/glibc: always use threads
    _fstatfs = None


def memory_backed(fd: int) -> bool:
    """True if ``fd`` is on tmpfs or ramfs, where I/O cannot block on a device (one syscall)."""
    if _fstatfs is None:
        return False
    buf = ctypes.create_string_buffer(128)  # struct statfs is 120 bytes on 64-bit Linux
    if _fstatfs(fd, buf) != 0:
        return False
    # f_type is the first member, a C long.
    return struct.unpack_from("l", buf)[0] in _MEMORY_FS_TYPES


#: In ``auto`` mode, larger calls (the copy task's chunks) still go to a worker thread: the hop
#: is small next to copying megabytes, and a read and a write can then use two cores while the
#: trio thread keeps serving requests.
DIRECT_MAX = int(os.environ.get("MIRRORFS_DIRECT_MAX", str(1 << 20)))


def _direct(fd: int, size: int) -> bool:
    if IO_MODE == "auto":
        return size <= DIRECT_MAX and memory_backed(fd)
    return IO_MODE == "direct"


def inline_capable(fd: int) -> bool:
    """Whether calls on ``fd`` of up to ``DIRECT_MAX`` bytes may run on the trio thread.

    For the request fast paths, which ask once per descriptor (at open, at a pivot, at a target's
    connect) instead of once per call, and then call ``pread_now``/``pwrite_now``: the owner of
    the descriptor keeps the answer together with the number, so a reused number is asked anew.
    """
    if IO_MODE == "auto":
        return memory_backed(fd)
    return IO_MODE == "direct"


def pread_now(fd: int, size: int, offset: int) -> bytes:
    """``pread`` on the trio thread, for a descriptor ``inline_capable`` said yes to.

    No checkpoint: a FUSE request handler that calls this finishes without yielding, and
    pyfuse3's request loop yields between requests anyway.
    """
    return os.pread(fd, size, offset)


def pwrite_now(fd: int, data: bytes | bytearray | memoryview, offset: int) -> int:
    """``pwrite`` of all of ``data`` on the trio thread (see ``pread_now``; short count as
    ``pwrite``)."""
    return _pwrite_all(fd, data, offset)


#: A direct call yields to the trio scheduler at most every YIELD_INTERVAL seconds (else it only
#: checks for cancellation): a scheduler pass costs more than a 4 KiB tmpfs write, yet a loop of
#: direct calls (the copy task) must still let the FUSE requests in.
#: ``MIRRORFS_YIELD_INTERVAL=0`` yields on every call (for benchmarks).
YIELD_INTERVAL = float(os.environ.get("MIRRORFS_YIELD_INTERVAL", "0.001"))
_last_yield = 0.0


async def _direct_checkpoint() -> None:
    global _last_yield
    now = time.monotonic()
    if now - _last_yield >= YIELD_INTERVAL:
        _last_yield = now
        await trio.lowlevel.checkpoint()
    else:
        await trio.lowlevel.checkpoint_if_cancelled()


#: Bounds the worker threads used by file I/O, so a burst of requests against a stalled source
#: cannot create an unbounded number of threads; 32 covers QEMU's default of 16-64 in-flight
#: requests without queuing most of them behind each other.
LIMITER = trio.CapacityLimiter(32)


def _pwrite_all(fd: int, data: bytes | bytearray | memoryview, offset: int) -> int:
    """Write as much of ``data`` as the file takes; a short count only if an error stopped it.

    A short write followed by an error (ENOSPC after a partial write) returns the short count, as
    write(2) does, so the caller sees exactly what reached the file; an error before any byte was
    written is raised.
    """
    n = os.pwrite(fd, data, offset)  # almost always all of it: no view, no loop
    if n == len(data) or n == 0:
        return n
    view = memoryview(data).cast("B")
    done = n
    while done < len(view):
        try:
            n = os.pwrite(fd, view[done:], offset + done)
        except OSError:
            if done:
                return done
            raise
        if n == 0:  # cannot happen for regular files; never loop forever
            break
        done += n
    return done


async def pread(fd: int, size: int, offset: int, twin: int | None = None) -> bytes:
    """Read up to ``size`` bytes at ``offset`` (short only at end of file); aligned requests
    through ``fd``'s O_DIRECT ``twin`` if it has one.

    Raises:
        OSError: the read failed; ``errno`` says why (EIO, EBADF, ...).
    """
    if twin is not None:
        return await pread_aligned(fd, twin, size, offset)
    if _direct(fd, size):
        await _direct_checkpoint()
        return os.pread(fd, size, offset)
    return await trio.to_thread.run_sync(os.pread, fd, size, offset, limiter=LIMITER)


def _preadinto_all(fd: int, view: memoryview, offset: int) -> int:
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n == 0:  # end of file
            break
        done += n
    return done


async def preadinto(fd: int, view: memoryview, offset: int, twin: int | None = None) -> int:
    """Read into ``view`` (a byte memoryview) at ``offset``; returns the bytes read, fewer only
    at end of file. For loops that reuse one buffer: a fresh multi-megabyte ``bytes`` per read
    costs its page faults every time.

    Raises:
        OSError: the read failed; ``errno`` says why.
    """
    if twin is not None:
        return await trio.to_thread.run_sync(_preadinto_twin, fd, twin, view, offset, limiter=LIMITER)
    if _direct(fd, len(view)):
        await _direct_checkpoint()
        return _preadinto_all(fd, view, offset)
    return await trio.to_thread.run_sync(_preadinto_all, fd, view, offset, limiter=LIMITER)


async def pwrite(fd: int, data: bytes | bytearray | memoryview, offset: int,
                 twin: int | None = None) -> int:
    """Write ``data`` at ``offset``; returns the number of bytes written (all unless an error).

    Raises:
        OSError: nothing could be written; ``errno`` says why (ENOSPC, EIO, EBADF, ...).
    """
    if twin is not None:
        return await pwrite_aligned(fd, twin, data, offset)
    if _direct(fd, len(data)):
        await _direct_checkpoint()
        return _pwrite_all(fd, data, offset)
    return await trio.to_thread.run_sync(_pwrite_all, fd, data, offset, limiter=LIMITER)


async def pread_thread(fd: int, size: int, offset: int, twin: int | None = None) -> bytes:
    """``pread`` off the trio thread, for a descriptor ``inline_capable`` said no to: in a
    worker thread, or by Linux AIO through ``twin`` (see ``pread_aligned``).

    Skips the per-call ``fstatfs`` of ``pread``: on a FUSE or NFS descriptor that call is itself a
    request to the (possibly stalled) filesystem, and it would run on the trio thread.
    """
    if twin is not None:
        return await pread_aligned(fd, twin, size, offset)
    return await trio.to_thread.run_sync(os.pread, fd, size, offset, limiter=LIMITER)


async def pwrite_thread(fd: int, data: bytes | bytearray | memoryview, offset: int,
                        twin: int | None = None) -> int:
    """``pwrite`` of all of ``data`` in a worker thread (see ``pread_thread``)."""
    if twin is not None:
        return await pwrite_aligned(fd, twin, data, offset)
    return await trio.to_thread.run_sync(_pwrite_all, fd, data, offset, limiter=LIMITER)


async def call(func: Callable[..., T], *args: Any) -> T:
    """Run a blocking metadata call (stat, open, rename, ...) on the source in a worker thread.

    Always a thread, even when the source directory is on tmpfs: a path can lead onto another
    filesystem (a mount below the source, a symlink), which one ``fstatfs`` cannot foresee, and
    a call on a stalled one would hold every request of the mount.

    Raises:
        whatever ``func`` raises (OSError with the source's errno).
    """
    if IO_MODE == "direct":
        await trio.lowlevel.checkpoint()
        return func(*args)
    return await trio.to_thread.run_sync(func, *args, limiter=LIMITER)


async def fsync(fd: int, datasync: bool = False) -> None:
    """Flush ``fd``'s data (and metadata unless ``datasync``) to stable storage, in a thread.

    Raises:
        OSError: the flush failed (EIO: data may be lost; the error must reach the caller).
    """
    func = os.fdatasync if datasync else os.fsync
    await trio.to_thread.run_sync(func, fd, limiter=LIMITER)


# ---------------------------------------------------------------------- O_DIRECT

#: Offsets, lengths and buffer addresses of requests sent through an O_DIRECT descriptor are
#: multiples of this: the page size covers every logical block size a disk reports (512, 4096).
ALIGN = mmap.PAGESIZE
_O_DIRECT = getattr(os, "O_DIRECT", 0)

#: (kind, st_dev) of filesystems already reported as refusing O_DIRECT: one log line each
_REFUSED: set[tuple[str, int]] = set()
_local = threading.local()


def open_direct(path: str, flags: int, kind: str) -> int | None:
    """Open ``path`` with ``flags | O_DIRECT``; None where its filesystem refuses O_DIRECT
    (EINVAL), which is logged once per ``kind`` of descriptor and filesystem.

    Raises:
        OSError: the open failed for another reason.
    """
    try:
        return os.open(path, flags | _O_DIRECT | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno != errno.EINVAL or not _O_DIRECT:
            raise
    try:
        dev = os.stat(path).st_dev
    except OSError:
        dev = -1
    if (kind, dev) not in _REFUSED:
        _REFUSED.add((kind, dev))
        log.info("the filesystem of %s refuses O_DIRECT: %s I/O on it stays buffered", path, kind)
    return None


def open_direct_twin(fd: int, flags: int, kind: str) -> int | None:
    """An O_DIRECT twin of the buffered descriptor ``fd``: the same file (opened through
    ``/proc/self/fd``, so a rename cannot make it another file), for the owner of ``fd`` to keep
    beside it and pass to ``pread``/``pwrite``. None where the filesystem refuses O_DIRECT, or
    where the file is in memory anyway (tmpfs).
    Blocking (an open): call it in a worker thread for a source that may be slow.

    Raises:
        OSError: the open failed for another reason than O_DIRECT.
    """
    if memory_backed(fd):
        # tmpfs: its page cache is the file, so O_DIRECT keeps nothing out of memory; a twin
        # would only move every request of the handle off the inline path into a thread.
        return None
    # Acts-once flags must not act again; O_APPEND would make pwrite ignore its offset.
    once = os.O_CREAT | os.O_EXCL | os.O_TRUNC | os.O_APPEND | os.O_NOCTTY
    return open_direct(f"/proc/self/fd/{fd}", flags & ~once, kind)


def open_copy_twin(fd: int) -> int | None:
    """An O_DIRECT twin for a copy's reads of ``fd`` on a disk (the page cache would keep the
    whole image a copy reads, evicting what the host uses); none on tmpfs or ramfs, whose pages
    are the file, nor where it cannot be opened (the reads then stay buffered)."""
    try:
        return open_direct_twin(fd, os.O_RDONLY, "source")
    except OSError as exc:
        log.info("the copy reads of descriptor %d stay buffered: %s", fd, exc.strerror or exc)
        return None


def close_twin(twin: int | None) -> None:
    """Close a twin that ``open_direct_twin`` returned (None: there is none)."""
    if twin is not None:
        os.close(twin)


def aligned_buffer(size: int) -> mmap.mmap:
    """A zeroed, page-aligned buffer of ``size`` bytes (anonymous memory, faulted in on use)."""
    return mmap.mmap(-1, max(size, 1))


def _bounce(size: int) -> memoryview:
    """The worker thread's own aligned buffer, at least ``size`` bytes, reused across calls."""
    buf = getattr(_local, "buf", None)
    if buf is None or len(buf) < size:
        buf = memoryview(aligned_buffer(max(size, 1 << 20)))
        _local.buf = buf
    return buf


def _is_aligned(offset: int, length: int) -> bool:
    return not (offset | length) % ALIGN


def _address(data: bytes | bytearray | memoryview) -> int | None:
    """The address of a writable buffer (an mmap-backed one); None for read-only ``bytes``."""
    try:
        return ctypes.addressof(ctypes.c_char.from_buffer(data))
    except TypeError:
        return None


def _pwrite_twin(fd: int, twin: int, data: bytes | bytearray | memoryview, offset: int) -> int:
    length = len(data)
    if length == 0 or not _is_aligned(offset, length):
        return _pwrite_all(fd, data, offset)
    address = None if isinstance(data, bytes) else _address(data)  # FUSE's bytes: no exception
    if address is not None and address % ALIGN == 0:
        view = data  # already aligned (the copy task's mmap buffers): no copy
    else:
        view = _bounce(length)[:length]
        view[:] = data
    try:
        return _pwrite_all(twin, view, offset)
    except OSError as exc:
        if exc.errno != errno.EINVAL:  # the filesystem wants a larger alignment: buffered
            raise
    return _pwrite_all(fd, data, offset)


def _pread_twin(fd: int, twin: int, size: int, offset: int) -> bytes:
    if size == 0 or not _is_aligned(offset, size):
        return os.pread(fd, size, offset)
    view = _bounce(size)
    try:
        n = _preadinto_all(twin, view[:size], offset)
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
        return os.pread(fd, size, offset)
    return view[:n].tobytes()  # a copy: the buffer is this thread's next request's


def _preadinto_twin(fd: int, twin: int, view: memoryview, offset: int) -> int:
    length = len(view)
    if length == 0 or not _is_aligned(offset, length):
        return _preadinto_all(fd, view, offset)
    address = _address(view)
    into = view if address is not None and address % ALIGN == 0 else _bounce(length)[:length]
    try:
        n = _preadinto_all(twin, into, offset)
    except OSError as exc:
        if exc.errno != errno.EINVAL:  # also a short read at an unaligned end of file: buffered
            raise
        return _preadinto_all(fd, view, offset)
    if into is not view:
        view[:n] = into[:n]
    return n


async def pwrite_aligned(fd: int | None, twin: int, data: bytes | bytearray | memoryview,
                         offset: int) -> int:
    """``pwrite`` through the O_DIRECT descriptor ``twin`` of ``fd``'s file where the request is
    aligned, else through ``fd`` (``fd`` None: through ``twin`` too, ``pwrite_only_direct``); off
    the trio thread (O_DIRECT I/O waits for the device): by Linux AIO where it takes the request,
    else in a worker thread."""
    length = len(data)
    if length and _is_aligned(offset, length):
        ctx = aio.context()
        if ctx is not None and await ctx.pwrite(twin, data, offset) is not None:
            return length
    if fd is None:
        return await trio.to_thread.run_sync(pwrite_only_direct, twin, data, offset, limiter=LIMITER)
    return await trio.to_thread.run_sync(_pwrite_twin, fd, twin, data, offset, limiter=LIMITER)


async def pread_aligned(fd: int | None, twin: int, size: int, offset: int) -> bytes:
    """``pread`` through ``twin`` where the request is aligned, else through ``fd`` (``fd`` None:
    through ``twin`` too, ``pread_only_direct``; see ``pwrite_aligned``)."""
    if size and _is_aligned(offset, size):
        ctx = aio.context()
        if ctx is not None:
            data = await ctx.pread(twin, size, offset)
            if data is not None:
                return data
    if fd is None:
        return await trio.to_thread.run_sync(pread_only_direct, twin, size, offset, limiter=LIMITER)
    return await trio.to_thread.run_sync(_pread_twin, fd, twin, size, offset, limiter=LIMITER)


# ------------------------------------------------ O_DIRECT only (a local target in direct mode)

def aligned_span(offset: int, length: int) -> tuple[int, int]:
    """The smallest ``ALIGN``-aligned (start, length) that covers ``length`` bytes at ``offset``."""
    start = offset - offset % ALIGN
    end = -(-(offset + length) // ALIGN) * ALIGN
    return start, end - start


def pread_only_direct(twin: int, size: int, offset: int) -> bytes:
    """Read ``size`` bytes at ``offset`` through the O_DIRECT ``twin`` alone, whatever their
    alignment: the covering aligned span is read into this thread's bounce buffer. Blocking.

    Raises:
        OSError: the read failed (EINVAL: the filesystem wants a larger alignment).
    """
    start, span = aligned_span(offset, size)
    buf = _bounce(span)
    n = _preadinto_all(twin, buf[:span], start)
    head = offset - start
    return buf[head:min(n, head + size)].tobytes() if n > head else b""


def pwrite_only_direct(twin: int, data: bytes | bytearray | memoryview, offset: int) -> int:
    """Write ``data`` at ``offset`` through the O_DIRECT ``twin`` alone, whatever its alignment:
    an unaligned request is a read-modify-write of its covering aligned span in this thread's
    bounce buffer. Blocking. The span must lie inside the file (no write may grow it), and no
    other writer may change the span's other bytes meanwhile (the mirror engine leaves any
    cluster two operations touched at once dirty, and a span never leaves its cluster).

    Returns:
        ``len(data)``, or fewer where an error stopped the write (as ``_pwrite_all``).

    Raises:
        OSError: nothing was written; ``errno`` says why.
    """
    length = len(data)
    if length == 0:
        return 0
    start, span = aligned_span(offset, length)
    if span == length and not isinstance(data, bytes):
        address = _address(data)
        if address is not None and address % ALIGN == 0:  # the copy task's mmap buffers: no copy
            return _pwrite_all(twin, data, offset)
    buf = _bounce(span)[:span]
    head = offset - start
    if span != length:
        n = _preadinto_all(twin, buf, start)
        if n < span:
            raise OSError(errno.EINVAL, "read-modify-write past the end of the file")
    buf[head:head + length] = data
    written = _pwrite_all(twin, buf, start)
    return max(0, min(length, written - head))

