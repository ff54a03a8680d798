"""A FUSE passthrough whose operations the test can stall: a slow source filesystem on demand.

Run as a script (``python stallfs.py BACKING MOUNTPOINT CTL``) it serves ``BACKING`` at
``MOUNTPOINT``. Before each operation named in ``STALLABLE`` it looks for the file ``CTL/<op>``;
while that file exists the operation waits (the filesystem keeps serving everything else), and
``CTL/<op>.stalled`` says that one is waiting. So a test decides exactly which request hangs and
for how long, with no timing guess, the way an NFS server that stops answering some calls would.

``stalling_fs(...)`` (a context manager for the tests) starts it, waits for the mount, and always
unmounts it and stops the process, releasing any stall first.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

#: Operations a test may stall (the names of the ``CTL`` files).
STALLABLE = ("lookup", "getattr", "setattr", "readlink", "mkdir", "rmdir", "unlink", "rename",
             "statfs", "opendir", "create", "flush")


class Stall:
    """Hold one kind of operation of a running stallfs until ``release()``."""

    def __init__(self, ctl: Path, op: str) -> None:
        assert op in STALLABLE, op
        self._flag = ctl / op
        self._stalled = ctl / f"{op}.stalled"

    def __enter__(self) -> "Stall":
        self._flag.touch()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def wait_stalled(self, timeout: float = 10.0) -> None:
        """Wait until a request of this kind is being held."""
        deadline = time.monotonic() + timeout
        while not self._stalled.exists():
            if time.monotonic() > deadline:
                raise AssertionError(f"no {self._flag.name} request reached the stalling filesystem")
            time.sleep(0.01)

    def release(self) -> None:
        self._flag.unlink(missing_ok=True)


@contextlib.contextmanager
def stalling_fs(backing: Path, mountpoint: Path, ctl: Path) -> Iterator[None]:
    """Serve ``backing`` at ``mountpoint`` until the block ends (see the module docstring)."""
    ctl.mkdir(exist_ok=True)
    proc = subprocess.Popen([sys.executable, __file__, str(backing), str(mountpoint), str(ctl)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 30
        while not os.path.ismount(mountpoint):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"stallfs did not mount: {proc.stdout.read() if proc.stdout else ''}")
            time.sleep(0.02)
        yield
    finally:
        for op in STALLABLE:
            (ctl / op).unlink(missing_ok=True)
        subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], capture_output=True)
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _serve(backing: str, mountpoint: str, ctl: str) -> None:
    import pyfuse3
    import trio
    from pyfuse3 import FUSEError

    from mirrorfs.fs.rename2 import rename2

    async def gate(op: str) -> None:
        flag = os.path.join(ctl, op)
        if not os.path.exists(flag):
            return
        marker = flag + ".stalled"
        open(marker, "w").close()
        try:
            while os.path.exists(flag):
                await trio.sleep(0.01)
        finally:
            os.unlink(marker)

    def guarded(op: str) -> Any:
        def wrap(func: Any) -> Any:
            async def handler(*args: Any) -> Any:
                await gate(op)
                try:
                    return await func(*args)
                except OSError as exc:
                    raise FUSEError(exc.errno or errno.EIO) from None
            return handler
        return wrap

    class StallFS(pyfuse3.Operations):
        def __init__(self) -> None:
            super().__init__()
            self.path_of = {pyfuse3.ROOT_INODE: backing}
            self.root_ino = os.lstat(backing).st_ino

        def _ino(self, st: os.stat_result) -> int:
            return pyfuse3.ROOT_INODE if st.st_ino == self.root_ino else st.st_ino

        def _attr(self, path: str) -> pyfuse3.EntryAttributes:
            return self._fattr(None, path)

        def _fattr(self, fd: int | None, path: str) -> pyfuse3.EntryAttributes:
            st = os.lstat(path) if fd is None else os.fstat(fd)
            entry = pyfuse3.EntryAttributes()
            for name in ("st_mode", "st_nlink", "st_uid", "st_gid", "st_rdev", "st_size",
                         "st_atime_ns", "st_mtime_ns", "st_ctime_ns"):
                setattr(entry, name, getattr(st, name))
            entry.st_ino = self._ino(st)
            entry.st_blksize, entry.st_blocks = 4096, st.st_blocks
            entry.entry_timeout = entry.attr_timeout = 0
            if fd is None:
                self.path_of[entry.st_ino] = path
            return entry

        def _path(self, inode: int) -> str:
            path = self.path_of.get(inode)
            if path is None:
                raise FUSEError(errno.ENOENT)
            return path

        def _child(self, parent: int, name: bytes) -> str:
            return os.path.join(self._path(parent), os.fsdecode(name))

        @guarded("lookup")
        async def lookup(self, parent: int, name: bytes, ctx: Any = None) -> Any:
            return self._attr(self._child(parent, name))

        @guarded("getattr")
        async def getattr(self, inode: int, ctx: Any = None) -> Any:
            return self._attr(self._path(inode))

        @guarded("setattr")
        async def setattr(self, inode: int, attr: Any, fields: Any, fh: Any, ctx: Any) -> Any:
            path = self._path(inode)
            target = path if fh is None else fh  # a call on a descriptor stays on its file
            if fields.update_size:
                os.truncate(target, attr.st_size)
            if fields.update_mode:
                os.chmod(target, stat.S_IMODE(attr.st_mode))
            if fields.update_uid or fields.update_gid:
                os.chown(target, attr.st_uid if fields.update_uid else -1,
                         attr.st_gid if fields.update_gid else -1)
            if fields.update_atime or fields.update_mtime:
                cur = os.stat(target)
                os.utime(target, ns=(attr.st_atime_ns if fields.update_atime else cur.st_atime_ns,
                                     attr.st_mtime_ns if fields.update_mtime else cur.st_mtime_ns))
            return self._attr(path) if fh is None else self._fattr(fh, path)

        @guarded("readlink")
        async def readlink(self, inode: int, ctx: Any) -> bytes:
            return os.fsencode(os.readlink(self._path(inode)))

        @guarded("mkdir")
        async def mkdir(self, parent: int, name: bytes, mode: int, ctx: Any) -> Any:
            path = self._child(parent, name)
            os.mkdir(path, mode)
            return self._attr(path)

        @guarded("rmdir")
        async def rmdir(self, parent: int, name: bytes, ctx: Any) -> None:
            os.rmdir(self._child(parent, name))

        @guarded("unlink")
        async def unlink(self, parent: int, name: bytes, ctx: Any) -> None:
            os.unlink(self._child(parent, name))

        @guarded("rename")
        async def rename(self, p_old: int, n_old: bytes, p_new: int, n_new: bytes, flags: int,
                         ctx: Any) -> None:
            rename2(self._child(p_old, n_old), self._child(p_new, n_new), flags)

        @guarded("statfs")
        async def statfs(self, ctx: Any) -> Any:
            sv = os.statvfs(backing)
            data = pyfuse3.StatvfsData()
            for name in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files",
                         "f_ffree", "f_favail", "f_namemax"):
                setattr(data, name, getattr(sv, name))
            return data

        @guarded("opendir")
        async def opendir(self, inode: int, ctx: Any) -> int:
            return inode

        async def readdir(self, inode: int, start: int, token: Any) -> None:
            path = self._path(inode)
            names = sorted(os.listdir(path))
            for i, name in enumerate(names[start:], start):
                if not pyfuse3.readdir_reply(token, os.fsencode(name),
                                             self._attr(os.path.join(path, name)), i + 1):
                    break

        async def open(self, inode: int, flags: int, ctx: Any) -> Any:
            try:
                fd = os.open(self._path(inode), flags & ~os.O_CREAT)
            except OSError as exc:
                raise FUSEError(exc.errno) from None
            return pyfuse3.FileInfo(fh=fd)

        @guarded("create")
        async def create(self, parent: int, name: bytes, mode: int, flags: int, ctx: Any) -> Any:
            path = self._child(parent, name)
            fd = os.open(path, flags | os.O_CREAT, mode)
            return pyfuse3.FileInfo(fh=fd), self._attr(path)

        async def read(self, fd: int, off: int, size: int) -> bytes:
            return os.pread(fd, size, off)

        async def write(self, fd: int, off: int, buf: bytes) -> int:
            return os.pwrite(fd, buf, off)

        @guarded("flush")
        async def flush(self, fd: int) -> None:
            return None

        async def release(self, fd: int) -> None:
            os.close(fd)

    pyfuse3.init(StallFS(), mountpoint, {"fsname=stallfs", "default_permissions"})
    try:
        trio.run(pyfuse3.main)
    finally:
        pyfuse3.close(unmount=True)


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    _serve(*sys.argv[1:4])
