"""The open handles of a mount: source opens, ``.mirrorfs/`` opens and directory listings.

Invariants:
- All kinds of handle share one counter, so a number names one handle of one kind.
- Each source open gets its own descriptor with its own access mode and never O_DIRECT; an
  O_DIRECT open gets an O_DIRECT twin of it besides (see ``node.py``). Closing them runs off the
  trio thread (close(2) may write back on NFS or ask a FUSE source), the twin first.
- A node whose name was removed is dropped from the inode table with its last handle, unless a
  job still holds it.
"""

from __future__ import annotations

import itertools
import os

import pyfuse3

from .. import fileio
from .control_dir import VirtualFile
from .inodes import InodeTable
from .node import STRIPPED_OPEN_FLAGS, ImageNode, OpenHandle
from .sourcecalls import close_fd, open_classified

_O_DIRECT = getattr(os, "O_DIRECT", 0)


def fd_flags(flags: int) -> int:
    """The flags of the source descriptor for an open with ``flags`` (see node.py)."""
    # O_APPEND is left to the kernel, which passes the end-of-file offset with each write.
    return (flags & ~STRIPPED_OPEN_FLAGS & ~os.O_APPEND & ~os.O_NOCTTY) | os.O_CLOEXEC


class VirtualHandle:
    """An open of a ``.mirrorfs/`` file: the content snapshot taken at open time."""

    __slots__ = ("vfile", "content", "ctx", "flags")

    def __init__(self, vfile: VirtualFile, content: bytes, ctx: pyfuse3.RequestContext, flags: int):
        self.vfile = vfile
        self.content = content
        self.ctx = ctx
        self.flags = flags


class HandleTable:
    """Every open handle of the mount, by FUSE file handle number.

    Attributes:
        files: ``fh -> OpenHandle`` of the source (image) opens.
        virtual: ``fh -> VirtualHandle`` of the ``.mirrorfs/`` opens.
        dirs: ``fh -> [(name, inode), ...]``, the listing taken at opendir.
    """

    def __init__(self, inodes: InodeTable) -> None:
        self._inodes = inodes
        self._counter = itertools.count(1)
        self.files: dict[int, OpenHandle] = {}
        self.virtual: dict[int, VirtualHandle] = {}
        self.dirs: dict[int, list[tuple[bytes, int]]] = {}

    def new_fh(self) -> int:
        return next(self._counter)

    async def open_source(self, node: ImageNode, flags: int) -> OpenHandle:
        """Open the node's backing file with this open's own access mode (see node.py)."""
        fdf = fd_flags(flags)
        if flags & os.O_TRUNC:
            if node.job is not None:
                node.job.check_modify("truncate")
            fdf |= os.O_TRUNC
        fd, twin, inline_io = await fileio.call(open_classified, node.backing_path, fdf,
                                                bool(flags & _O_DIRECT))
        return self.add(node, flags, fd, inline_io, twin)

    def add(self, node: ImageNode, flags: int, fd: int, inline_io: bool,
            twin: int | None = None) -> OpenHandle:
        """Register the open of ``node`` on ``fd`` (and ``twin``, its O_DIRECT twin, if
        ``flags`` ask for O_DIRECT and the filesystem gave one)."""
        fh = next(self._counter)
        direct = bool(flags & _O_DIRECT)
        handle = OpenHandle(fh=fh, node=node, flags=flags & ~STRIPPED_OPEN_FLAGS, fd=fd,
                            direct=direct, inline_io=inline_io and twin is None, twin=twin)
        node.handles[fh] = handle
        self.files[fh] = handle
        return handle

    def _drop(self, fh: int) -> OpenHandle | None:
        """Forget the open ``fh``; the caller closes its descriptor."""
        handle = self.files.pop(fh, None)
        if handle is None:
            return None
        node = handle.node
        node.handles.pop(fh, None)
        if node.unlinked and not node.handles and node.job is None:
            self._inodes.nodes.pop(node.inode, None)
        return handle

    async def release(self, fh: int) -> None:
        handle = self._drop(fh)
        if handle is not None:
            await fileio.call(close_fd, handle.fd, handle.node.backing_path, handle.twin)

    def close_all(self) -> None:
        """Close every source descriptor (at unmount, after the FUSE session ended)."""
        for fh in list(self.files):
            handle = self._drop(fh)
            if handle is not None:
                close_fd(handle.fd, handle.node.backing_path, handle.twin)
        self.virtual.clear()
        self.dirs.clear()
