"""pyfuse3 ``Operations`` for mirrorfs: a thin passthrough of the source directory.

Role: translate FUSE requests into calls on the source directory (or on an ``ImageNode``'s job,
see ``node.py``) and nothing more. Everything that decides anything lives below (mirror engine)
or beside (``control_dir``). The state the handlers keep lives in ``inodes.py`` (paths, inode
numbers, image nodes) and ``handles.py`` (open handles); the blocking calls they run off the
trio thread in ``sourcecalls.py``; the attributes they report in ``attrs.py``.

Invariants:
- Inode numbers are stable while mounted: the table maps source-relative paths to inodes and
  entries are dropped only when the path is removed (unlink, rmdir, replaced by rename), never on
  FUSE ``forget``; renames move the entry (and every entry below a renamed directory).
- Every handler raises only ``FUSEError``: ``OSError`` becomes its errno, ``MirrorfsError`` its
  ``errno`` attribute, and anything else is a bug that is logged with its traceback and answered
  with EIO, because any other exception would end ``pyfuse3.main()`` and leave a dead mount.
- Each open gets its own source descriptor with its own access mode and never O_DIRECT; an
  O_DIRECT open gets an O_DIRECT twin of it for its aligned requests (``node.py``).
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

import errno
import functools
import inspect
import logging
import os
import stat
import time
import types
from typing import Any, Awaitable, Callable, TypeVar

import pyfuse3
from pyfuse3 import FUSEError

from .. import fileio
from ..errors import MirrorfsError, UsageError
from ..metrics.requests import SLOT_OF, RequestStats, Timing
from ..mirror.params import normalize_image_name
from .attrs import source_attributes, virtual_attributes
from .control_dir import CONTROL_DIR_INODE, CONTROL_DIR_NAME, ControlDir, VirtualFile
from .handles import HandleTable, VirtualHandle, fd_flags
from .inodes import ROOT_INODE, InodeTable, fd_of_unlinked
from .node import ImageNode, OpenHandle
from .rename2 import RENAME_EXCHANGE, RENAME_NOREPLACE, rename2
from .sourcecalls import apply_setattr, create_file, list_dir, make_dir

log = logging.getLogger(__name__)

_CONTROL_NAME_B = CONTROL_DIR_NAME.encode()
_O_DIRECT = getattr(os, "O_DIRECT", 0)

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


def _fuse_error(name: str, exc: Exception) -> FUSEError:
    """The ``FUSEError`` that answers a request whose handler ``name`` raised ``exc``."""
    if isinstance(exc, FUSEError):  # the handler's own answer
        return exc
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
            except Exception as exc:
                raise _fuse_error(func.__name__, exc) from None

        return wrapper  # type: ignore[return-value]

    buckets, total, clock = timing.buckets, timing.total, time.perf_counter_ns

    @functools.wraps(func)
    async def timed(*args: Any, **kwargs: Any) -> Any:
        start = clock()
        try:
            return await func(*args, **kwargs)
        except Exception as exc:
            raise _fuse_error(func.__name__, exc) from None
        finally:
            elapsed = clock() - start
            buckets[SLOT_OF[(elapsed - 1).bit_length()]] += 1
            total[0] += elapsed

    return timed  # type: ignore[return-value]


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
        self._owner = (os.getuid(), os.getgid())
        self._is_root = os.geteuid() == 0
        self._inodes = InodeTable(self.source_dir)
        self._fhs = HandleTable(self._inodes)
        # The handle table's own dicts, bound here so that read and write find a handle in one
        # lookup.
        self._handles = self._fhs.files
        self._vhandles = self._fhs.virtual
        #: Set by the mount while it re-attaches its persistent jobs (``hold_images``).
        self._images_held: Any = None

    # ------------------------------------------------------------------ the seam (public API)

    def node_for_relpath(self, relpath: str) -> ImageNode:
        """The ``ImageNode`` of the regular file at ``relpath``, created if never looked up.

        Args:
            relpath: path relative to the source directory (``"vm.raw"``, ``"d/x.qcow2"``);
                a leading ``/`` is ignored.

        Raises:
            UsageError: no regular file by that name exists in the source directory.
        """
        rel = normalize_image_name(relpath.lstrip("/"))
        inode = self._inodes.known(rel)
        if inode is not None and inode in self._inodes.nodes:
            return self._inodes.nodes[inode]
        try:
            st = os.stat(self._inodes.abspath(rel))
        except OSError as exc:
            raise UsageError(f"no such image {relpath!r} in the mount ({exc.strerror})") from None
        if not stat.S_ISREG(st.st_mode):
            raise UsageError(f"{relpath!r} is not a regular file")
        return self._inodes.node_for(self._inodes.inode_for(rel), rel)

    def hold_images(self, attached: Any) -> None:
        """Until ``attached`` (a ``trio.Event``) is set, opening, creating or truncating a file
        waits: the mount's persistent jobs are being re-attached, and a write before its job
        records it would be lost to the replica. Released by ``release_images``; if the event is
        set without that (the attach failed, the mount stops), the waiters fail with EIO."""
        self._images_held = attached

    def release_images(self) -> None:
        """The jobs are attached: requests go on (see ``hold_images``)."""
        attached, self._images_held = self._images_held, None
        if attached is not None:
            attached.set()

    async def _wait_images(self) -> None:
        attached = self._images_held
        if attached is not None:
            await attached.wait()
            if self._images_held is not None:
                raise FUSEError(errno.EIO)

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

    def _check_not_control(self, parent_inode: int, name: bytes) -> None:
        if parent_inode == CONTROL_DIR_INODE or (parent_inode == ROOT_INODE and name == _CONTROL_NAME_B):
            raise FUSEError(errno.EPERM)

    # ------------------------------------------------------------------ attributes

    def _virtual_getattr(self, inode: int) -> pyfuse3.EntryAttributes | None:
        """Attributes of ``.mirrorfs`` and its files; None for any other inode."""
        if inode == CONTROL_DIR_INODE:
            return virtual_attributes(inode, stat.S_IFDIR | 0o755, 0, 2, self._owner, self._started_ns)
        found = self.control_dir.lookup_inode(inode)
        if found is not None:
            _, vfile = found
            return virtual_attributes(inode, vfile.mode, len(vfile.read()), 1, self._owner, self._started_ns)
        if self.control_dir.is_reserved(inode):
            raise FUSEError(errno.ENOENT)
        return None

    async def _getattr(self, inode: int) -> pyfuse3.EntryAttributes:
        attr = self._virtual_getattr(inode)
        if attr is not None:
            return attr
        # Source metadata can be slow too (NFS, a FUSE source): never stat on the trio thread.
        return source_attributes(inode, await fileio.call(self._inodes.stat_plan(inode)))

    async def _lookup(self, parent_inode: int, name: bytes) -> pyfuse3.EntryAttributes:
        if parent_inode == ROOT_INODE and name == _CONTROL_NAME_B:
            return await self._getattr(CONTROL_DIR_INODE)
        if parent_inode == CONTROL_DIR_INODE:
            inode = self.control_dir.inode_of(os.fsdecode(name))
            if inode is None:
                raise FUSEError(errno.ENOENT)
            return await self._getattr(inode)
        relpath = self._inodes.child(parent_inode, name)
        st = await fileio.call(os.lstat, self._inodes.abspath(relpath))
        # No race with unlink/rename of this name while we waited: the kernel holds the
        # directory's lock across both, so table updates stay consistent with the source.
        inode = self._inodes.inode_for(relpath)
        if stat.S_ISREG(st.st_mode):
            node = self._inodes.node_for(inode, relpath)
            if node.backing_path != self._inodes.abspath(relpath):
                st = await fileio.call(os.stat, node.backing_path)
        return source_attributes(inode, st)

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
        if fields.update_size:
            await self._wait_images()
        node = self._inodes.nodes.get(inode)
        if fields.update_size and node is not None and node.job is not None:
            node.job.check_modify("truncate")
        path = ""
        if node is None:
            path = self._inodes.abspath(self._inodes.relpath(inode))
        elif not node.unlinked:
            path = node.backing_path
        # An unlinked file can only be reached through a descriptor.
        fd = fd_of_unlinked(node) if node is not None and node.unlinked else None
        st = await fileio.call(apply_setattr, path, fd, node is not None, attr, fields)
        return source_attributes(inode, st)

    @_guard
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        if self.control_dir.is_reserved(inode):
            raise FUSEError(errno.EINVAL)
        return os.fsencode(await fileio.call(os.readlink, self._inodes.abspath(self._inodes.relpath(inode))))

    @_guard
    async def mkdir(self, parent_inode: int, name: bytes, mode: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        self._check_not_control(parent_inode, name)
        relpath = self._inodes.child(parent_inode, name)
        st = await fileio.call(make_dir, self._inodes.abspath(relpath), self._new_mode(mode, ctx),
                               self._new_owner(ctx))
        return source_attributes(self._inodes.inode_for(relpath), st)

    @_guard
    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        self._check_not_control(parent_inode, name)
        relpath = self._inodes.child(parent_inode, name)
        await fileio.call(os.rmdir, self._inodes.abspath(relpath))
        self._inodes.forget_path(relpath)

    @_guard
    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        self._check_not_control(parent_inode, name)
        relpath = self._inodes.child(parent_inode, name)
        self._inodes.check_modify(relpath, "unlink")
        await fileio.call(os.unlink, self._inodes.abspath(relpath))
        self._inodes.forget_path(relpath)

    @_guard
    async def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int, name_new: bytes,
                     flags: int, ctx: pyfuse3.RequestContext) -> None:
        self._check_not_control(parent_inode_old, name_old)
        self._check_not_control(parent_inode_new, name_new)
        old = self._inodes.child(parent_inode_old, name_old)
        new = self._inodes.child(parent_inode_new, name_new)
        if flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE):
            raise FUSEError(errno.EINVAL)  # RENAME_WHITEOUT: for overlay filesystems only
        # Both sides: the file moved away and the one it replaces (or trades places with).
        self._inodes.check_modify(old, "rename", subtree=True)
        self._inodes.check_modify(new, "rename", subtree=True)
        # The flags go to the kernel: "is the new name free?" is answered atomically there.
        await fileio.call(rename2, self._inodes.abspath(old), self._inodes.abspath(new), flags)
        if old == new:
            return
        if flags & RENAME_EXCHANGE:
            self._inodes.move_paths([(old, new), (new, old)])
        else:
            self._inodes.forget_path(new)
            self._inodes.move_paths([(old, new)])

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
            relpath = self._inodes.relpath(inode)
            entries = []
            if inode == ROOT_INODE:
                entries.append((_CONTROL_NAME_B, CONTROL_DIR_INODE))
            for name in await fileio.call(list_dir, self._inodes.abspath(relpath)):
                if inode == ROOT_INODE and name == CONTROL_DIR_NAME:
                    continue  # the source's own .mirrorfs never shows through
                rel = f"{relpath}/{name}" if relpath else name
                entries.append((os.fsencode(name), self._inodes.inode_for(rel)))
        fh = self._fhs.new_fh()
        self._fhs.dirs[fh] = entries
        return fh

    @_guard
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        entries = self._fhs.dirs.get(fh)
        if entries is None:
            raise FUSEError(errno.EBADF)
        # Decide every stat here, run them all in one hop off the trio thread, then reply.
        wanted: list[tuple[int, bytes, int, pyfuse3.EntryAttributes | Callable[[], os.stat_result]]] = []
        for index in range(start_id, len(entries)):
            name, inode = entries[index]
            try:
                wanted.append((index, name, inode, self._virtual_getattr(inode) or self._inodes.stat_plan(inode)))
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
                attr = source_attributes(inode, st)
            # readdirplus: the kernel caches these as lookups, so they must be complete.
            if not pyfuse3.readdir_reply(token, name, attr, index + 1):
                break

    @_guard
    async def releasedir(self, fh: int) -> None:
        self._fhs.dirs.pop(fh, None)

    # ------------------------------------------------------------------ files

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
        await self._wait_images()
        node = self._inodes.nodes.get(inode)
        if node is None:
            relpath = self._inodes.relpath(inode)
            if not stat.S_ISREG((await fileio.call(os.lstat, self._inodes.abspath(relpath))).st_mode):
                raise FUSEError(errno.EACCES)
            node = self._inodes.node_for(inode, relpath)
        handle = await self._fhs.open_source(node, flags)
        return pyfuse3.FileInfo(fh=handle.fh, direct_io=handle.direct, keep_cache=False)

    def _open_virtual(self, vfile: VirtualFile, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        if (flags & os.O_ACCMODE) != os.O_RDONLY:
            if not vfile.writable:
                raise FUSEError(errno.EACCES)
            if vfile.owner_only_write and ctx.uid not in (0, self._owner[0]):
                raise FUSEError(errno.EACCES)
        content = vfile.read() if (flags & os.O_ACCMODE) != os.O_WRONLY else b""
        fh = self._fhs.new_fh()
        self._vhandles[fh] = VirtualHandle(vfile, content, ctx, flags)
        # direct_io: reads are not clipped to the size getattr reported before open.
        return pyfuse3.FileInfo(fh=fh, direct_io=True, keep_cache=False, nonseekable=False)

    @_guard
    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
                     ctx: pyfuse3.RequestContext) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        if parent_inode == ROOT_INODE and name == _CONTROL_NAME_B:
            raise FUSEError(errno.EEXIST)
        if parent_inode == CONTROL_DIR_INODE:
            raise FUSEError(errno.EACCES)
        await self._wait_images()
        relpath = self._inodes.child(parent_inode, name)
        created = await fileio.call(create_file, self._inodes.abspath(relpath), fd_flags(flags),
                                    self._new_mode(mode, ctx), self._new_owner(ctx),
                                    bool(flags & _O_DIRECT))
        if created is None:
            # The name exists (or appeared since the kernel's lookup): an O_EXCL open fails,
            # any other opens the file that is there, as open(2) would.
            if flags & os.O_EXCL:
                raise FUSEError(errno.EEXIST)
            node = self._inodes.node_for(self._inodes.inode_for(relpath), relpath)
            handle = await self._fhs.open_source(node, flags & ~(os.O_CREAT | os.O_EXCL))
            try:
                st = await fileio.call(os.fstat, handle.fd)
            except BaseException:
                await self._fhs.release(handle.fh)
                raise
        else:
            fd, twin, inline_io, st = created
            if self._inodes.known(relpath) is not None:
                self._inodes.forget_path(relpath)  # a stale entry: the file was removed behind our back
            node = self._inodes.node_for(self._inodes.inode_for(relpath), relpath)
            handle = self._fhs.add(node, flags, fd, inline_io, twin)
        attr = source_attributes(node.inode, st)
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
        return await fileio.pread_thread(handle.fd, size, off, handle.twin)

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
            return await fileio.pwrite_thread(handle.fd, buf, off, handle.twin)
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

    @_guard
    async def release(self, fh: int) -> None:
        if self._vhandles.pop(fh, None) is not None:
            return
        await self._fhs.release(fh)

    def close_all(self) -> None:
        """At unmount, once the FUSE session ended: close what the opens left open."""
        self._fhs.close_all()
