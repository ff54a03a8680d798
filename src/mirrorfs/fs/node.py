"""Per-file state shared by all opens of one image: the seam between FUSE and the mirror engine.

One ``ImageNode`` exists per inode of a regular file under the mount; every ``open()`` of that file
adds an ``OpenHandle`` to ``node.handles``. The FUSE operations route I/O like this::

    read   -> node.job.read(handle, off, size)      if node.job else fileio.pread(handle.fd, ...)
    write  -> node.job.write(handle, off, data)     if node.job else fileio.pwrite(handle.fd, ...)
    flush/fsync -> node.job.fsync(handle, datasync) if node.job else fileio.fsync(handle.fd, ...)
    truncate / unlink / rename of the node -> node.job.check_modify(op) first (raises EBUSY)

Invariants:
- Each open has its OWN descriptor with its own access mode (QEMU keeps a read-only handle open
  while it opens the image again read-write; sharing one descriptor breaks its writes with EBADF).
- ``OpenHandle.fd`` never carries O_DIRECT: the buffers FUSE hands over are not aligned, and
  unaligned requests must still work. An O_DIRECT open gets ``direct_io`` in FUSE (the kernel
  does not cache it) and an O_DIRECT twin of ``fd`` (``fileio.open_direct_twin``) that
  ``fileio``'s pread/pwrite use for its aligned requests, so the source's pages stay out of the
  host's page cache too. Such a handle never runs inline: the twin's I/O waits for the device.
- New opens use ``node.backing_path``; the engine changes it (and may swap ``handle.fd`` of open
  handles) when it pivots the image to its target. ``getattr`` stats ``backing_path``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import trio

from .. import fileio

#: Flags the kernel passes to open() that must not be stored on (or passed to) the source fd.
#: O_CREAT/O_EXCL/O_TRUNC act once at open time; O_DIRECT would make unaligned Python buffers fail
#: with EINVAL (the descriptor's O_DIRECT twin carries it instead, see ``fileio``).
STRIPPED_OPEN_FLAGS = os.O_CREAT | os.O_EXCL | os.O_TRUNC | getattr(os, "O_DIRECT", 0)


@dataclass(eq=False)
class ImageNode:
    """One regular file under the mount, shared by all of its opens.

    Attributes:
        inode: the FUSE inode number (stable while mounted).
        relpath: path relative to the source directory, e.g. ``"vm.raw"`` or ``"d/x.qcow2"``;
            empty once the file was unlinked.
        backing_path: absolute path new opens use: the source file, or the target after a pivot.
        handles: ``fh -> OpenHandle`` for every open of this node.
        job: set by the mirror engine while a job (or a pivot forwarder) owns this node's I/O;
            ``None`` means plain passthrough.
    """

    inode: int
    relpath: str
    backing_path: str
    handles: dict[int, "OpenHandle"] = field(default_factory=dict)
    job: Any | None = None
    #: writes in flight that bypass the engine (no job was attached when they began):
    #: token -> (offset, length). A job that attaches marks these ranges dirty and waits for
    #: them before it copies, or a copy could read the source before such a write lands there
    #: and call the cluster clean.
    passthrough_writes: dict[int, tuple[int, int]] = field(default_factory=dict)
    _passthrough_idle: trio.Event | None = None
    _next_token: int = 0

    def begin_passthrough_write(self, offset: int, length: int) -> int:
        """Record a write that goes straight to the backing file; returns its token."""
        self._next_token += 1
        self.passthrough_writes[self._next_token] = (offset, length)
        return self._next_token

    def end_passthrough_write(self, token: int) -> None:
        del self.passthrough_writes[token]
        if not self.passthrough_writes and self._passthrough_idle is not None:
            self._passthrough_idle.set()
            self._passthrough_idle = None

    async def wait_passthrough_idle(self) -> None:
        """Wait until every write that bypassed the engine has finished."""
        while self.passthrough_writes:
            if self._passthrough_idle is None:
                self._passthrough_idle = trio.Event()
            await self._passthrough_idle.wait()

    @property
    def unlinked(self) -> bool:
        """True once the file's name was removed (open handles keep working)."""
        return self.relpath == ""


class OpenHandle:
    """One ``open()`` of an ``ImageNode``.

    Attributes:
        fh: the FUSE file handle number.
        node: the file this handle belongs to.
        flags: the open flags minus O_CREAT/O_EXCL/O_TRUNC/O_DIRECT (access mode, O_APPEND,
            O_SYNC, ... as the opener asked).
        fd: the descriptor of the backing file, opened with this handle's own access mode; the
            engine may swap it (pivot).
        direct: the opener asked for O_DIRECT (served with FUSE ``direct_io`` and an O_DIRECT
            twin of ``fd``, which follows ``fd`` when the engine swaps it).
        twin: that O_DIRECT twin of ``fd``; None where there is none (a buffered open, tmpfs,
            a filesystem that refuses O_DIRECT).
        inline_io: requests of up to ``fileio.DIRECT_MAX`` bytes may run ``fd``'s I/O on the trio
            thread (``fileio.inline_capable``); kept with ``fd``, so a swapped descriptor is
            asked anew.
    """

    __slots__ = ("fh", "node", "flags", "direct", "_fd", "inline_io", "twin")

    def __init__(self, fh: int, node: ImageNode, flags: int, fd: int, direct: bool = False,
                 inline_io: bool | None = None, twin: int | None = None) -> None:
        self.fh = fh
        self.node = node
        self.flags = flags
        self.direct = direct
        self.twin = twin
        if inline_io is None:
            self.fd = fd
        else:  # asked already, off the trio thread (fstatfs of a FUSE or NFS file can hang)
            self._fd = fd
            self.inline_io = inline_io

    @property
    def fd(self) -> int:
        return self._fd

    @fd.setter
    def fd(self, fd: int) -> None:
        # A swap (pivot) on the trio thread: the new file is a local target, whose open is quick.
        if self.direct and getattr(self, "_fd", None) is not None:
            fileio.close_twin(self.twin)
            self.twin = None
            self.twin = fileio.open_direct_twin(fd, self.flags, "source")
        self._fd = fd
        self.inline_io = self.twin is None and fileio.inline_capable(fd)

    def runs_inline(self, size: int) -> bool:
        """Whether a request of ``size`` bytes on this handle runs its I/O on the trio thread."""
        return self.inline_io and size <= fileio.DIRECT_MAX

    @property
    def writable(self) -> bool:
        """True if the handle was opened for writing."""
        return (self.flags & os.O_ACCMODE) in (os.O_WRONLY, os.O_RDWR)
