"""Requests are served concurrently: one slow source request does not stall other requests.

The slow source is real: qemu-storage-daemon exports a ``null-co`` block node with 2 s of latency
per request as a FUSE file inside the source directory, so every read of ``slow.raw`` through the
mount waits 2 s in the source.
"""

from __future__ import annotations

import mmap
import os
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest

from conftest import MountFactory
from mounting import qsd_fuse_export, wait_for

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
