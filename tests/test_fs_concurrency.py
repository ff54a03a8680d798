"""Requests are served concurrently: one slow source request does not stall other requests.

The slow sources are real: qemu-storage-daemon exports a ``null-co`` block node with 2 s of
latency per request as a FUSE file inside the source directory, so every read of ``slow.raw``
through the mount waits 2 s in the source; and a FUSE passthrough (``stallfs.py``) holds chosen
metadata requests (unlink, rename, statfs, ...) of a source directory until the test lets go.
"""

from __future__ import annotations

import functools
import mmap
import os
import stat
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest

from conftest import MountFactory
from mounting import qsd_fuse_export, wait_for
from stallfs import Stall, stalling_fs

LATENCY = 3.0


@pytest.fixture
def slow_source(tmp_path: Path) -> Iterator[Path]:
    source = tmp_path / "source"
    source.mkdir()
    (source / "fast.raw").write_bytes(b"f" * 65536)
    (source / "sub").mkdir()
    (source / "sub" / "x.raw").write_bytes(b"x")
    slow = source / "slow.raw"
    slow.touch()
    node = f"driver=null-co,node-name=n,size={64 << 20},latency-ns={int(LATENCY * 1e9)},read-zeroes=on"
    with qsd_fuse_export(node, slow):
        yield source


def test_slow_read_does_not_stall_other_requests(slow_source: Path, mount_factory: MountFactory) -> None:
    mount = mount_factory(source=slow_source)
    mnt = mount.mountpoint
    result: dict[str, object] = {}

    def slow_read() -> None:
        start = time.monotonic()
        fd = os.open(mnt / "slow.raw", os.O_RDONLY | os.O_DIRECT)
        try:
            buf = mmap.mmap(-1, 4096)
            result["n"] = os.preadv(fd, [buf], 0)
            result["data"] = buf[:]
        finally:
            os.close(fd)
        result["elapsed"] = time.monotonic() - start

    thread = threading.Thread(target=slow_read)
    thread.start()
    try:
        time.sleep(0)  # let the thread issue its read; proven below by its elapsed time
        wait_for(lambda: thread.is_alive(), 1, "the slow reader")
        fast = []
        while thread.is_alive() and len(fast) < 20:
            t0 = time.monotonic()
            assert (mnt / "fast.raw").read_bytes() == b"f" * 65536
            t1 = time.monotonic()
            assert (mnt / ".mirrorfs" / "status").read_text() == "no jobs\n"
            t2 = time.monotonic()
            # (not the root: listing it needs slow.raw's attributes, which the source withholds
            # while the read is in flight; that request rightly waits, the others must not)
            assert os.listdir(mnt / "sub") == ["x.raw"] and (mnt / "sub" / "x.raw").stat().st_size == 1
            fast.append((round(t1 - t0, 3), round(t2 - t1, 3), round(time.monotonic() - t2, 3)))
            time.sleep(0.05)
    finally:
        thread.join(LATENCY * 5)
    assert not thread.is_alive()
    assert result["n"] == 4096 and result["data"] == b"\0" * 4096
    assert result["elapsed"] >= LATENCY * 0.9  # the read really was slow...
    assert len(fast) >= 5, fast                # ...and other requests were served meanwhile,
    assert max(max(f) for f in fast) < LATENCY / 2, [f for f in fast if max(f) >= LATENCY / 2]  # none waited for it


# ---- metadata on a slow source ---------------------------------------------------------------
# The stalling filesystem (tests/stallfs.py) holds one kind of request until the test releases
# it, so "slow" is exact: the request is provably pending while the other requests are timed.

#: How long another image's I/O may take while a metadata request hangs in the source (it takes
#: well under a millisecond when the mount is free; a stalled request loop waits forever).
BOUND = 3.0
FAST = b"F" * 65536


def _reset_backing(backing: Path) -> None:
    for name in ("renamed", "new"):
        (backing / name).unlink(missing_ok=True)
    for name in ("newdir",):
        if (backing / name).exists():
            (backing / name).rmdir()
    (backing / "victim").write_bytes(b"v" * 100)
    (backing / "unseen").write_bytes(b"new")
    os.chmod(backing / "victim", 0o644)
    (backing / "emptydir").mkdir(exist_ok=True)
    (backing / "sub").mkdir(exist_ok=True)
    (backing / "sub" / "f").write_bytes(b"f")
    if not (backing / "link").is_symlink():
        os.symlink("victim", backing / "link")


#: (request held in the source, what the client does through the mount, what it must see after)
SLOW_METADATA: list[tuple[str, str, Callable[[Path], object], Callable[[Path, object], bool]]] = [
    ("unlink", "unlink", lambda m: os.unlink(m / "victim"), lambda b, _: not (b / "victim").exists()),
    ("rename", "rename", lambda m: os.rename(m / "victim", m / "renamed"),
     lambda b, _: (b / "renamed").read_bytes() == b"v" * 100 and not (b / "victim").exists()),
    ("setattr", "truncate", lambda m: os.truncate(m / "victim", 10), lambda b, _: (b / "victim").stat().st_size == 10),
    ("setattr", "chmod", lambda m: os.chmod(m / "victim", 0o600),
     lambda b, _: stat.S_IMODE((b / "victim").stat().st_mode) == 0o600),
    ("create", "create", lambda m: os.close(os.open(m / "new", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)),
     lambda b, _: (b / "new").exists()),
    ("mkdir", "mkdir", lambda m: os.mkdir(m / "newdir"), lambda b, _: (b / "newdir").is_dir()),
    ("rmdir", "rmdir", lambda m: os.rmdir(m / "emptydir"), lambda b, _: not (b / "emptydir").exists()),
    ("opendir", "listdir", lambda m: os.listdir(m / "sub"), lambda b, r: r == ["f"]),
    ("readlink", "readlink", lambda m: os.readlink(m / "link"), lambda b, r: r == "victim"),
    # a name the mount has not looked up before, so no cache answers for the source
    ("lookup", "stat", lambda m: os.stat(m / "unseen", follow_symlinks=False).st_size, lambda b, r: r == 3),
]


def _while_stalled(ctl: Path, op: str, action: Callable[[], object], probe: Callable[[], None]
                   ) -> tuple[str | None, object]:
    """Run ``action`` (a request that ``op`` in the source holds), and ``probe`` while it hangs.

    Returns (what went wrong or None, the action's result).
    """
    result: dict[str, object] = {}

    def run(key: str, func: Callable[[], object]) -> threading.Thread:
        def body() -> None:
            try:
                result[key] = func()
            except BaseException as exc:  # reported below
                result[key + "-error"] = exc
        thread = threading.Thread(target=body, daemon=True)
        thread.start()
        return thread

    with Stall(ctl, op) as stall:
        slow = run("action", action)
        stall.wait_stalled()
        start = time.monotonic()
        fast = run("probe", probe)
        fast.join(BOUND)
        problem = None
        if fast.is_alive():
            problem = f"other requests waited more than {BOUND} s for the held {op}"
        elif "probe-error" in result:
            problem = f"other requests failed while {op} was held: {result['probe-error']!r}"
        elif not slow.is_alive():
            problem = f"the {op} request was not held (it ended after {time.monotonic() - start:.3f} s)"
    fast.join(30)
    slow.join(30)
    assert not slow.is_alive() and not fast.is_alive(), "requests still hang after the source let go"
    if problem is None and "action-error" in result:
        problem = f"the {op} request failed: {result['action-error']!r}"
    return problem, result.get("action")


def _probe(mnt: Path, fd: int) -> Callable[[], None]:
    def probe() -> None:
        assert os.pread(fd, len(FAST), 0) == FAST
        assert os.pwrite(fd, FAST[:4096], 0) == 4096
        assert (mnt / ".mirrorfs" / "status").read_text() == "no jobs\n"
    return probe


def test_slow_metadata_does_not_stall_other_requests(tmp_path: Path, shm_path: Path,
                                                     mount_factory: MountFactory) -> None:
    """Every metadata request that waits for a slow source directory leaves the rest of the
    mount alone: an image on a fast filesystem (tmpfs, the inline I/O path) is read and written
    and the control files answer while the request hangs, and it completes once the source does."""
    source = shm_path / "source"
    (source / "slow").mkdir(parents=True)
    (source / "fast.raw").write_bytes(FAST)
    backing = tmp_path / "backing"
    backing.mkdir()
    with stalling_fs(backing, source / "slow", tmp_path / "ctl"):
        mount = mount_factory(source=source)
        mnt = mount.mountpoint
        fd = os.open(mnt / "fast.raw", os.O_RDWR)
        problems = []
        try:
            for op, what, action, check in SLOW_METADATA:
                _reset_backing(backing)
                problem, got = _while_stalled(tmp_path / "ctl", op, functools.partial(action, mnt / "slow"),
                                              _probe(mnt, fd))
                if problem is None and not check(backing, got):
                    problem = f"wrong outcome {got!r}"
                if problem is not None:
                    problems.append(f"{what}: {problem}")
        finally:
            os.close(fd)
        mount.unmount()
    assert not problems, "\n".join(problems)


def test_slow_statfs_does_not_stall_other_requests(tmp_path: Path, mount_factory: MountFactory) -> None:
    """statfs asks the source directory itself: with the whole source on the slow filesystem, a
    held statfs leaves reads, writes and the control files of the mount alone. An open asks the
    new descriptor's filesystem type (``fstatfs``, a statfs request on FUSE and NFS) and must
    not hold the others either; nor may reads of images that are not on tmpfs ask it again."""
    backing = tmp_path / "backing"
    backing.mkdir()
    (backing / "fast.raw").write_bytes(FAST)
    (backing / "other.raw").write_bytes(b"o" * 512)
    source = tmp_path / "source"
    source.mkdir()
    with stalling_fs(backing, source, tmp_path / "ctl"):
        mount = mount_factory(source=source)
        mnt = mount.mountpoint
        fd = os.open(mnt / "fast.raw", os.O_RDWR)

        def open_other() -> bytes:
            with open(mnt / "other.raw", "rb") as f:
                return f.read()

        try:
            problem, got = _while_stalled(tmp_path / "ctl", "statfs", lambda: os.statvfs(mnt), _probe(mnt, fd))
            assert problem is None, problem
            assert got.f_blocks == os.statvfs(backing).f_blocks  # type: ignore[attr-defined]
            problem, got = _while_stalled(tmp_path / "ctl", "statfs", open_other, _probe(mnt, fd))
            assert problem is None, f"open: {problem}"
            assert got == b"o" * 512
        finally:
            os.close(fd)
        mount.unmount()
