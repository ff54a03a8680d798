"""O_DIRECT end to end: an O_DIRECT client of the mount keeps the image's pages out of the host's
page cache, a buffered client still gets the cache; a local target on a disk stays out of it
whatever the client does (it is in direct mode, as QEMU's cache.direct=on).

The image and the target live in ``tmp_path`` on a disk file system (ext4 here), where the page
cache is visible: each file's cache is dropped before the writer runs (fsync, then
``posix_fadvise(DONTNEED)``) and measured afterwards with ``fincore`` (util-linux).
"""

from __future__ import annotations

import errno
import json
import logging
import mmap
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchscripts import SCRIPTS
from mirrorfs import fileio
from mirrorfs.targets.local import LocalFileTarget
from mounting import Mount

sys.path.insert(0, str(SCRIPTS))
from benchlib.images import drop_cache, resident  # noqa: E402  (fsync + fadvise; fincore)
from compare import assert_identical  # noqa: E402
from test_mirror_mount import job, make_image, wait_ready  # noqa: E402

MiB = 1 << 20
SIZE = 64 * MiB
WRITTEN = 32 * MiB


def fio(path: Path, direct: int, cwd: Path) -> None:
    """Write WRITTEN bytes (1 MiB sequential, then 4 KiB random) through ``path`` and verify them."""
    for rw, bs, size in (("write", "1M", WRITTEN), ("randwrite", "4k", 4 * MiB)):
        argv = ["fio", "--name=odirect", f"--filename={path}", f"--size={size}", f"--rw={rw}",
                f"--bs={bs}", f"--direct={direct}", "--ioengine=psync", "--verify=crc32c",
                "--do_verify=1", "--verify_fatal=1", "--randrepeat=0", "--output-format=json"]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=240, cwd=cwd)
        assert proc.returncode == 0, f"fio failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        result = json.loads(proc.stdout[proc.stdout.index("{"):])["jobs"][0]
        assert result["error"] == 0 and result["write"]["io_bytes"] == size


def check_cache(path: Path, direct: int) -> None:
    res = resident(path)
    if direct:
        assert res <= 1 * MiB, f"{path.name}: {res} bytes in the page cache after O_DIRECT writes"
    else:
        assert res >= WRITTEN // 2, f"{path.name}: only {res} bytes cached after buffered writes"


def disk_backed(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        if fileio.memory_backed(fd):
            pytest.skip(f"{path} is on tmpfs: no page cache to tell apart")
    finally:
        os.close(fd)


@pytest.mark.parametrize("direct", [1, 0], ids=["direct", "buffered"])
def test_bare_mount_keeps_the_image_out_of_the_page_cache(mounted: Mount, direct: int) -> None:
    source = mounted.source / "vm.raw"
    make_image(source, SIZE, 1, holes=False)
    disk_backed(source)
    drop_cache(source)
    assert resident(source) == 0
    fio(mounted.mountpoint / "vm.raw", direct, mounted.mountpoint.parent)
    check_cache(source, direct)


@pytest.mark.parametrize("direct", [1, 0], ids=["direct", "buffered"])
def test_ready_job_keeps_image_and_target_out_of_the_page_cache(mounted: Mount, tmp_path: Path,
                                                                direct: int) -> None:
    name = "vm.raw"
    source = mounted.source / name
    target = tmp_path / "target.raw"
    make_image(source, SIZE, 2, holes=False)
    disk_backed(source)
    drop_cache(source)
    mounted.cli("mirror", mounted.mountpoint, name, target, "--create", "--copy-mode", "write-blocking")
    wait_ready(mounted, name)
    # the copy task reads and writes with O_DIRECT on a disk, whatever the clients do
    assert resident(source) <= 1 * MiB and resident(target) <= 1 * MiB
    drop_cache(source)
    drop_cache(target)
    assert resident(source) == resident(target) == 0
    fio(mounted.mountpoint / name, direct, tmp_path)
    entry = job(mounted, name)
    assert entry is not None and entry["__org.mirrorfs_duplicated-bytes"] >= WRITTEN
    check_cache(source, direct)
    check_cache(target, 1)
    wait_ready(mounted, name)
    mounted.cli("complete", mounted.mountpoint, name, "--no-pivot")
    assert_identical(source, target)


def test_unaligned_requests_on_an_odirect_handle(mounted: Mount) -> None:
    """Requests the page size does not divide take the buffered descriptor, whole."""
    source = mounted.source / "u.raw"
    source.write_bytes(bytes(range(256)) * 64)  # 16 KiB
    fd = os.open(mounted.mountpoint / "u.raw", os.O_RDWR | os.O_DIRECT)
    try:
        assert os.pwrite(fd, b"x" * 1000, 4000) == 1000
        assert os.pread(fd, 3000, 3500) == (bytes(range(256)) * 64)[3500:4000] + b"x" * 1000 \
            + (bytes(range(256)) * 64)[5000:6500]
        # aligned request through the twin, reading back the buffered write
        assert os.pread(fd, 4096, 4096)[:904] == b"x" * 904
    finally:
        os.close(fd)
    expected = bytearray(bytes(range(256)) * 64)
    expected[4000:5000] = b"x" * 1000
    assert source.read_bytes() == bytes(expected)


def test_a_filesystem_refusing_odirect_is_logged_once(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    real_open = os.open

    def refuse_direct(path: str, flags: int, *args: int) -> int:
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)

    path = tmp_path / "f"
    path.write_bytes(b"")
    monkeypatch.setattr(os, "open", refuse_direct)
    with caplog.at_level(logging.INFO, logger="mirrorfs.fileio"):
        assert fileio.open_direct(str(path), os.O_RDWR, "test") is None
        assert fileio.open_direct(str(path), os.O_RDWR, "test") is None
    lines = [r.getMessage() for r in caplog.records if "refuses O_DIRECT" in r.getMessage()]
    assert len(lines) == 1, lines


def test_an_odirect_open_keeps_o_direct_across_a_pivot(mounted: Mount, tmp_path: Path) -> None:
    """The engine swaps the open's descriptor to the target at the pivot; its O_DIRECT twin
    follows, so the writes after the pivot stay out of the target's page cache too."""
    name = "vm.raw"
    source = mounted.source / name
    target = tmp_path / "target.raw"
    make_image(source, SIZE, 3, holes=False)
    disk_backed(source)
    fd = os.open(mounted.mountpoint / name, os.O_RDWR | os.O_DIRECT)
    try:
        mounted.cli("mirror", mounted.mountpoint, name, target, "--create")
        wait_ready(mounted, name)
        mounted.cli("complete", mounted.mountpoint, name)
        assert job(mounted, name) is None
        drop_cache(target)
        block = mmap.mmap(-1, MiB)  # page-aligned, as an O_DIRECT client's buffers are
        block.write(os.urandom(MiB))
        for n in range(WRITTEN // MiB):
            assert os.pwrite(fd, block, n * MiB) == MiB
        os.fsync(fd)
    finally:
        os.close(fd)
    assert resident(target) <= 1 * MiB
    with open(target, "rb") as f:
        assert all(os.pread(f.fileno(), MiB, n * MiB) == bytes(block) for n in range(WRITTEN // MiB))
    # the source was left as it was at the pivot
    with open(source, "rb") as f:
        assert os.pread(f.fileno(), MiB, 0) != bytes(block)


def test_a_job_on_tmpfs_under_odirect_writers(mount_factory, shm_path: Path) -> None:
    """On tmpfs (which takes O_DIRECT) a job still copying meets ``qemu-io -t none`` writes of
    aligned and unaligned sizes; the target ends identical to the source."""
    (shm_path / "src").mkdir()
    mount = mount_factory(source=shm_path / "src")
    name = "vm.raw"
    source = mount.source / name
    target = shm_path / "target.raw"
    make_image(source, 16 * MiB, 4)
    mount.cli("mirror", mount.mountpoint, name, target, "--create", "--copy-mode", "write-blocking",
              "--speed", "4M")
    commands = []
    for n in range(40):
        offset, length = (n * 397 * 1024) % (15 * MiB), (4096, 65536, 512, 1000)[n % 4]
        commands += ["-c", f"write -P {n % 251 + 1} {offset - offset % 512 if length == 512 else offset} {length}"]
    proc = subprocess.run(["qemu-io", "-f", "raw", "-t", "none", *commands, str(mount.mountpoint / name)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "error" not in proc.stdout.lower(), proc.stdout + proc.stderr
    entry = job(mount, name)
    assert entry is not None and not entry["ready"], "the writes did not meet a copying job"
    mount.cli("set-speed", mount.mountpoint, name, "0")
    wait_ready(mount, name)
    mount.cli("complete", mount.mountpoint, name, "--no-pivot")
    assert_identical(source, target)


async def test_local_target_direct_writes_of_every_shape(tmp_path: Path) -> None:
    """Aligned writes (from ``bytes``, which are copied into an aligned buffer, and from an mmap,
    which is written as it is) and unaligned ones (read-modify-write of their pages) all bypass
    the page cache; every byte lands where it should."""
    path = tmp_path / "t.raw"
    target = LocalFileTarget.create(path, 8 * MiB)
    await target.connect()
    try:
        expected = bytearray(8 * MiB)
        aligned = fileio.aligned_buffer(MiB)
        aligned[:] = os.urandom(MiB)
        writes: list[tuple[int, bytes | bytearray | memoryview]] = [
            (0, os.urandom(MiB)), (MiB, memoryview(aligned)), (2 * MiB, bytearray(os.urandom(4096))),
            (3 * MiB + 512, os.urandom(512)), (4 * MiB + 1, os.urandom(10000)),
            (5 * MiB, memoryview(aligned)[4096:8192]),
        ]
        for offset, data in writes:
            await target.pwrite(offset, data, direct=True)
            expected[offset:offset + len(data)] = data
        await target.flush()
        assert resident(path) == 0
        assert path.read_bytes() == bytes(expected)
    finally:
        await target.close()


def test_on_tmpfs_an_odirect_open_keeps_the_inline_path(shm_path: Path, tmp_path: Path) -> None:
    """tmpfs holds the file in its page cache whatever the flags: an O_DIRECT twin there would
    keep nothing out of memory and only move every request into a worker thread (it made fio
    --direct=1 through the mount 4 to 10 times slower). On a disk the twin is made."""
    for where, expect_twin in ((shm_path, False), (tmp_path, True)):
        path = where / "img"
        path.write_bytes(b"\0" * 65536)
        fd = os.open(path, os.O_RDWR)
        twin = None
        try:
            twin = fileio.open_direct_twin(fd, os.O_RDWR, "source")
            assert (twin is not None) is expect_twin, where
        finally:
            fileio.close_twin(twin)
            os.close(fd)
