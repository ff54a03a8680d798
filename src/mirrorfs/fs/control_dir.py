"""The virtual ``MOUNTPOINT/.mirrorfs/`` directory: a small registry of generated files.

Components publish files here with ``operations.control_dir.register(name, VirtualFile(...))``:
``status`` and ``pid`` are registered by the mount itself; the job manager and QMP server add
``control``, ``status.json`` and ``socket``. Registering a name again replaces the file (so the job
manager can take over ``status``).

Invariants:
- Inode numbers of the directory and its files come from a reserved range below
  ``FIRST_DYNAMIC_INODE`` and never collide with files of the source directory.
- A file's content is generated once per open (``read()`` at open time), so ``cat`` sees one
  consistent snapshot however many read() calls it makes. Files are served with FUSE
  ``direct_io`` so the reported size never truncates what a reader gets.
- ``write()`` runs once per write(2) call; a ``MirrorfsError`` it raises fails that write(2) with
  the error's errno (EINVAL malformed, EBUSY refused), so ``echo cmd > control`` fails in a shell.
"""

from __future__ import annotations

import stat
from typing import Awaitable, Callable

import pyfuse3

from ..errors import UsageError

#: Name of the virtual directory in the mount's root.
CONTROL_DIR_NAME = ".mirrorfs"
#: Inode of the virtual directory (pyfuse3.ROOT_INODE is 1).
CONTROL_DIR_INODE = 2
#: Virtual files get inodes from here up to FIRST_DYNAMIC_INODE - 1.
_FIRST_FILE_INODE = 3
#: Files and directories of the source directory get inodes from here up.
FIRST_DYNAMIC_INODE = 1024

ReadFunc = Callable[[], bytes]
WriteFunc = Callable[[bytes, pyfuse3.RequestContext], Awaitable[None]]


class VirtualFile:
    """A generated file in ``.mirrorfs/``.

    Either pass callables or subclass and override ``read`` (and ``write`` for a writable file).

    Args:
        read: returns the whole content; called at each open.
        write: ``async write(data, ctx)``; makes the file writable when given.
        owner_only_write: only the mount's owner (and root) may write (mode 0600 vs 0644).
    """

    def __init__(self, read: ReadFunc | None = None, write: WriteFunc | None = None, *,
                 owner_only_write: bool = True) -> None:
        self._read = read
        self._write = write
        self.owner_only_write = owner_only_write

    @property
    def writable(self) -> bool:
        """True if ``write`` is supported."""
        return self._write is not None or type(self).write is not VirtualFile.write

    @property
    def mode(self) -> int:
        """st_mode: read-only files 0444; writable ones 0644 when only the owner may write
        (enforced at open, since the kernel lets root write anything), else 0666."""
        if not self.writable:
            return stat.S_IFREG | 0o444
        return stat.S_IFREG | (0o644 if self.owner_only_write else 0o666)

    def read(self) -> bytes:
        """Return the file's current content (called once per open)."""
        return self._read() if self._read is not None else b""

    async def write(self, data: bytes, ctx: pyfuse3.RequestContext) -> None:
        """Handle one write(2) call.

        Raises:
            MirrorfsError: the data is refused; its ``errno`` fails the write.
        """
        if self._write is None:
            raise UsageError("this file is read-only")
        await self._write(data, ctx)


class ControlDir:
    """The registry behind ``.mirrorfs/``: name -> VirtualFile, with stable reserved inodes."""

    def __init__(self) -> None:
        self._files: dict[str, VirtualFile] = {}
        self._inodes: dict[str, int] = {}
        self._names: dict[int, str] = {}
        self._next_inode = _FIRST_FILE_INODE

    def register(self, name: str, vfile: VirtualFile) -> int:
        """Publish ``vfile`` as ``.mirrorfs/NAME`` (replacing an earlier file of that name).

        Returns:
            the file's inode number (kept when a name is registered again).

        Raises:
            ValueError: the name is not a plain file name, or the reserved inode range is full.
        """
        if not name or "/" in name or name in (".", "..") or "\0" in name:
            raise ValueError(f"invalid control file name {name!r}")
        if name not in self._inodes:
            if self._next_inode >= FIRST_DYNAMIC_INODE:
                raise ValueError("too many control files")
            self._inodes[name] = self._next_inode
            self._names[self._next_inode] = name
            self._next_inode += 1
        self._files[name] = vfile
        return self._inodes[name]

    def unregister(self, name: str) -> None:
        """Remove ``.mirrorfs/NAME`` (its inode number stays reserved for it)."""
        self._files.pop(name, None)

    def names(self) -> list[str]:
        """The published names, sorted."""
        return sorted(self._files)

    def inode_of(self, name: str) -> int | None:
        """Inode of a published file, or None."""
        return self._inodes[name] if name in self._files else None

    def lookup_inode(self, inode: int) -> tuple[str, VirtualFile] | None:
        """``(name, file)`` for a published file's inode, or None."""
        name = self._names.get(inode)
        if name is None or name not in self._files:
            return None
        return name, self._files[name]

    @staticmethod
    def is_reserved(inode: int) -> bool:
        """True for the directory's and its files' inode numbers."""
        return CONTROL_DIR_INODE <= inode < FIRST_DYNAMIC_INODE
