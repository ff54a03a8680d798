"""LocalFileTarget: a local file as a mirror target (sparse create, size checks, holes, errors)."""

from __future__ import annotations

import errno
import os
import pathlib
import random
import shutil
import tempfile

import pytest
import trio

from mirrorfs.errors import TargetError, TargetFatalError, TargetNoSpaceError, TargetRetryableError
from mirrorfs.targets.base import Target
from mirrorfs.targets.local import LocalFileTarget

MiB = 1 << 20


def allocated(path) -> int:
    return os.stat(path).st_blocks * 512


@pytest.fixture(params=["disk", "tmpfs"])
def workdir(request, tmp_path):
    """A directory on the disk (ext4) or on tmpfs: both must punch holes."""
    if request.param == "disk":
        yield tmp_path
        return
    path = pathlib.Path(tempfile.mkdtemp(prefix="mirrorfs-test-", dir="/dev/shm"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def test_create_makes_a_sparse_file_and_refuses_existing(workdir):
    path = workdir / "t.img"
    target = LocalFileTarget.create(path, 64 * MiB)
    assert isinstance(target, Target)
    assert os.path.getsize(path) == 64 * MiB
    assert allocated(path) == 0
    with pytest.raises(FileExistsError):
        LocalFileTarget.create(path, MiB)
    assert os.path.getsize(path) == 64 * MiB


async def test_round_trip_holes_and_flush(workdir):
    path = workdir / "t.img"
    target = LocalFileTarget.create(path, 16 * MiB)
    assert not target.connected
    with pytest.raises(TargetRetryableError, match="not open"):
        await target.pwrite(0, b"x")
    await target.connect()
    try:
        assert target.connected and target.size == 16 * MiB and target.description == str(path)
        data = random.Random(6).randbytes(4 * MiB)
        async with trio.open_nursery() as nursery:
            for i in range(4):
                nursery.start_soon(target.pwrite, i * MiB, data[i * MiB:(i + 1) * MiB])
        await target.flush()
        assert await target.pread(0, 4 * MiB) == data
        before = allocated(path)
        assert before >= 4 * MiB
        await target.write_zeroes(MiB, 2 * MiB)
        assert await target.pread(0, 4 * MiB) == data[:MiB] + bytes(2 * MiB) + data[3 * MiB:]
        assert allocated(path) <= before - 2 * MiB + 64 * 1024
        assert len(await target.pread(16 * MiB - 5, 100)) == 5
        with pytest.raises(TargetError, match="outside") as info:
            await target.pwrite(16 * MiB - 1, b"ab")
        assert info.value.errno == errno.EINVAL
        assert os.path.getsize(path) == 16 * MiB
    finally:
        await target.close()
        await target.close()
    assert not target.connected
    with open(path, "rb") as f:
        assert f.read(MiB) == data[:MiB]


async def test_write_zeroes_without_hole_punching(tmp_path):
    path = tmp_path / "t.img"
    with open(path, "wb") as f:
        f.write(b"\xee" * (6 * MiB))
    target = LocalFileTarget(path, expected_size=6 * MiB)
    await target.connect()
    target._punch = False  # as after a file system answered EOPNOTSUPP
    try:
        await target.write_zeroes(4096, 5 * MiB)
    finally:
        await target.close()
    with open(path, "rb") as f:
        content = f.read()
    assert content == b"\xee" * 4096 + bytes(5 * MiB) + b"\xee" * (MiB - 4096)


async def test_size_mismatch_refused(tmp_path):
    path = tmp_path / "t.img"
    LocalFileTarget.create(path, MiB)
    target = LocalFileTarget(path, expected_size=2 * MiB)
    with pytest.raises(TargetFatalError, match=f"is {MiB} bytes but {2 * MiB} are expected"):
        await target.connect()
    assert not target.connected
    # a target that changed size between two connects is refused too
    target = LocalFileTarget(path)
    await target.connect()
    await target.close()
    os.truncate(path, 3 * MiB)
    with pytest.raises(TargetFatalError):
        await target.connect()


async def test_missing_file_and_enospc(tmp_path):
    target = LocalFileTarget(tmp_path / "absent.img")
    with pytest.raises(TargetError) as info:
        await target.connect()
    assert info.value.errno == errno.ENOENT
    assert "absent.img" in str(info.value)
    # /dev/full answers every write with ENOSPC
    full = LocalFileTarget("/dev/full")
    await full.connect()
    full._size = 4096  # a character device has no size of its own
    try:
        with pytest.raises(TargetNoSpaceError, match="write on target /dev/full failed"):
            await full.pwrite(0, b"x" * 512)
    finally:
        await full.close()


async def test_close_waits_for_requests_in_flight(tmp_path):
    path = tmp_path / "t.img"
    target = LocalFileTarget.create(path, 64 * MiB)
    await target.connect()
    data = bytes(range(256)) * (32 * 1024)
    async with trio.open_nursery() as nursery:
        for i in range(8):
            nursery.start_soon(target.pwrite, i * len(data), data)
        await trio.sleep(0)
        nursery.start_soon(target.close)
    assert not target.connected
    with open(path, "rb") as f:
        assert f.read(8 * len(data)) == data * 8
