"""Done-when 4 and the error path: source I/O errors (ENOSPC, EIO) reach the writer or reader with
their errno, and the mount keeps serving."""

from __future__ import annotations

import errno
import mmap
import os
import subprocess
from pathlib import Path
from typing import Iterator

import pytest

from conftest import MountFactory
from mounting import qsd_fuse_export


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs, unmounted at the end whatever happens."""
    path = tmp_path / "small"
    path.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m,mode=0755", "tmpfs", str(path)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def fill(path: Path, flags: int, chunk: bytes | mmap.mmap) -> tuple[int, OSError]:
    """Write chunks until the write fails; returns bytes written and the error."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | flags, 0o644)
    written = 0
    try:
        for _ in range(64):  # 64 MiB: far beyond the 4 MiB tmpfs
            try:
                n = os.pwrite(fd, chunk, written)
            except OSError as exc:
                return written, exc
            assert n > 0
            written += n
        raise AssertionError("the source never ran out of space")
    finally:
        os.close(fd)


@pytest.mark.parametrize("direct", [False, True], ids=["buffered", "direct"])
def test_enospc_reaches_writer_and_mount_keeps_serving(mount_factory: MountFactory, small_tmpfs: Path,
                                                       direct: bool) -> None:
    (small_tmpfs / "keep.txt").write_bytes(b"still here\n")
    mount = mount_factory(source=small_tmpfs)
    mnt = mount.mountpoint

    chunk = mmap.mmap(-1, 1 << 20)
    chunk.write(b"\x5a" * (1 << 20))
    written, exc = fill(mnt / "big.raw", os.O_DIRECT if direct else 0, chunk)
    assert exc.errno == errno.ENOSPC, exc
    assert 0 < written <= 4 << 20
    # The bytes that were accepted are in the source.
    data = (small_tmpfs / "big.raw").read_bytes()
    assert len(data) >= written and data[:written] == b"\x5a" * written

    # Still serving: metadata, reads, removal, and writes once there is space again.
    assert sorted(os.listdir(mnt)) == [".mirrorfs", "big.raw", "keep.txt"]
    assert (mnt / "keep.txt").read_bytes() == b"still here\n"
    assert (mnt / ".mirrorfs" / "status").read_text() == "no jobs\n"
    os.unlink(mnt / "big.raw")
    (mnt / "after.txt").write_bytes(b"x" * 100_000)
    assert (small_tmpfs / "after.txt").read_bytes() == b"x" * 100_000
    assert os.statvfs(mnt).f_bfree == os.statvfs(small_tmpfs).f_bfree


def test_enospc_from_qemu_io(mount_factory: MountFactory, small_tmpfs: Path) -> None:
    """QEMU's own writer sees the error (not a hang, not silent success)."""
    mount = mount_factory(source=small_tmpfs)
    img = mount.mountpoint / "q.raw"
    subprocess.run(["qemu-img", "create", "-f", "raw", str(img), "16M"], check=True, capture_output=True)
    proc = subprocess.run(["qemu-io", "-f", "raw", "-t", "none", "-c", "write -P 0x77 0 8M", str(img)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "No space left on device" in proc.stdout + proc.stderr
    assert (mount.mountpoint / ".mirrorfs" / "pid").read_text().strip() == str(mount.pid)


@pytest.fixture
def eio_source(tmp_path: Path) -> Iterator[Path]:
    """A source directory whose ``eio.raw`` fails reads at 1 MiB and writes at 2 MiB with EIO.

    qemu-storage-daemon exports a blkdebug node (null-co underneath) as a FUSE file there.
    """
    source = tmp_path / "eio-source"
    source.mkdir()
    (source / "ok.txt").write_text("fine\n")
    image = source / "eio.raw"
    image.touch()
    node = ('{"driver":"blkdebug","node-name":"n","image":{"driver":"null-co","size":%d,"read-zeroes":true},'
            '"inject-error":[{"event":"none","iotype":"read","errno":5,"sector":2048},'
            '{"event":"none","iotype":"write","errno":5,"sector":4096}]}' % (16 << 20))
    with qsd_fuse_export(node, image, writable=True):
        yield source


@pytest.mark.parametrize("direct", [False, True], ids=["buffered", "direct"])
def test_eio_reaches_reader_and_writer(eio_source: Path, mount_factory: MountFactory, direct: bool) -> None:
    mount = mount_factory(source=eio_source)
    path = mount.mountpoint / "eio.raw"
    fd = os.open(path, os.O_RDWR | (os.O_DIRECT if direct else 0))
    try:
        buf = mmap.mmap(-1, 4096)
        assert os.preadv(fd, [buf], 0) == 4096 and buf[:] == bytes(4096)
        with pytest.raises(OSError) as exc:
            os.preadv(fd, [buf], 1 << 20)
        assert exc.value.errno == errno.EIO
        with pytest.raises(OSError) as exc:
            os.pwritev(fd, [buf], 2 << 20)
            os.fsync(fd)  # buffered: the error may surface at the flush
        assert exc.value.errno == errno.EIO
        assert os.pwritev(fd, [buf], 4 << 20) == 4096  # elsewhere the image still works
    finally:
        os.close(fd)
    assert (mount.mountpoint / "ok.txt").read_text() == "fine\n"
