"""The inode table of a mount: source-relative paths, inode numbers and the ``ImageNode`` of each
regular file that was looked up or opened.

Invariants:
- Inode numbers are stable while mounted: an entry is dropped only when its path is removed
  (unlink, rmdir, replaced by rename), never on FUSE ``forget``; a rename moves the entry and
  every entry below a renamed directory.
- A node whose path was removed stays in ``nodes`` while it has open handles or a job (it is
  still reachable through its descriptors); its ``relpath`` is then empty.
- The table never asks the source anything; the handlers do, then update the table (the kernel
  keeps the directories a request names locked until it is answered).
"""

from __future__ import annotations

import errno
import functools
import itertools
import os
from typing import Callable

import pyfuse3
from pyfuse3 import FUSEError

from .control_dir import CONTROL_DIR_INODE, FIRST_DYNAMIC_INODE
from .node import ImageNode

ROOT_INODE: int = pyfuse3.ROOT_INODE


class InodeTable:
    """Paths (relative to ``source_dir``) to inode numbers and back, plus the image nodes.

    Attributes:
        source_dir: absolute path of the source directory.
        nodes: ``inode -> ImageNode`` for every regular file looked up or open.
    """

    def __init__(self, source_dir: str) -> None:
        self.source_dir = source_dir
        self._path_of: dict[int, str] = {ROOT_INODE: ""}
        self._inode_of: dict[str, int] = {"": ROOT_INODE}
        self._counter = itertools.count(FIRST_DYNAMIC_INODE)
        self.nodes: dict[int, ImageNode] = {}

    def abspath(self, relpath: str) -> str:
        return os.path.join(self.source_dir, relpath) if relpath else self.source_dir

    def known(self, relpath: str) -> int | None:
        """The inode of ``relpath`` if the table has it, without adding it."""
        return self._inode_of.get(relpath)

    def inode_for(self, relpath: str) -> int:
        """The inode of ``relpath``, given a new number if the path is new to the table."""
        inode = self._inode_of.get(relpath)
        if inode is None:
            inode = next(self._counter)
            self._inode_of[relpath] = inode
            self._path_of[inode] = relpath
        return inode

    def node_for(self, inode: int, relpath: str) -> ImageNode:
        node = self.nodes.get(inode)
        if node is None:
            node = ImageNode(inode=inode, relpath=relpath, backing_path=self.abspath(relpath))
            self.nodes[inode] = node
        return node

    def relpath(self, inode: int) -> str:
        try:
            return self._path_of[inode]
        except KeyError:
            raise FUSEError(errno.ENOENT) from None

    def child(self, parent_inode: int, name: bytes) -> str:
        """Source-relative path of ``name`` in directory ``parent_inode``."""
        if parent_inode == CONTROL_DIR_INODE:
            raise FUSEError(errno.EPERM)
        parent = self.relpath(parent_inode)
        fname = os.fsdecode(name)
        if "/" in fname or fname in ("", ".", ".."):
            raise FUSEError(errno.EINVAL)
        return f"{parent}/{fname}" if parent else fname

    def forget_path(self, relpath: str) -> None:
        """Drop the entry of a removed path (and of everything below it)."""
        prefix = relpath + "/"
        for rel in [r for r in self._inode_of if r == relpath or r.startswith(prefix)]:
            inode = self._inode_of.pop(rel)
            self._path_of.pop(inode, None)
            node = self.nodes.get(inode)
            if node is not None:
                node.relpath = ""
                if not node.handles:
                    del self.nodes[inode]

    def move_paths(self, moves: list[tuple[str, str]]) -> None:
        """Give every entry at or below each ``old`` the path below ``new`` instead, all moves at
        once (so ``[(a, b), (b, a)]`` swaps two names)."""
        moved = []
        for old, new in moves:
            prefix = old + "/"
            moved += [(rel, new + rel[len(old):]) for rel in self._inode_of if rel == old or rel.startswith(prefix)]
        inodes = [self._inode_of.pop(rel) for rel, _ in moved]
        for (rel, target), inode in zip(moved, inodes):
            self._inode_of[target] = inode
            self._path_of[inode] = target
            node = self.nodes.get(inode)
            if node is not None:
                if node.backing_path == self.abspath(rel):
                    node.backing_path = self.abspath(target)
                node.relpath = target

    def check_modify(self, relpath: str, op: str, *, subtree: bool = False) -> None:
        """Ask the job of every node at (or, for directories, below) ``relpath`` to allow ``op``."""
        inode = self._inode_of.get(relpath)
        node = self.nodes.get(inode) if inode is not None else None
        if node is not None and node.job is not None:
            node.job.check_modify(op)
        if subtree:
            prefix = relpath + "/"
            for node in list(self.nodes.values()):
                if node.job is not None and node.relpath.startswith(prefix):
                    node.job.check_modify(op)

    def stat_plan(self, inode: int) -> Callable[[], os.stat_result]:
        """The blocking stat of what backs ``inode`` (decided here, run by the caller).

        The backing file for a node (after a pivot: the target), else the source path. An
        unlinked node is only reachable through an open descriptor (see ``fd_of_unlinked``).
        """
        node = self.nodes.get(inode)
        if node is not None:
            if node.unlinked:
                return functools.partial(_fstat_and_close, fd_of_unlinked(node))
            return functools.partial(os.stat, node.backing_path)
        return functools.partial(os.lstat, self.abspath(self.relpath(inode)))


def fd_of_unlinked(node: ImageNode) -> int:
    """A descriptor of the unlinked ``node`` for a call in a worker thread, which must close it.

    A copy (``dup``, which asks no filesystem): another request may close the handle's own
    descriptor, and the kernel reuse its number, while the thread works.
    """
    for handle in node.handles.values():
        return os.dup(handle.fd)
    raise FUSEError(errno.ENOENT)


def _fstat_and_close(fd: int) -> os.stat_result:
    try:
        return os.fstat(fd)
    finally:
        os.close(fd)
