"""The Operations handlers called directly (no mount), s3ql t3_fs_api style: the safety net,
the ImageNode seam the mirror engine plugs into, and the control-dir registry.

The job below is a minimal recording implementation of the seam's contract (the real engine
lives in mirrorfs.mirror); it checks that the FUSE layer routes I/O through ``node.job`` and asks
``check_modify`` before destructive operations.
"""

from __future__ import annotations

import errno
import logging
import os
from pathlib import Path

import pyfuse3
import pytest

from mirrorfs import fileio
from mirrorfs.errors import StateError, UsageError
from mirrorfs.fs.control_dir import CONTROL_DIR_INODE, VirtualFile
from mirrorfs.fs.node import OpenHandle
from mirrorfs.fs.operations import ROOT_INODE, Operations

CTX = pyfuse3.RequestContext()


class RecordingJob:
    """Serves reads from the handle's fd, doubles every write into ``copies``; refuses modification."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, object]] = []
        self.copies: dict[int, bytes] = {}

    async def read(self, handle: OpenHandle, off: int, size: int) -> bytes:
        self.calls.append(("read", off))
        return await fileio.pread(handle.fd, size, off)

    async def write(self, handle: OpenHandle, off: int, data: bytes) -> int:
        self.calls.append(("write", off))
        self.copies[off] = bytes(data)
        return await fileio.pwrite(handle.fd, data, off)

    async def fsync(self, handle: OpenHandle, datasync: bool) -> None:
        self.calls.append(("fsync", datasync))
        await fileio.fsync(handle.fd, datasync)

    def check_modify(self, op: str) -> None:
        self.calls.append(("check_modify", op))
        raise StateError(f"cannot {op} an image with an active mirror job")


@pytest.fixture
def ops(tmp_path: Path) -> Operations:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x.raw").write_bytes(b"\0" * 8192)
    (tmp_path / "vm.raw").write_bytes(b"v" * 4096)
    return Operations(str(tmp_path))


async def test_routing_through_job_and_check_modify(ops: Operations, tmp_path: Path) -> None:
    node = ops.node_for_relpath("d/x.raw")
    assert node is ops.node_for_relpath("/d/x.raw")
    assert node.backing_path == str(tmp_path / "d" / "x.raw")
    dir_ino = (await ops.lookup(ROOT_INODE, b"d", CTX)).st_ino
    assert (await ops.lookup(dir_ino, b"x.raw", CTX)).st_ino == node.inode

    fi_ro = await ops.open(node.inode, os.O_RDONLY, CTX)
    fi_rw = await ops.open(node.inode, os.O_RDWR | os.O_DIRECT, CTX)
    assert fi_rw.direct_io and not fi_ro.direct_io
    assert set(node.handles) == {fi_ro.fh, fi_rw.fh}
    assert node.handles[fi_ro.fh].fd != node.handles[fi_rw.fh].fd
    assert not (node.handles[fi_rw.fh].flags & os.O_DIRECT)

    job = RecordingJob()
    node.job = job
    assert await ops.write(fi_rw.fh, 4096, b"hello") == 5
    assert await ops.read(fi_ro.fh, 4096, 5) == b"hello"
    await ops.fsync(fi_rw.fh, True)
    await ops.flush(fi_rw.fh)
    await ops.flush(fi_ro.fh)  # read-only: nothing to flush
    assert job.calls == [("write", 4096), ("read", 4096), ("fsync", True), ("fsync", False)]
    assert job.copies == {4096: b"hello"}

    for call, op in [
        (lambda: ops.unlink(dir_ino, b"x.raw", CTX), "unlink"),
        (lambda: ops.rename(dir_ino, b"x.raw", ROOT_INODE, b"y.raw", 0, CTX), "rename"),
        (lambda: ops.rename(ROOT_INODE, b"vm.raw", dir_ino, b"x.raw", 0, CTX), "rename"),  # replaced side
        (lambda: ops.rename(ROOT_INODE, b"d", ROOT_INODE, b"e", 0, CTX), "rename"),  # parent dir
        (lambda: ops.open(node.inode, os.O_WRONLY | os.O_TRUNC, CTX), "truncate"),
    ]:
        job.calls.clear()
        with pytest.raises(pyfuse3.FUSEError) as exc:
            await call()
        assert exc.value.errno == errno.EBUSY
        assert job.calls == [("check_modify", op)]
    assert (tmp_path / "d" / "x.raw").exists() and (tmp_path / "vm.raw").exists()

    node.job = None
    await ops.release(fi_ro.fh)
    await ops.release(fi_rw.fh)
    assert node.handles == {}
    await ops.rename(dir_ino, b"x.raw", ROOT_INODE, b"y.raw", 0, CTX)
    assert node.relpath == "y.raw" and node.backing_path == str(tmp_path / "y.raw")
    assert ops.node_for_relpath("y.raw") is node


async def test_node_for_relpath_refuses(ops: Operations) -> None:
    for bad in ("missing.raw", "d", "", ".mirrorfs/status", "../etc/passwd"):
        with pytest.raises(UsageError):
            ops.node_for_relpath(bad)


async def test_bug_in_handler_is_eio_and_logged(ops: Operations, caplog: pytest.LogCaptureFixture) -> None:
    ops.control_dir.register("broken", VirtualFile(lambda: b"%d" % (1 // 0)))
    with caplog.at_level(logging.ERROR):
        with pytest.raises(pyfuse3.FUSEError) as exc:
            await ops.lookup(CONTROL_DIR_INODE, b"broken", CTX)
    assert exc.value.errno == errno.EIO
    assert "BUG in FUSE handler lookup" in caplog.text and "ZeroDivisionError" in caplog.text
    # Unknown handles are an error answer, not a bug.
    with pytest.raises(pyfuse3.FUSEError) as exc:
        await ops.read(987654, 0, 10)
    assert exc.value.errno == errno.EBADF


async def test_virtual_file_write_errors_carry_errno(ops: Operations) -> None:
    received: list[bytes] = []

    async def write(data: bytes, ctx: pyfuse3.RequestContext) -> None:
        if data.startswith(b"bad"):
            raise UsageError("malformed command")
        if data.startswith(b"busy"):
            raise StateError("not now")
        received.append(data)

    ino = ops.control_dir.register("control", VirtualFile(lambda: b"log\n", write))
    assert ops.control_dir.register("control", VirtualFile(lambda: b"log2\n", write)) == ino  # replace keeps inode
    fi = await ops.open(ino, os.O_RDWR, CTX)
    assert await ops.read(fi.fh, 0, 100) == b"log2\n"
    assert await ops.write(fi.fh, 0, b"mirror a b\n") == 11
    for data, err in ((b"bad\n", errno.EINVAL), (b"busy\n", errno.EBUSY)):
        with pytest.raises(pyfuse3.FUSEError) as exc:
            await ops.write(fi.fh, 0, data)
        assert exc.value.errno == err
    assert received == [b"mirror a b\n"]
    await ops.release(fi.fh)
    ro = ops.control_dir.register("status", VirtualFile(lambda: b"no jobs\n"))
    with pytest.raises(pyfuse3.FUSEError) as exc:
        await ops.open(ro, os.O_WRONLY, CTX)
    assert exc.value.errno == errno.EACCES
