"""``./scripts/demo``: runs with no arguments, shows a pivot under a writer that keeps writing
through ``complete`` and after it, verifies the record stream across the switch, prints a
summary, cleans up after itself, and runs again. Once with the guest writer, once with the
qemu-io host writer (the path taken where no guest can be built).

The demo removes its disks, so what it verified is checked here from what it prints: the numbers
in its summary must agree with each other, with the writer's own report and with
``qemu-img compare``."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from mounting import is_mounted

REPO = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.slow, pytest.mark.fuse, pytest.mark.timeout(300)]


@pytest.mark.parametrize("writer", ["guest", "qemu-io"])
def test_demo_pivots_under_a_writer_verifies_and_cleans_up(writer: str) -> None:
    env = dict(os.environ)
    env.pop("MIRRORFS_LOG_FILE", None)
    if writer == "qemu-io":
        env["MIRRORFS_DEMO_WRITER"] = "qemu-io"
    proc = subprocess.run([str(REPO / "scripts" / "demo")], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=240, env=env, cwd="/")
    out = proc.stdout
    assert proc.returncode == 0, out[-4000:]
    assert out.rstrip().endswith("demo: OK"), out[-2000:]
    # (while the writer writes on, a cluster or two may be dirty again at any instant)
    assert re.search(r"status.json \(in the mount\): status=ready offset=\d+ len=67108864", out), out
    # The writer was stopped only after `complete` returned, and by the demo.
    stopped = re.search(r"WRITER stopped records=(\d+) first=1 last=(\d+) run=(\d+) by=stop", out)
    assert stopped, out
    assert out.index("completed vm.raw: the mount now serves the target") < stopped.start()
    last, run = int(stopped.group(2)), stopped.group(3)
    assert int(stopped.group(1)) == last
    summary = out[out.index("== summary"):]
    who = "guest writer (in QEMU)" if writer == "guest" else "host writer (qemu-io)"
    assert f"writer:            {who}, run {run}: records 1..{last}, one at a time," in summary
    switch = re.search(r"the switch:        after record (\d+) \(the writer was at (\d+) before"
                       r" `complete`,\n\s+at (\d+) after it\)", summary)
    assert switch, summary
    k, before, after = (int(g) for g in switch.groups())
    assert 0 < before <= k <= after < last, (before, k, after, last)
    # The record stream, unbroken across the switch.
    assert f"before the switch: records 1..{k} on both disks, byte for byte identical" in summary
    assert f"after the switch:  records {k + 1}..{last} ({last - k}) on the target only" in summary
    assert last - k >= 100, f"only {last - k} records after the switch"
    assert (f"source:            records 1..{k}, an unbroken prefix (none missing), then zeroes"
            in summary)
    assert f"target:            records 1..{last}, unbroken, then zeroes" in summary
    assert "verification:      ok" in summary
    # An independent witness: qemu-img compare's first difference is record k+1.
    assert f"Content mismatch at offset {k * 4096}!" in out
    seconds = float(re.search(r"total time:\s+([\d.]+) s", out).group(1))
    assert seconds < 120, f"the demo took {seconds} s"
    # Cleaned up: its temp dir is gone and nothing is mounted there.
    work = re.search(r"mount (/tmp/mirrorfs-demo\.\w+)/source", out).group(1)
    assert not Path(work).exists(), f"{work} left behind"
    assert not is_mounted(Path(work) / "mnt")
