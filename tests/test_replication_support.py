"""Helpers shared by the NBD replication tests (``test_replication_*.py``); no tests of its own.

Everything here drives real components: the mirrorfs CLI and QMP socket of a real mount, real
``qemu-img``, and a writer that is a separate Python process writing through the FUSE mount (so a
stall of the mount shows as a stall of a real ``pwrite``, measured by the writer itself).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

from mirrorfs.control.qmp_client import QMPClient
from mirrorfs.nbd.client import DEFAULT_TIMEOUT

#: The NBD client's reply timeout, seconds (documented in docs/replication.md; a test checks that
#: the page and the code agree).
NBD_TIMEOUT = DEFAULT_TIMEOUT


def make_image(path: Path, size: int, *, seed: int | None = None) -> None:
    """A raw image of ``size`` random bytes (written directly, not through a mount)."""
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, 4 << 20)
            f.write(os.urandom(n))
            left -= n
        f.flush()
        os.fsync(f.fileno())


def make_blank(path: Path, size: int) -> None:
    """A sparse all-zero file of ``size`` bytes (an empty NBD target)."""
    with open(path, "wb") as f:
        f.truncate(size)


def outage_mount(mount_factory: Any, tmp_path: Path, size: int) -> tuple[Any, Path, Path]:
    """A mount whose warnings are expected (a lost target is logged as one), its ``vm.raw`` of
    random bytes, and a blank file of its size to export as the NBD target."""
    mount = mount_factory()
    mount.allow_log(r"WARNING")  # lost targets are logged as warnings, by design
    source = mount.source / "vm.raw"
    make_image(source, size)
    served = tmp_path / "served.raw"
    make_blank(served, size)
    return mount, source, served


def qmp(mount: Any, *, timeout: float = 60.0) -> QMPClient:
    """A negotiated QMP session with the mount (close it, or use ``with``)."""
    return QMPClient.connect((mount.control / "socket").read_text().strip(), timeout=timeout)


def wait_job(client: QMPClient, device: str, predicate: Callable[[dict[str, Any]], bool],
             timeout: float, what: str) -> dict[str, Any]:
    """Poll query-block-jobs until ``predicate(entry)``; fail with the last entry after ``timeout``."""
    deadline = time.monotonic() + timeout
    last: dict[str, Any] | None = None
    while True:
        jobs = {j["device"]: j for j in client.execute("query-block-jobs")}
        last = jobs.get(device)
        if last is not None and predicate(last):
            return last
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}; job: {last}")
        time.sleep(0.05)


def wait_ready(client: QMPClient, device: str, timeout: float = 90.0) -> dict[str, Any]:
    return wait_job(client, device, lambda j: j["ready"] and j["status"] == "ready", timeout,
                    f"{device} to be ready")


_WRITER = r"""
import json, os, random, sys, time
path, stop, out, block, span, seed, fsync_every, pause = sys.argv[1:9]
block, span, seed, fsync_every, pause = int(block), int(span), int(seed), int(fsync_every), float(pause)
rng = random.Random(seed)
fd = os.open(path, os.O_RDWR)
stats = {"writes": 0, "bytes": 0, "max_latency": 0.0, "errors": [], "fsyncs": 0,
         "max_fsync_latency": 0.0, "slow": []}
t0 = time.monotonic()
try:
    while not os.path.exists(stop):
        off = rng.randrange(span // block) * block
        data = rng.randbytes(block)
        t = time.monotonic()
        try:
            n = os.pwrite(fd, data, off)
            if n != block:
                stats["errors"].append(f"short write {n} at {off}")
        except OSError as exc:
            stats["errors"].append(f"pwrite at {off}: {exc}")
            time.sleep(0.01)
            continue
        dt = time.monotonic() - t
        if dt > 1.0:
            stats["slow"].append([round(t - t0, 2), round(dt, 2)])
        stats["max_latency"] = max(stats["max_latency"], dt)
        stats["writes"] += 1
        stats["bytes"] += block
        if fsync_every and stats["writes"] % fsync_every == 0:
            t = time.monotonic()
            try:
                os.fsync(fd)
            except OSError as exc:
                stats["errors"].append(f"fsync: {exc}")
            stats["max_fsync_latency"] = max(stats["max_fsync_latency"], time.monotonic() - t)
            stats["fsyncs"] += 1
        time.sleep(pause)
finally:
    try:
        os.close(fd)
    except OSError as exc:  # the mount may be gone (a crash test): that is an error seen too
        stats["errors"].append(f"close: {exc}")
    with open(out + ".tmp", "w") as f:
        json.dump(stats, f)
    os.rename(out + ".tmp", out)
"""


class Writer:
    """A separate process that writes random blocks through the mount until stopped.

    It records its own worst ``pwrite`` and ``fsync`` latency and every error it saw. ``pause``
    seconds pass between writes; ``fsync_every`` N writes it calls fsync (0: never).
    """

    def __init__(self, path: Path, workdir: Path, *, block: int = 4096, span: int | None = None,
                 seed: int = 1, fsync_every: int = 0, pause: float = 0.001) -> None:
        self.stop_file = workdir / f"writer-{seed}.stop"
        self.out = workdir / f"writer-{seed}.json"
        span = span if span is not None else os.path.getsize(path)
        self.proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(path), str(self.stop_file),
                                      str(self.out), str(block), str(span), str(seed), str(fsync_every), str(pause)])
        self.result: dict[str, Any] | None = None

    def stop(self, timeout: float = 60.0) -> dict[str, Any]:
        """Ask it to stop, wait for it, return its statistics."""
        if self.result is not None:
            return self.result
        self.stop_file.touch()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            raise AssertionError(f"the writer did not stop within {timeout:.0f} s (stuck in the mount?)")
        assert self.proc.returncode == 0, f"writer exited {self.proc.returncode}"
        self.result = json.loads(self.out.read_text())
        return self.result

    def kill(self) -> None:
        """For ``finally``: make sure the process is gone (it is our own child)."""
        if self.proc.poll() is None:
            self.stop_file.touch()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
