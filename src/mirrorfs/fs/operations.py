"""pyfuse3 ``Operations`` for mirrorfs: a thin passthrough of the source directory.

Role: translate FUSE requests into calls on the source directory (or on an ``ImageNode``'s job,
see ``node.py``) and nothing more. Everything that decides anything lives below (mirror engine)
or beside (``control_dir``).

Invariants:
- Inode numbers are stable while mounted: the table maps source-relative paths to inodes and
  entries are dropped only when the path is removed (unlink, rmdir, replaced by rename), never on
  FUSE ``forget``; renames move the entry (and every entry below a renamed directory).
- Every handler raises only ``FUSEError``: ``OSError`` becomes its errno, ``MirrorfsError`` its
  ``errno`` attribute, and anything else is a bug that is logged with its traceback and answered
  with EIO, because any other exception would end ``pyfuse3.main()`` and leave a dead mount.
- Each open gets its own source descriptor with its own access mode and never O_DIRECT.
- No call on the source runs on the trio thread, metadata included (``fileio.call``): a source
  directory may be, or hold, a slow filesystem (NFS, another FUSE), and a request it holds must
  hold only itself. The exceptions: the inline read/write paths of descriptors on tmpfs
  (``fileio.inline_capable``), and ``dup``, which asks no filesystem. The kernel keeps the
  directories a request names locked until it is answered, so the inode table may be updated
  after the ``await``.
- Files and directories created for another user (the daemon runs as root) get their owner and
  mode through the new descriptor, never by path: the name may point elsewhere by then.
- Writes are never cached by the kernel (no writeback cache): each one reaches a handler, so the
  mirror engine sees every write before it returns to the writer.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import inspect
import itertools
import logging
import os
import stat
import time
import types
from typing import Any, Awaitable, Callable, Iterator, TypeVar

import pyfuse3
from pyfuse3 import FUSEError

from .. import fileio
from ..errors import MirrorfsError, UsageError
from ..metrics.requests import SLOT_OF, RequestStats, Timing
from .control_dir import CONTROL_DIR_INODE, CONTROL_DIR_NAME, FIRST_DYNAMIC_INODE, ControlDir, VirtualFile
from .node import STRIPPED_OPEN_FLAGS, ImageNode, OpenHandle
from .rename2 import RENAME_EXCHANGE, RENAME_NOREPLACE, rename2

log = logging.getLogger(__name__)

ROOT_INODE: int = pyfuse3.ROOT_INODE
_CONTROL_NAME_B = CONTROL_DIR_NAME.encode()
#: How long the kernel may cache names and attributes. Short, because the mirror engine can change
#: what backs a file (pivot) and sizes must come from the backing file.
ENTRY_TIMEOUT = 1.0
ATTR_TIMEOUT = 1.0
_O_DIRECT = getattr(os, "O_DIRECT", 0)
_O_NOATIME = getattr(os, "O_NOATIME", 0)

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


def _fuse_error(name: str, exc: Exception) -> FUSEError:
    """The ``FUSEError`` that answers a request whose handler ``name`` raised ``exc``."""
    if isinstance(exc, OSError):
        log.debug("%s: %s", name, exc)
        return FUSEError(exc.errno or errno.EIO)
    if isinstance(exc, MirrorfsError):
        log.info("%s refused: %s", name, exc)
        return FUSEError(exc.errno)
    # A bug. Answer the request with EIO and keep serving everything else.
    log.error("BUG in FUSE handler %s; request answered with EIO", name, exc_info=exc)
    return FUSEError(errno.EIO)


def _guard(func: F, timing: Timing | None = None) -> F:
    """Make a request handler raise nothing but ``FUSEError`` (see the module invariants).

    With ``timing`` (``--metrics``, see ``Operations.time_requests``), also count and time each
    call, here rather than in a wrapper of its own: one coroutine frame less per request.
    """
    if timing is None:
        @functools.wraps(func)
        async def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                return await func(*args, **kwargs)
            except FUSEError:
                raise
            except Exception as exc:
                raise _fuse_error(func.__name__, exc) from None

        return wrapper  # type: ignore[return-value]

    buckets, total, clock = timing.buckets, timing.total, time.perf_counter_ns

    @functools.wraps(func)
    async def timed(*args: Any, **kwargs: Any) -> Any:
        start = clock()
        try:
            return await func(*args, **kwargs)
        except FUSEError:
            raise
        except Exception as exc:
            raise _fuse_error(func.__name__, exc) from None
        finally:
            elapsed = clock() - start
            buckets[SLOT_OF[(elapsed - 1).bit_length()]] += 1
            total[0] += elapsed

    return timed  # type: ignore[return-value]


class _VirtualHandle:
    """An open of a ``.mirrorfs/`` file: the content snapshot taken at open time."""

    __slots__ = ("vfile", "content", "ctx", "flags")

    def __init__(self, vfile: VirtualFile, content: bytes, ctx: pyfuse3.RequestContext, flags: int):
        self.vfile = vfile
        self.content = content
        self.ctx = ctx
        self.flags = flags


class Operations(pyfuse3.Operations):
    """Passthrough of ``source_dir`` plus the virtual ``.mirrorfs/`` directory.

    Args:
        source_dir: the directory whose files the mount exposes.

    Attributes:
        control_dir: registry of ``.mirrorfs/`` files (``register(name, VirtualFile)``).
        source_dir: absolute path of the source directory.
    """

    supports_dot_lookup = False
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, source_dir: str) -> None:
        super().__init__()
        self.source_dir = os.path.abspath(source_dir)
        self.control_dir = ControlDir()
        self._started_ns = time.time_ns()
        self._owner_uid = os.getuid()
        self._owner_gid = os.getgid()
        self._is_root = os.geteuid() == 0
        # The inode table: see the module invariant "stable inode numbers".
        self._path_of: dict[int, str] = {ROOT_INODE: ""}
        self._inode_of: dict[str, int] = {"": ROOT_INODE}
        self._inode_counter = itertools.count(FIRST_DYNAMIC_INODE)
        self._nodes: dict[int, ImageNode] = {}
        # File handles of all kinds share one counter so a number identifies one kind of handle.
        self._fh_counter = itertools.count(1)
        self._handles: dict[int, OpenHandle] = {}
        self._vhandles: dict[int, _VirtualHandle] = {}
        self._dirs: dict[int, list[tuple[bytes, int]]] = {}

    # ------------------------------------------------------------------ the seam (public API)

    def node_for_relpath(self, relpath: str) -> ImageNode:
        """The ``ImageNode`` of the regular file at ``relpath``, created if never looked up.

        Args:
            relpath: path relative to the source directory (``"vm.raw"``, ``"d/x.qcow2"``);
                a leading ``/`` is ignored.

        Raises:
            UsageError: no regular file by that name exists in the source directory.
        """
        rel = os.path.normpath(relpath.lstrip("/")) if relpath.strip("/") else ""
        if not rel or rel == "." or rel.startswith("..") or rel.split("/")[0] == CONTROL_DIR_NAME:
            raise UsageError(f"invalid image name {relpath!r}: give a file path relative to the mount")
        inode = self._inode_of.get(rel)
        if inode is not None and inode in self._nodes:
            return self._nodes[inode]
        try:
            st = os.stat(self._abspath(rel))
        except OSError as exc:
            raise UsageError(f"no such image {relpath!r} in the mount ({exc.strerror})") from None
        if not stat.S_ISREG(st.st_mode):
            raise UsageError(f"{relpath!r} is not a regular file")
        return self._node_for(self._inode_for(rel), rel)

    def nodes(self) -> Iterator[ImageNode]:
        """Every ``ImageNode`` currently known (looked up or open)."""
        return iter(list(self._nodes.values()))

    def time_requests(self, stats: RequestStats) -> None:
        """Count and time every request type into ``stats`` from now on (``--metrics``).

        pyfuse3 looks each handler up on this object per request, so the timed guards set here
        as instance attributes take over, and a mount without metrics pays nothing for them.
        """
        for name in dir(pyfuse3.Operations):
            handler = getattr(type(self), name)
            if not name.startswith("_") and inspect.iscoroutinefunction(handler):
                unguarded = getattr(handler, "__wrapped__", handler)
                setattr(self, name, types.MethodType(_guard(unguarded, stats.timing(name)), self))

    def handle(self, fh: int) -> OpenHandle:
        """The ``OpenHandle`` for a FUSE file handle.

        Raises:
            KeyError: no such open handle.
        """
        return self._handles[fh]

    # ------------------------------------------------------------------ inode table helpers

    def _abspath(self, relpath: str) -> str:
        return os.path.join(self.source_dir, relpath) if relpath else self.source_dir

    def _inode_for(self, relpath: str) -> int:
        inode = self._inode_of.get(relpath)
        if inode is None:
            inode = next(self._inode_counter)
            self._inode_of[relpath] = inode
            self._path_of[inode] = relpath
        return inode

    def _node_for(self, inode: int, relpath: str) -> ImageNode:
        node = self._nodes.get(inode)
        if node is None:
            node = ImageNode(inode=inode, relpath=relpath, backing_path=self._abspath(relpath))
            self._nodes[inode] = node
        return node

    def _relpath(self, inode: int) -> str:
        try:
            return self._path_of[inode]
        except KeyError:
            raise FUSEError(errno.ENOENT) from None

    def _child(self, parent_inode: int, name: bytes) -> str:
        """Source-relative path of ``name`` in directory ``parent_inode``."""
        if parent_inode == CONTROL_DIR_INODE:
            raise FUSEError(errno.EPERM)
        parent = self._relpath(parent_inode)
        fname = os.fsdecode(name)
        if "/" in fname or fname in ("", ".", ".."):
            raise FUSEError(errno.EINVAL)
        return f"{parent}/{fname}" if parent else fname

    def _forget_path(self, relpath: str) -> None:
        """Drop the table entry of a removed path (and of everything below it)."""
        prefix = relpath + "/"
        for rel in [r for r in self._inode_of if r == relpath or r.startswith(prefix)]:
            inode = self._inode_of.pop(rel)
            self._path_of.pop(inode, None)
            node = self._nodes.get(inode)
            if node is not None:
                node.relpath = ""
                if not node.handles:
                    del self._nodes[inode]

    def _move_paths(self, moves: list[tuple[str, str]]) -> None:
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
            node = self._nodes.get(inode)
            if node is not None:
                if node.backing_path == self._abspath(rel):
                    node.backing_path = self._abspath(target)
                node.relpath = target

    def _check_modify(self, relpath: str, op: str, *, subtree: bool = False) -> None:
        """Ask the job of every node at (or, for directories, below) ``relpath`` to allow ``op``."""
        inode = self._inode_of.get(relpath)
        node = self._nodes.get(inode) if inode is not None else None
        if node is not None and node.job is not None:
            node.job.check_modify(op)
        if subtree:
            prefix = relpath + "/"
            for node in list(self._nodes.values()):
                if node.job is not None and node.relpath.startswith(prefix):
                    node.job.check_modify(op)

    def _check_not_control(self, parent_inode: int, name: bytes) -> None:
        if parent_inode == CONTROL_DIR_INODE or (parent_inode == ROOT_INODE and name == _CONTROL_NAME_B):
            raise FUSEError(errno.EPERM)

    # ------------------------------------------------------------------ attributes

    def _attr(self, inode: int, st: os.stat_result) -> pyfuse3.EntryAttributes:
        entry = pyfuse3.EntryAttributes()
        entry.st_ino = inode
        entry.generation = 0
        entry.entry_timeout = ENTRY_TIMEOUT
        entry.attr_timeout = ATTR_TIMEOUT
        entry.st_mode = st.st_mode
        entry.st_nlink = st.st_nlink
        entry.st_uid = st.st_uid
        entry.st_gid = st.st_gid
        entry.st_rdev = st.st_rdev
        entry.st_size = st.st_size
        entry.st_blksize = st.st_blksize
        entry.st_blocks = st.st_blocks
        entry.st_atime_ns = st.st_atime_ns
        entry.st_mtime_ns = st.st_mtime_ns
        entry.st_ctime_ns = st.st_ctime_ns
        return entry

    def _virtual_attr(self, inode: int, mode: int, size: int, nlink: int = 1) -> pyfuse3.EntryAttributes:
        entry = pyfuse3.EntryAttributes()
        entry.st_ino = inode
        # Never cached: the content (and so the size) changes all the time.
        entry.entry_timeout = 0
        entry.attr_timeout = 0
        entry.st_mode = mode
        entry.st_nlink = nlink
        entry.st_uid = self._owner_uid
        entry.st_gid = self._owner_gid
        entry.st_size = size
        entry.st_blksize = 4096
        entry.st_blocks = (size + 511) // 512
        entry.st_atime_ns = entry.st_mtime_ns = entry.st_ctime_ns = self._started_ns
        return entry

    def _stat_plan(self, inode: int) -> Callable[[], os.stat_result]:
        """The blocking stat of what backs ``inode`` (decided here, run by the caller).

        The backing file for a node (after a pivot: the target), else the source path. An
        unlinked node is only reachable through an open descriptor (see ``_fd_of_unlinked``).
        """
        node = self._nodes.get(inode)
        if node is not None:
            if node.unlinked:
                return functools.partial(_fstat_and_close, self._fd_of_unlinked(node))
            return functools.partial(os.stat, node.backing_path)
        return functools.partial(os.lstat, self._abspath(self._relpath(inode)))

    def _fd_of_unlinked(self, node: ImageNode) -> int:
        """A descriptor of the unlinked ``node`` for a call in a worker thread, which must close it.

        A copy (``dup``, which asks no filesystem): another request may close the handle's own
        descriptor, and the kernel reuse its number, while the thread works.
        """
        for handle in node.handles.values():
            return os.dup(handle.fd)
        raise FUSEError(errno.ENOENT)

    def _virtual_getattr(self, inode: int) -> pyfuse3.EntryAttributes | None:
        """Attributes of ``.mirrorfs`` and its files; None for any other inode."""
        if inode == CONTROL_DIR_INODE:
            return self._virtual_attr(inode, stat.S_IFDIR | 0o755, 0, nlink=2)
        found = self.control_dir.lookup_inode(inode)
        if found is not None:
            _, vfile = found
            return self._virtual_attr(inode, vfile.mode, len(vfile.read()))
        if self.control_dir.is_reserved(inode):
            raise FUSEError(errno.ENOENT)
        return None

    async def _getattr(self, inode: int) -> pyfuse3.EntryAttributes:
        attr = self._virtual_getattr(inode)
        if attr is not None:
            return attr
        # Source metadata can be slow too (NFS, a FUSE source): never stat on the trio thread.
        return self._attr(inode, await fileio.call(self._stat_plan(inode)))

    async def _lookup(self, parent_inode: int, name: bytes) -> pyfuse3.EntryAttributes:
        if parent_inode == ROOT_INODE and name == _CONTROL_NAME_B:
            return await self._getattr(CONTROL_DIR_INODE)
        if parent_inode == CONTROL_DIR_INODE:
            inode = self.control_dir.inode_of(os.fsdecode(name))
            if inode is None:
                raise FUSEError(errno.ENOENT)
            return await self._getattr(inode)
        relpath = self._child(parent_inode, name)
        st = await fileio.call(os.lstat, self._abspath(relpath))
        # No race with unlink/rename of this name while we waited: the kernel holds the
        # directory's lock across both, so table updates stay consistent with the source.
        inode = self._inode_for(relpath)
        if stat.S_ISREG(st.st_mode):
            node = self._node_for(inode, relpath)
            if node.backing_path != self._abspath(relpath):
                st = await fileio.call(os.stat, node.backing_path)
        return self._attr(inode, st)

    # ------------------------------------------------------------------ metadata handlers

    @_guard
    async def lookup(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return await self._lookup(parent_inode, name)

    @_guard
    async def forget(self, inode_list: Any) -> None:
        # Entries are kept while their path exists (stable inode numbers); nothing to do.
        return None

    @_guard
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext | None = None) -> pyfuse3.EntryAttributes:
        return await self._getattr(inode)

    @_guard
    async def setattr(self, inode: int, attr: pyfuse3.EntryAttributes, fields: pyfuse3.SetattrFields,
                      fh: int | None, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        if self.control_dir.is_reserved(inode):
            # `echo cmd > .mirrorfs/control` truncates first: accept and ignore it.
            if fields.update_size and not (fields.update_mode or fields.update_uid or fields.update_gid):
                return await self._getattr(inode)
            raise FUSEError(errno.EPERM)
        node = self._nodes.get(inode)
        if fields.update_size and node is not None and node.job is not None:
            node.job.check_modify("truncate")
        path = ""
        if node is None:
            path = self._abspath(self._relpath(inode))
        elif not node.unlinked:
            path = node.backing_path
        # An unlinked file can only be reached through a descriptor.
        fd = self._fd_of_unlinked(node) if node is not None and node.unlinked else None
        st = await fileio.call(self._apply_setattr, path, fd, node is not None, attr, fields)
        return self._attr(inode, st)

    @staticmethod
    def _apply_setattr(path: str, fd: int | None, follow: bool, attr: pyfuse3.EntryAttributes,
                       fields: pyfuse3.SetattrFields) -> os.stat_result:
        """The blocking part of ``setattr``, on ``fd`` (which it closes) if given, else on
        ``path``; returns the new attributes (``follow``: stat through a symlink, as getattr does
        for image nodes)."""
        try:
            Operations._apply_setattr_fields(path, fd, attr, fields)
            if fd is not None:
                return os.fstat(fd)
            return os.stat(path) if follow else os.lstat(path)
        finally:
            if fd is not None:
                os.close(fd)

    @staticmethod
    def _apply_setattr_fields(path: str, fd: int | None, attr: pyfuse3.EntryAttributes,
                              fields: pyfuse3.SetattrFields) -> None:
        if fields.update_size:
            if fd is not None:
                os.ftruncate(fd, attr.st_size)
            else:
                os.truncate(path, attr.st_size)
        if fields.update_mode:
            if fd is not None:
                os.fchmod(fd, stat.S_IMODE(attr.st_mode))
            else:
                # The kernel resolves symlinks before chmod, so path is never a symlink here.
                os.chmod(path, stat.S_IMODE(attr.st_mode))
        if fields.update_uid or fields.update_gid:
            uid = attr.st_uid if fields.update_uid else -1
            gid = attr.st_gid if fields.update_gid else -1
            if fd is not None:
                os.fchown(fd, uid, gid)
            else:
                os.chown(path, uid, gid, follow_symlinks=False)
        if fields.update_atime or fields.update_mtime:
            cur = os.fstat(fd) if fd is not None else os.lstat(path)
            atime = attr.st_atime_ns if fields.update_atime else cur.st_atime_ns
            mtime = attr.st_mtime_ns if fields.update_mtime else cur.st_mtime_ns
            if fd is not None:
                os.utime(fd, ns=(atime, mtime))
            else:
                os.utime(path, ns=(atime, mtime), follow_symlinks=False)

    @_guard
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        if self.control_dir.is_reserved(inode):
            raise FUSEError(errno.EINVAL)
        return os.fsencode(await fileio.call(os.readlink, self._abspath(self._relpath(inode))))

    @_guard
    async def mkdir(self, parent_inode: int, name: bytes, mode: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        self._check_not_control(parent_inode, name)
        relpath = self._child(parent_inode, name)
        st = await fileio.call(self._make_dir, self._abspath(relpath), self._new_mode(mode, ctx),
                               self._new_owner(ctx))
        return self._attr(self._inode_for(relpath), st)

    @staticmethod
    def _make_dir(path: str, mode: int, owner: tuple[int, int] | None) -> os.stat_result:
        os.mkdir(path, mode)
        try:
            # Not by path: between mkdir and chown the name could be renamed away and replaced.
            # O_NOFOLLOW | O_DIRECTORY: whatever took the name, never a symlink or a file.
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                return _set_owner_and_mode(fd, owner, mode)
            finally:
                os.close(fd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.rmdir(path)  # only if still empty: nothing of anyone else's goes
            raise

    @_guard
    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        self._check_not_control(parent_inode, name)
        relpath = self._child(parent_inode, name)
        await fileio.call(os.rmdir, self._abspath(relpath))
        self._forget_path(relpath)

    @_guard
    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        self._check_not_control(parent_inode, name)
        relpath = self._child(parent_inode, name)
        self._check_modify(relpath, "unlink")
        await fileio.call(os.unlink, self._abspath(relpath))
        self._forget_path(relpath)

    @_guard
    async def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int, name_new: bytes,
                     flags: int, ctx: pyfuse3.RequestContext) -> None:
        self._check_not_control(parent_inode_old, name_old)
        self._check_not_control(parent_inode_new, name_new)
        old = self._child(parent_inode_old, name_old)
        new = self._child(parent_inode_new, name_new)
        if flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE):
            raise FUSEError(errno.EINVAL)  # RENAME_WHITEOUT: for overlay filesystems only
        # Both sides: the file moved away and the one it replaces (or trades places with).
        self._check_modify(old, "rename", subtree=True)
        self._check_modify(new, "rename", subtree=True)
        # The flags go to the kernel: "is the new name free?" is answered atomically there.
        await fileio.call(rename2, self._abspath(old), self._abspath(new), flags)
        if old == new:
            return
        if flags & RENAME_EXCHANGE:
            self._move_paths([(old, new), (new, old)])
        else:
            self._forget_path(new)
            self._move_paths([(old, new)])

    @_guard
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        sv = await fileio.call(os.statvfs, self.source_dir)
        data = pyfuse3.StatvfsData()
        for attr in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail",
                     "f_files", "f_ffree", "f_favail", "f_namemax"):
            setattr(data, attr, getattr(sv, attr))
        return data

    @_guard
    async def access(self, inode: int, mode: int, ctx: pyfuse3.RequestContext) -> bool:
        # Permission checks are the kernel's (default_permissions); only existence is ours.
        await self._getattr(inode)
        return True

    # ------------------------------------------------------------------ directories

    @_guard
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        if inode == CONTROL_DIR_INODE:
            entries = [(n.encode(), self.control_dir.inode_of(n) or 0) for n in self.control_dir.names()]
        else:
            relpath = self._relpath(inode)
            entries = []
            if inode == ROOT_INODE:
                entries.append((_CONTROL_NAME_B, CONTROL_DIR_INODE))
            for name in await fileio.call(_list_dir, self._abspath(relpath)):
                if inode == ROOT_INODE and name == CONTROL_DIR_NAME:
                    continue  # the source's own .mirrorfs never shows through
                rel = f"{relpath}/{name}" if relpath else name
                entries.append((os.fsencode(name), self._inode_for(rel)))
        fh = next(self._fh_counter)
        self._dirs[fh] = entries
        return fh

    @_guard
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        entries = self._dirs.get(fh)
        if entries is None:
            raise FUSEError(errno.EBADF)
        # Decide every stat here, run them all in one hop off the trio thread, then reply.
        wanted: list[tuple[int, bytes, int, pyfuse3.EntryAttributes | Callable[[], os.stat_result]]] = []
        for index in range(start_id, len(entries)):
            name, inode = entries[index]
            try:
                wanted.append((index, name, inode, self._virtual_getattr(inode) or self._stat_plan(inode)))
            except (OSError, FUSEError):
                continue  # removed since opendir

        def run_stats() -> list[os.stat_result | None]:
            results: list[os.stat_result | None] = []
            for _, _, _, item in wanted:
                try:
                    results.append(None if isinstance(item, pyfuse3.EntryAttributes) else item())
                except OSError:
                    results.append(None)
            return results

        stats = await fileio.call(run_stats)
        for (index, name, inode, item), st in zip(wanted, stats):
            if isinstance(item, pyfuse3.EntryAttributes):
                attr = item
            elif st is None:
                continue  # removed since opendir
            else:
                attr = self._attr(inode, st)
            # readdirplus: the kernel caches these as lookups, so they must be complete.
            if not pyfuse3.readdir_reply(token, name, attr, index + 1):
                break

    @_guard
    async def releasedir(self, fh: int) -> None:
        self._dirs.pop(fh, None)

    # ------------------------------------------------------------------ files

    async def _open_source(self, node: ImageNode, flags: int) -> OpenHandle:
        """Open the node's backing file with this open's own access mode (see node.py)."""
        fd_flags = self._fd_flags(flags)
        if flags & os.O_TRUNC:
            if node.job is not None:
                node.job.check_modify("truncate")
            fd_flags |= os.O_TRUNC
        # O_APPEND is left to the kernel, which passes the end-of-file offset with each write.
        fd, inline_io = await fileio.call(_open_classified, node.backing_path, fd_flags)
        return self._add_handle(node, flags, fd, inline_io)

    @staticmethod
    def _fd_flags(flags: int) -> int:
        """The flags of the source descriptor for an open with ``flags`` (see node.py)."""
        return (flags & ~STRIPPED_OPEN_FLAGS & ~os.O_APPEND & ~os.O_NOCTTY) | os.O_CLOEXEC

    def _add_handle(self, node: ImageNode, flags: int, fd: int, inline_io: bool) -> OpenHandle:
        fh = next(self._fh_counter)
        handle = OpenHandle(fh=fh, node=node, flags=flags & ~STRIPPED_OPEN_FLAGS, fd=fd,
                            direct=bool(flags & _O_DIRECT), inline_io=inline_io)
        node.handles[fh] = handle
        self._handles[fh] = handle
        return handle

    def _new_owner(self, ctx: pyfuse3.RequestContext) -> tuple[int, int] | None:
        """Who gets what a request creates: as root the daemon creates for the caller, as the
        kernel would on a local filesystem; otherwise everything is the daemon's user's."""
        if self._is_root and (ctx.uid, ctx.gid) != (0, 0):
            return ctx.uid, ctx.gid
        return None

    @staticmethod
    def _new_mode(mode: int, ctx: pyfuse3.RequestContext) -> int:
        return stat.S_IMODE(mode) & ~ctx.umask

    @_guard
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        if inode == CONTROL_DIR_INODE:
            raise FUSEError(errno.EISDIR)
        found = self.control_dir.lookup_inode(inode)
        if found is not None:
            return self._open_virtual(found[1], flags, ctx)
        if self.control_dir.is_reserved(inode):
            raise FUSEError(errno.ENOENT)
        node = self._nodes.get(inode)
        if node is None:
            relpath = self._relpath(inode)
            if not stat.S_ISREG((await fileio.call(os.lstat, self._abspath(relpath))).st_mode):
                raise FUSEError(errno.EACCES)
            node = self._node_for(inode, relpath)
        handle = await self._open_source(node, flags)
        return pyfuse3.FileInfo(fh=handle.fh, direct_io=handle.direct, keep_cache=False)

    def _open_virtual(self, vfile: VirtualFile, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        if (flags & os.O_ACCMODE) != os.O_RDONLY:
            if not vfile.writable:
                raise FUSEError(errno.EACCES)
            if vfile.owner_only_write and ctx.uid not in (0, self._owner_uid):
                raise FUSEError(errno.EACCES)
        content = vfile.read() if (flags & os.O_ACCMODE) != os.O_WRONLY else b""
        fh = next(self._fh_counter)
        self._vhandles[fh] = _VirtualHandle(vfile, content, ctx, flags)
        # direct_io: reads are not clipped to the size getattr reported before open.
        return pyfuse3.FileInfo(fh=fh, direct_io=True, keep_cache=False, nonseekable=False)

    @_guard
    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
                     ctx: pyfuse3.RequestContext) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        if parent_inode == ROOT_INODE and name == _CONTROL_NAME_B:
            raise FUSEError(errno.EEXIST)
        if parent_inode == CONTROL_DIR_INODE:
            raise FUSEError(errno.EACCES)
        relpath = self._child(parent_inode, name)
        created = await fileio.call(_create_file, self._abspath(relpath), self._fd_flags(flags),
                                    self._new_mode(mode, ctx), self._new_owner(ctx))
        if created is None:
            # The name exists (or appeared since the kernel's lookup): an O_EXCL open fails,
            # any other opens the file that is there, as open(2) would.
            if flags & os.O_EXCL:
                raise FUSEError(errno.EEXIST)
            node = self._node_for(self._inode_for(relpath), relpath)
            handle = await self._open_source(node, flags & ~(os.O_CREAT | os.O_EXCL))
            try:
                st = await fileio.call(os.fstat, handle.fd)
            except BaseException:
                await self._release_handle(handle.fh)
                raise
        else:
            fd, inline_io, st = created
            if relpath in self._inode_of:
                self._forget_path(relpath)  # a stale entry: the file was removed behind our back
            node = self._node_for(self._inode_for(relpath), relpath)
            handle = self._add_handle(node, flags, fd, inline_io)
        attr = self._attr(node.inode, st)
        return pyfuse3.FileInfo(fh=handle.fh, direct_io=handle.direct, keep_cache=False), attr

    def _get_handle(self, fh: int) -> OpenHandle:
        handle = self._handles.get(fh)
        if handle is None:
            raise FUSEError(errno.EBADF)
        return handle

    @_guard
    async def read(self, fh: int, off: int, size: int) -> bytes:
        vh = self._vhandles.get(fh)
        if vh is not None:
            return vh.content[off:off + size]
        handle = self._get_handle(fh)
        job = handle.node.job
        if job is not None:
            return await job.read(handle, off, size)
        if handle.runs_inline(size):
            return fileio.pread_now(handle.fd, size, off)
        return await fileio.pread_thread(handle.fd, size, off)

    @_guard
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        vh = self._vhandles.get(fh)
        if vh is not None:
            if (vh.flags & os.O_ACCMODE) == os.O_RDONLY:
                raise FUSEError(errno.EBADF)
            await vh.vfile.write(bytes(buf), vh.ctx)
            return len(buf)
        handle = self._get_handle(fh)
        node = handle.node
        job = node.job
        if job is not None:
            return await job.write(handle, off, buf)
        if handle.runs_inline(len(buf)):
            # Nothing else runs until this returns, so no job can attach in between: no token.
            return fileio.pwrite_now(handle.fd, buf, off)
        token = node.begin_passthrough_write(off, len(buf))  # seen by a job that attaches now
        try:
            return await fileio.pwrite_thread(handle.fd, buf, off)
        finally:
            node.end_passthrough_write(token)

    @_guard
    async def flush(self, fh: int) -> None:
        # close(2) of a writable handle: make what it wrote durable on the source (QEMU and the
        # bitmap invariant rely on it); read-only handles have nothing to flush.
        handle = self._handles.get(fh)
        if handle is None or not handle.writable:
            return
        job = handle.node.job
        if job is not None:
            await job.fsync(handle, False)
        else:
            await fileio.fsync(handle.fd, False)

    @_guard
    async def fsync(self, fh: int, datasync: bool) -> None:
        if fh in self._vhandles:
            return
        handle = self._get_handle(fh)
        job = handle.node.job
        if job is not None:
            await job.fsync(handle, bool(datasync))
        else:
            await fileio.fsync(handle.fd, bool(datasync))

    def _drop_handle(self, fh: int) -> OpenHandle | None:
        """Forget the open ``fh``; the caller closes its descriptor."""
        handle = self._handles.pop(fh, None)
        if handle is None:
            return None
        node = handle.node
        node.handles.pop(fh, None)
        if node.unlinked and not node.handles and node.job is None:
            self._nodes.pop(node.inode, None)
        return handle

    @staticmethod
    def _close_fd(fd: int, path: str) -> None:
        try:
            os.close(fd)
        except OSError as exc:
            log.info("close of %s failed: %s", path, exc)

    async def _release_handle(self, fh: int) -> None:
        handle = self._drop_handle(fh)
        if handle is not None:
            # close(2) may write back (NFS) or ask a FUSE source: not on the trio thread.
            await fileio.call(self._close_fd, handle.fd, handle.node.backing_path)

    @_guard
    async def release(self, fh: int) -> None:
        if self._vhandles.pop(fh, None) is not None:
            return
        await self._release_handle(fh)

    def close_all(self) -> None:
        """Close every source descriptor (at unmount, after the FUSE session ended)."""
        for fh in list(self._handles):
            handle = self._drop_handle(fh)
            if handle is not None:
                self._close_fd(handle.fd, handle.node.backing_path)
        self._vhandles.clear()
        self._dirs.clear()


def _fstat_and_close(fd: int) -> os.stat_result:
    try:
        return os.fstat(fd)
    finally:
        os.close(fd)


def _list_dir(path: str) -> list[str]:
    with os.scandir(path) as it:
        return [de.name for de in it]


def _open_classified(path: str, flags: int) -> tuple[int, bool]:
    """Open ``path`` and ask whether its I/O may run inline (``fstatfs``: on a FUSE or NFS file a
    request to that filesystem, so asked here in the worker thread too)."""
    fd = os.open(path, flags)
    try:
        return fd, fileio.inline_capable(fd)
    except BaseException:
        os.close(fd)
        raise


def _set_owner_and_mode(fd: int, owner: tuple[int, int] | None, mode: int) -> os.stat_result:
    """Give the new file or directory ``fd`` its ``owner`` (None: leave it) and exactly ``mode``
    (the process umask applied at creation is not the caller's); returns its attributes."""
    if owner is not None:
        os.fchown(fd, *owner)  # first: a chown clears set-user-ID and set-group-ID bits
    st = os.fstat(fd)
    if stat.S_ISDIR(st.st_mode):
        mode |= st.st_mode & stat.S_ISGID  # inherited from a set-group-ID parent, as mkdir(2) does
    if stat.S_IMODE(st.st_mode) != mode:
        os.fchmod(fd, mode)
        st = os.fstat(fd)
    return st


def _create_file(path: str, fd_flags: int, mode: int, owner: tuple[int, int] | None
                 ) -> tuple[int, bool, os.stat_result] | None:
    """Create ``path`` exclusively and open it with ``fd_flags``; None if the name exists.

    Returns the descriptor, whether its I/O may run inline, and its attributes. Owner and mode
    are set through the descriptor before it is returned, so they reach the file that was
    created whatever happens to its name meanwhile. On failure nothing is left behind.
    """
    try:
        fd = os.open(path, fd_flags | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError:
        return None
    try:
        st = _set_owner_and_mode(fd, owner, mode)
        return fd, fileio.inline_capable(fd), st
    except BaseException:
        _unlink_if_same(path, fd)
        os.close(fd)
        raise


def _unlink_if_same(path: str, fd: int) -> None:
    """Remove ``path`` if it still names the file open as ``fd``."""
    with contextlib.suppress(OSError):
        mine, now = os.fstat(fd), os.lstat(path)
        if (mine.st_dev, mine.st_ino) == (now.st_dev, now.st_ino):
            os.unlink(path)
