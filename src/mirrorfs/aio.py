"""Linux native AIO for O_DIRECT descriptors, with completions delivered through trio's loop.

Why: an O_DIRECT request waits for the device. Sent to a worker thread (``trio.to_thread``), each
request costs two thread wake-ups and a hand-off of the GIL, which on this project's VMs is more
CPU than the I/O itself and caps a QD1 writer at a fraction of the disk (figures in
docs/performance.md). With AIO the trio thread submits the request (``io_submit`` returns once
the device has it) and the completions are picked up from the kernel's ring when an eventfd
says there are some, by the request itself when it is alone in flight, else by one reaper task
per trio run (``_lead``): no thread, and a stalled device still holds only the requests that
wait for it.

Each request is submitted with ``RWF_NOWAIT``: where the submission itself would block (a
filesystem lock, a write that allocates blocks or extends the file), the kernel refuses it with
EAGAIN instead, and a filesystem that cannot promise that (NFS, FUSE) refuses the flag at once,
so a request holds the trio thread only for its submission. Every outcome but a complete
transfer (a refusal, an error, a short count) returns None, and the caller runs the request its
usual way, which reports errors as before: rewriting the same bytes at the same offset, or
rereading them, is harmless.

Buffers: each of the ``DEPTH`` request slots owns a page-aligned buffer of ``SLOT_BYTES``, created
on first use and reused, so a request costs one copy of its bytes and no allocation.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import mmap
import os
import platform
import time

import outcome
import trio

log = logging.getLogger(__name__)

#: requests in flight per trio run; more wait for a slot in a worker thread (the caller's path)
DEPTH = 64
#: the largest request taken (a FUSE request is at most 1 MiB)
SLOT_BYTES = 1 << 20
#: requests wait for their own completion (``_lead``) once none overlapped for this long (s)
OVERLAP_WINDOW = 0.001

_SYSCALLS = {"x86_64": (206, 207, 208, 209), "aarch64": (0, 1, 4, 2)}
_IOCB_CMD_PREAD, _IOCB_CMD_PWRITE = 0, 1
_IOCB_FLAG_RESFD = 1
_RWF_NOWAIT = getattr(os, "RWF_NOWAIT", 8)


class _Iocb(ctypes.Structure):
    # struct iocb of <linux/aio_abi.h>, little-endian layout (aio_key before aio_rw_flags)
    _fields_ = [("data", ctypes.c_uint64), ("key", ctypes.c_uint32), ("rw_flags", ctypes.c_int32),
                ("opcode", ctypes.c_uint16), ("reqprio", ctypes.c_int16), ("fildes", ctypes.c_uint32),
                ("buf", ctypes.c_uint64), ("nbytes", ctypes.c_uint64), ("offset", ctypes.c_int64),
                ("reserved2", ctypes.c_uint64), ("flags", ctypes.c_uint32), ("resfd", ctypes.c_uint32)]


class _Event(ctypes.Structure):
    _fields_ = [("data", ctypes.c_uint64), ("obj", ctypes.c_uint64), ("res", ctypes.c_int64),
                ("res2", ctypes.c_int64)]


class _RingHeader(ctypes.Structure):
    # the head of struct aio_ring (fs/aio.c), which the kernel maps at the context's address;
    # its io_event array follows the header
    _fields_ = [("id", ctypes.c_uint), ("nr", ctypes.c_uint), ("head", ctypes.c_uint),
                ("tail", ctypes.c_uint), ("magic", ctypes.c_uint), ("compat_features", ctypes.c_uint),
                ("incompat_features", ctypes.c_uint), ("header_length", ctypes.c_uint)]


_AIO_RING_MAGIC = 0xA10A10A1
#: Completions are taken from the mapped ring without io_getevents (as libaio's and fio's
#: user-space reaping do; the kernel re-reads the head we advance) only where the CPU keeps
#: stores and loads in order (x86's TSO): elsewhere reading an event before the tail that
#: published it needs barriers that Python cannot issue.
_USER_REAP = platform.machine() == "x86_64"


class _Timespec(ctypes.Structure):
    _fields_ = [("sec", ctypes.c_long), ("nsec", ctypes.c_long)]


def _not_cancellable(_: object) -> trio.lowlevel.Abort:
    return trio.lowlevel.Abort.FAILED


def _cancellable(_: object) -> trio.lowlevel.Abort:
    return trio.lowlevel.Abort.SUCCEEDED


def _syscalls() -> tuple[ctypes._CFuncPtr, tuple[int, int, int, int]] | None:
    numbers = _SYSCALLS.get(platform.machine())
    if numbers is None or not hasattr(os, "eventfd") or not hasattr(os, "O_DIRECT"):
        return None
    try:
        func = ctypes.CDLL(None, use_errno=True).syscall
    except (OSError, AttributeError):
        return None
    func.restype = ctypes.c_long
    return func, numbers


_SYSCALL = _syscalls()


class AioContext:
    """One kernel AIO context, its eventfd, its request slots and their buffers.

    Created by ``context()`` inside a trio run; its reaper is a system task of that run.
    """

    def __init__(self) -> None:
        assert _SYSCALL is not None
        self._syscall, (self._nr_setup, self._nr_destroy, self._nr_getevents, self._nr_submit) = _SYSCALL
        self._ctx = ctypes.c_ulong(0)
        if self._syscall(self._nr_setup, DEPTH, ctypes.byref(self._ctx)) < 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
        try:
            self._efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        except OSError:
            self._syscall(self._nr_destroy, self._ctx)
            raise
        ring = _RingHeader.from_address(self._ctx.value)
        self._ring = ring if ring.magic == _AIO_RING_MAGIC else None
        #: the ring's events, where completions are read from it directly
        self._ring_events: ctypes.Array[_Event] | None = None
        if self._ring is not None and _USER_REAP and ring.header_length == ctypes.sizeof(_RingHeader):
            self._ring_events = (_Event * ring.nr).from_address(self._ctx.value + ring.header_length)
        self._iocbs = (_Iocb * DEPTH)()
        self._ptrs = [ctypes.pointer(self._iocbs[i]) for i in range(DEPTH)]
        self._refs = [ctypes.byref(p) for p in self._ptrs]
        self._events = (_Event * DEPTH)()
        self._zero_timeout = _Timespec(0, 0)
        self._buffers: list[mmap.mmap | None] = [None] * DEPTH
        self._views: list[memoryview | None] = [None] * DEPTH
        self._free = list(range(DEPTH))
        #: slot -> the task waiting for it
        self._waiting: dict[int, trio.lowlevel.Task] = {}
        #: the task that waits on the eventfd: a request's (see ``_lead``) or the reaper
        self._leader: trio.lowlevel.Task | None = None
        self._reaper: trio.lowlevel.Task | None = None
        self._reaper_parked = False
        #: when a request was last submitted while another was in flight (time.monotonic)
        self._overlapped = -OVERLAP_WINDOW
        self.broken = False

    def completed(self) -> bool:
        """Whether completions wait to be delivered (read from the kernel's ring: no syscall).

        For loops that serve requests without a scheduler pass (``fs/fuseloop.py``): the
        eventfd's waiter only runs in one, so such a loop must take one as soon as this says so.
        """
        ring = self._ring
        if ring is None:
            return bool(self._waiting)
        return ring.head != ring.tail

    @property
    def in_flight(self) -> int:
        """Requests submitted and not yet delivered."""
        return len(self._waiting)

    def _slot_view(self, slot: int) -> memoryview:
        view = self._views[slot]
        if view is None:
            buf = self._buffers[slot] = mmap.mmap(-1, SLOT_BYTES)
            view = self._views[slot] = memoryview(buf)
            # What a slot's requests share is set once: a ctypes field costs ~0.1 us a store.
            iocb = self._iocbs[slot]
            iocb.data = slot
            iocb.rw_flags = _RWF_NOWAIT
            iocb.buf = ctypes.addressof(ctypes.c_char.from_buffer(buf))
            iocb.flags = _IOCB_FLAG_RESFD
            iocb.resfd = self._efd
        return view

    async def _submit(self, opcode: int, fd: int, slot: int, length: int, offset: int) -> int | None:
        """Submit one request of ``slot`` and wait for its result (None: not taken)."""
        iocb = self._iocbs[slot]
        iocb.opcode = opcode
        iocb.fildes = fd
        iocb.nbytes = length
        iocb.offset = offset
        if self._syscall(self._nr_submit, self._ctx, 1, self._refs[slot]) != 1:
            return None  # EAGAIN (would block), EINVAL/EOPNOTSUPP (not for this file), ...
        task = self._waiting[slot] = trio.lowlevel.current_task()
        if self._leader is None:
            if time.monotonic() - self._overlapped > OVERLAP_WINDOW:
                return await self._lead(slot, task)
            self._hand_to_reaper()
        else:
            self._overlapped = time.monotonic()
        # Not cancellable: the kernel writes into the slot's buffer until the request completes.
        res: int = await trio.lowlevel.wait_task_rescheduled(_not_cancellable)
        return res

    async def _lead(self, slot: int, task: trio.lowlevel.Task) -> int:
        """Wait on the eventfd for ``slot``'s completion, delivering the others' meanwhile.

        A request submitted with nothing else in flight, when none overlapped for
        ``OVERLAP_WINDOW`` (QD1), waits on the eventfd itself: its completion then resumes it at
        once, where the reaper would wake, deliver it and let it run only in the next scheduler
        pass. Requests still in flight when it is done are left to the reaper, which keeps the
        wait while requests overlap (QD16): handing it from request to request cost more CPU
        per request there than the reaper's loop.
        """
        self._leader = task
        try:
            # Shielded: the kernel writes into the slot's buffer until the request completes.
            with trio.CancelScope(shield=True):
                while True:
                    await trio.lowlevel.wait_readable(self._efd)
                    try:
                        os.eventfd_read(self._efd)
                    except BlockingIOError:
                        pass
                    res = self._reap(slot)
                    if res is not None:
                        return res
        except Exception as exc:  # never seen; a failed wait must not strand the other requests
            self._fail(exc)
            return -errno.EIO
        finally:
            self._leader = None
            if self._waiting:
                self._hand_to_reaper()

    def _hand_to_reaper(self) -> None:
        """Let the reaper wait on the eventfd (if it has not run yet, it takes over when it does)."""
        if self._reaper is not None:
            self._leader = self._reaper
            if self._reaper_parked:
                self._reaper_parked = False
                trio.lowlevel.reschedule(self._reaper)

    async def pwrite(self, fd: int, data: bytes | bytearray | memoryview, offset: int) -> int | None:
        """Write all of ``data`` through the O_DIRECT ``fd`` (aligned offset and length); None,
        having perhaps written part of it, where the request was not completed here."""
        length = len(data)
        if self.broken or not self._free or length > SLOT_BYTES:
            return None
        slot = self._free.pop()
        try:
            self._slot_view(slot)[:length] = data
            res = await self._submit(_IOCB_CMD_PWRITE, fd, slot, length, offset)
        finally:
            self._free.append(slot)
        return res if res == length else None

    async def pread(self, fd: int, length: int, offset: int) -> bytes | None:
        """Read ``length`` bytes through the O_DIRECT ``fd``; None where not read in full here
        (also at the end of the file)."""
        if self.broken or not self._free or length > SLOT_BYTES:
            return None
        slot = self._free.pop()
        try:
            view = self._slot_view(slot)
            res = await self._submit(_IOCB_CMD_PREAD, fd, slot, length, offset)
            return view[:length].tobytes() if res == length else None
        finally:
            self._free.append(slot)

    def _reap(self, mine: int) -> int | None:
        """Deliver the completions waiting in the ring; ``mine``'s result is returned instead
        (None: not among them)."""
        own = None
        events = self._ring_events
        if events is not None:
            # One pass over the ring instead of io_getevents calls (a system call each, and
            # one more that finds nothing): an event is copied before the head moves past it,
            # since the kernel may then reuse its place.
            ring = self._ring
            assert ring is not None
            nr = ring.nr
            head = ring.head
            while head != ring.tail:
                event = events[head]
                slot, res = event.data, event.res
                head = (head + 1) % nr
                ring.head = head
                task = self._waiting.pop(slot, None)
                if slot == mine:
                    own = res
                elif task is not None:
                    trio.lowlevel.reschedule(task, outcome.Value(res))
            return own
        while self._waiting:
            n = self._syscall(self._nr_getevents, self._ctx, 0, DEPTH, self._events,
                              ctypes.byref(self._zero_timeout))
            if n <= 0:
                break
            for i in range(n):
                event = self._events[i]
                task = self._waiting.pop(event.data, None)
                if event.data == mine:
                    own = event.res
                elif task is not None:
                    trio.lowlevel.reschedule(task, outcome.Value(event.res))
        return own

    def _fail(self, exc: Exception) -> None:
        log.error("AIO completions failed: O_DIRECT requests use worker threads from now on",
                  exc_info=exc)
        self.broken = True
        for task in self._waiting.values():
            if task is not trio.lowlevel.current_task():
                trio.lowlevel.reschedule(task, outcome.Value(-errno.EIO))
        self._waiting.clear()

    async def run_reaper(self) -> None:
        """Deliver the completions of overlapping requests (a system task; see ``_lead``)."""
        me = self._reaper = trio.lowlevel.current_task()
        if self._waiting and self._leader is None:
            self._leader = me  # left in flight before this task first ran
        try:
            while True:
                if self._leader is not me:
                    # Parked until a request that waited on the eventfd leaves others in flight.
                    self._reaper_parked = True
                    await trio.lowlevel.wait_task_rescheduled(_cancellable)
                while self._waiting:
                    await trio.lowlevel.wait_readable(self._efd)
                    try:
                        os.eventfd_read(self._efd)
                    except BlockingIOError:
                        continue
                    self._reap(-1)
                self._leader = None
        except Exception as exc:  # never seen; a dead reaper must not take the mount with it
            self._fail(exc)
        finally:
            self._reaper = None
            self._leader = None
            self.close()

    def close(self) -> None:
        if self._efd < 0:
            return
        # io_destroy waits for requests still in flight, so no buffer is freed under the kernel.
        self._syscall(self._nr_destroy, self._ctx)
        os.close(self._efd)
        self._efd = -1
        self.broken = True


_CONTEXT: trio.lowlevel.RunVar = trio.lowlevel.RunVar("mirrorfs_aio", default=None)
_UNAVAILABLE = object()


def current() -> AioContext | None:
    """This trio run's AIO context if it has one (never creates it)."""
    ctx = _CONTEXT.get()
    return None if ctx is _UNAVAILABLE else ctx


def context() -> AioContext | None:
    """This trio run's AIO context, created with its reaper on first use; None where AIO is
    not available (other architectures, an exhausted ``fs.aio-max-nr``), logged once per run."""
    ctx = _CONTEXT.get()
    if ctx is None:
        if _SYSCALL is None:
            _CONTEXT.set(_UNAVAILABLE)
            return None
        try:
            ctx = AioContext()
        except OSError as exc:
            log.info("no Linux AIO (%s): O_DIRECT requests use worker threads", exc.strerror or exc)
            _CONTEXT.set(_UNAVAILABLE)
            return None
        _CONTEXT.set(ctx)
        trio.lowlevel.spawn_system_task(ctx.run_reaper, name="mirrorfs AIO reaper")
    return None if ctx is _UNAVAILABLE else ctx
