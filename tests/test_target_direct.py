"""A local target on a disk never mixes buffered and O_DIRECT I/O (direct mode, as QEMU's
cache.direct=on): a direct write next to a dirty buffered one in the same page-cache folio cannot
invalidate it, the next fdatasync reports EIO, and the cache may keep stale bytes.

The stress test drives a mount with a buffered and an O_DIRECT writer at once against a job
still copying, then ``complete --no-pivot``; the unit tests check the read-modify-write helpers
and the target's modes against a byte model. Everything lives in ``tmp_path`` (a disk here).
"""

from __future__ import annotations

import mmap
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from benchscripts import SCRIPTS
from mirrorfs import fileio
from mirrorfs.targets.local import LocalFileTarget
from mounting import Mount
from test_odirect import disk_backed

sys.path.insert(0, str(SCRIPTS))
from benchlib.images import drop_cache, resident  # noqa: E402  (fsync + fadvise; fincore)
from test_mirror_mount import job, make_image, wait_ready  # noqa: E402

KiB, MiB = 1 << 10, 1 << 20
PAGE = fileio.ALIGN


def read_direct(path: Path) -> bytes:
    """The file's bytes as the disk holds them (O_DIRECT: a stale page cache cannot answer)."""
    size = path.stat().st_size
    buf = fileio.aligned_buffer(-(-size // PAGE) * PAGE)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        n = os.preadv(fd, [buf], 0)
    finally:
        os.close(fd)
    return bytes(buf[:n])


def collisions(path: Path) -> int | None:
    """How many page-cache collisions ("Page cache invalidation failure on direct I/O", then a
    "File:" line) the kernel log reports for ``path``; None if the log cannot be read. Other tests' files
    do not count."""
    proc = subprocess.run(["dmesg"], capture_output=True, text=True, timeout=30, check=False)
    return proc.stdout.count(f"File: {path} ") if proc.returncode == 0 else None


#: the writers' pages: few enough that they keep meeting each other and the copy task there
HOT_PAGES = 256


def _buffered_writer(path: Path, stop: threading.Event, seed: int) -> None:
    """Unaligned buffered writes of up to a few pages; two of them run concurrently in the same
    clusters, which the engine then leaves dirty, so the copy task rewrites them (O_DIRECT on
    main) while more buffered duplicates land there."""
    rng = random.Random(seed)
    with open(path, "r+b", buffering=0) as f:
        n = 0
        while not stop.is_set():
            length = rng.randrange(100, 3 * PAGE)
            os.pwrite(f.fileno(), rng.randbytes(length), rng.randrange(0, HOT_PAGES * PAGE - length))
            n += 1
            if n % 64 == 0:
                os.fsync(f.fileno())


def _direct_writer(path: Path, stop: threading.Event, seed: int) -> None:
    rng = random.Random(seed)
    buf = mmap.mmap(-1, 4 * PAGE)
    fd = os.open(path, os.O_RDWR | os.O_DIRECT)
    try:
        while not stop.is_set():
            pages = rng.randrange(1, 5)
            buf[:pages * PAGE] = rng.randbytes(pages * PAGE)
            os.pwrite(fd, memoryview(buf)[:pages * PAGE], rng.randrange(0, HOT_PAGES - 4) * PAGE)
    finally:
        os.close(fd)


@pytest.mark.parametrize("run", range(3))
def test_buffered_and_direct_writers_on_one_target_never_collide(mounted: Mount, tmp_path: Path,
                                                                 run: int) -> None:
    name = "vm.raw"
    source = mounted.source / name
    target = tmp_path / "target.raw"
    make_image(source, 16 * MiB, run, holes=False)
    disk_backed(source)
    before = collisions(target)
    mounted.cli("mirror", mounted.mountpoint, name, target, "--create", "--speed", "8M")
    stop = threading.Event()
    errors: list[BaseException] = []

    def run_writer(func, seed: int) -> None:
        try:
            func(mounted.mountpoint / name, stop, seed)
        except BaseException as exc:  # reported by the test, not lost in the thread
            errors.append(exc)

    writers = [threading.Thread(target=run_writer, args=(func, run * 10 + n)) for n, func in
               enumerate((_buffered_writer, _buffered_writer, _direct_writer))]
    for t in writers:
        t.start()
    time.sleep(1)  # the copy task runs through the writes (8 MiB/s: not ready yet)
    mounted.cli("set-speed", mounted.mountpoint, name, "0")
    time.sleep(4)  # ready soon: duplicates, and the copy task rewriting what they left dirty
    stop.set()
    for t in writers:
        t.join(timeout=60)
    assert not errors, errors
    # the engine's periodic flush met the collision's EIO: the job failed
    assert "error" not in (job(mounted, name) or {}), job(mounted, name)
    wait_ready(mounted, name)
    done = mounted.cli("complete", mounted.mountpoint, name, "--no-pivot", check=False)
    assert done.returncode == 0, done.stderr
    after = collisions(target)
    if before is not None and after is not None:
        assert after == before, "the kernel reports buffered and direct I/O colliding on the target"
    expected = source.read_bytes()
    assert target.read_bytes() == expected  # through the page cache, stale pages included
    assert read_direct(target) == expected  # the disk
    drop_cache(target)
    assert target.read_bytes() == expected


def test_aligned_span() -> None:
    assert fileio.aligned_span(0, PAGE) == (0, PAGE)
    assert fileio.aligned_span(1, 1) == (0, PAGE)
    assert fileio.aligned_span(PAGE - 1, 2) == (0, 2 * PAGE)
    assert fileio.aligned_span(3 * PAGE + 5, 0) == (3 * PAGE, PAGE)
    assert fileio.aligned_span(2 * PAGE, 3 * PAGE) == (2 * PAGE, 3 * PAGE)


def test_read_modify_write_helpers_against_a_model(tmp_path: Path) -> None:
    path = tmp_path / "f"
    model = bytearray(os.urandom(64 * PAGE))
    path.write_bytes(model)
    disk_backed(path)
    drop_cache(path)
    twin = os.open(path, os.O_RDWR | os.O_DIRECT)
    try:
        rng = random.Random(7)
        shapes = [(0, PAGE), (1, 1), (PAGE - 1, 2), (5 * PAGE + 100, 3 * PAGE), (63 * PAGE, PAGE),
                  (63 * PAGE + PAGE - 10, 10), (7 * PAGE, 0)]
        shapes += [(o, rng.randrange(1, 5 * PAGE)) for o in
                   (rng.randrange(0, 58 * PAGE) for _ in range(40))]
        for offset, length in shapes:
            data = rng.randbytes(length)
            assert fileio.pwrite_only_direct(twin, data, offset) == length
            model[offset:offset + length] = data
            start, span = offset, rng.randrange(0, 4 * PAGE)
            assert fileio.pread_only_direct(twin, span, start) == bytes(model[start:start + span])
        # an mmap buffer, aligned: written as it is
        block = fileio.aligned_buffer(2 * PAGE)
        block[:] = os.urandom(2 * PAGE)
        assert fileio.pwrite_only_direct(twin, memoryview(block), 10 * PAGE) == 2 * PAGE
        model[10 * PAGE:12 * PAGE] = block
        # reads stop at the end of the file
        assert fileio.pread_only_direct(twin, 3 * PAGE, 63 * PAGE + 7) == bytes(model[63 * PAGE + 7:])
    finally:
        os.close(twin)
    assert resident(path) == 0  # no page of it went through the cache
    assert path.read_bytes() == bytes(model)


async def _exercise(target: LocalFileTarget, model: bytearray, seed: int) -> None:
    rng = random.Random(seed)
    size = len(model)
    for _ in range(60):
        offset = rng.randrange(0, size - 1)
        length = rng.randrange(1, min(3 * PAGE, size - offset) + 1)
        if rng.random() < 0.2:
            await target.write_zeroes(offset, length)
            model[offset:offset + length] = bytes(length)
        else:
            data = rng.randbytes(length)
            await target.pwrite(offset, data, direct=rng.random() < 0.5)
            model[offset:offset + length] = data
        start = rng.randrange(0, size)
        assert await target.pread(start, 2 * PAGE) == bytes(model[start:start + 2 * PAGE])
    await target.flush()


async def test_a_page_aligned_target_does_all_its_io_directly(tmp_path: Path) -> None:
    path = tmp_path / "t.raw"
    target = LocalFileTarget.create(path, 32 * PAGE)
    disk_backed(path)
    await target.connect()
    try:
        model = bytearray(32 * PAGE)
        assert not target.can_write_now(PAGE)  # the inline (buffered) path is closed too
        await _exercise(target, model, 1)
        assert resident(path) == 0
        assert read_direct(path) == bytes(model)
        # growing to a size the page does not divide: buffered from then on, still exact
        await target.resize(40 * PAGE + 123)
        model += bytes(8 * PAGE + 123)
        await _exercise(target, model, 2)
        assert resident(path) > 0
    finally:
        await target.close()
    drop_cache(path)
    assert path.read_bytes() == bytes(model)


async def test_a_target_of_an_unaligned_size_stays_buffered(tmp_path: Path) -> None:
    path = tmp_path / "t.raw"
    target = LocalFileTarget.create(path, 16 * PAGE + 512)
    disk_backed(path)
    await target.connect()
    try:
        model = bytearray(16 * PAGE + 512)
        await _exercise(target, model, 3)
        assert resident(path) > 0  # buffered: its pages went through the cache
    finally:
        await target.close()
    drop_cache(path)
    assert path.read_bytes() == bytes(model)
