"""A pivot under a writer that never pauses: no acknowledged write is lost, none lands twice.

The fast, guest-free companion of ``test_e2e_migration.py``, aimed at the switch itself: a
writer process writes numbered 4 KiB blocks back to back (no pause, so one of its writes is
nearly always waiting at the job's closed gate while ``complete`` pivots), and logs each block
once ``pwrite`` has returned. Afterwards the target holds every block the writer wrote, 0 .. last;
the source holds exactly a prefix 0 .. n-1 and zeroes after it.

Regression test for an engine bug (fixed in ``40621df``): after a pivot to an NBD target, a
write that had waited at the gate went to the source's descriptor, so the target missed it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest

from mounting import Mount, wait_for
from nbdservers import qemu_nbd

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

MiB = 1 << 20
SIZE = 256 * MiB
BLOCK = 4096

WRITER = r"""
import os, sys
path, stop = sys.argv[1], sys.argv[2]
fd = os.open(path, os.O_RDWR)
seq = 0
while not os.path.exists(stop) and (seq + 1) * 4096 <= os.fstat(fd).st_size:
    block = (b"%016d" % seq) * 256
    assert os.pwrite(fd, block, seq * 4096) == 4096
    seq += 1
    if seq % 64 == 0:
        print(seq, flush=True)
os.fsync(fd)
print("done", seq, flush=True)
"""


def block(seq: int) -> bytes:
    return (b"%016d" % seq) * 256


def blocks_on(path: Path) -> int:
    """How many numbered blocks ``path`` holds from offset 0; checks that only zeroes follow."""
    data = path.read_bytes()
    n = 0
    while n * BLOCK < len(data) and data[n * BLOCK:(n + 1) * BLOCK] == block(n):
        n += 1
    rest = data[n * BLOCK:]
    if rest.count(0) != len(rest):
        bad = next(i for i in range(0, len(rest), BLOCK) if rest[i:i + BLOCK].count(0) != BLOCK)
        raise AssertionError(f"{path}: blocks 0..{n - 1} intact, then unexpected data in block "
                             f"{n + bad // BLOCK}: {rest[bad:bad + 32]!r}")
    return n


def job_ready(mount: Mount) -> bool:
    jobs = json.loads(mount.cli("status", mount.mountpoint, "--json").stdout)
    return bool(jobs) and jobs[0]["ready"]


@pytest.mark.parametrize("kind", ["nbd", "local"])
@pytest.mark.parametrize("round_", range(2))
def test_pivot_under_a_back_to_back_writer(tmp_path: Path, mount_factory: Any, kind: str,
                                            round_: int) -> None:
    mount = mount_factory()
    source = mount.source / "vm.raw"
    with open(source, "wb") as f:
        f.truncate(SIZE)
    with ExitStack() as stack:
        if kind == "nbd":
            target = tmp_path / "served.raw"
            with open(target, "wb") as f:
                f.truncate(SIZE)
            target_arg = stack.enter_context(qemu_nbd(target, transport="unix")).uri
            extra: tuple[str, ...] = ()
        else:
            target = tmp_path / "target.raw"
            target_arg, extra = str(target), ("--create",)
        stop = tmp_path / "stop"
        writer = subprocess.Popen([sys.executable, "-c", WRITER, str(mount.mountpoint / "vm.raw"),
                                   str(stop)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True)
        stack.callback(lambda: writer.poll() is None and writer.kill())
        mount.cli("mirror", mount.mountpoint, "vm.raw", target_arg, *extra)
        wait_for(lambda: job_ready(mount), 60, "the job to be ready", interval=0.1)
        time.sleep(0.2 * round_)  # vary where the switch falls (the writer runs on regardless)
        mount.cli("complete", mount.mountpoint, "vm.raw")
        t = time.monotonic()
        wait_for(lambda: time.monotonic() - t > 0.5, 5, "writes after the switch")
        stop.touch()
        out, err = writer.communicate(timeout=60)
        assert writer.returncode == 0, err
        last = int(out.split()[-1])
        on_target = blocks_on(target)
        on_source = blocks_on(source)
        assert on_target == last, f"target holds {on_target} blocks, the writer wrote {last}"
        assert 0 < on_source < last, (on_source, last)
        print(f"{kind}: switch after block {on_source - 1}; {last} blocks written")
