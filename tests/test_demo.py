"""``./scripts/demo`` (issue 7, Done when 3): runs with no arguments, ends with identical images
and a summary, cleans up after itself, and runs again. Once with the guest writer, once with the
qemu-io fallback (the path taken where no guest can be built)."""

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
def test_demo_runs_to_identical_images_and_cleans_up(writer: str) -> None:
    env = dict(os.environ)
    env.pop("MIRRORFS_LOG_FILE", None)
    if writer == "qemu-io":
        env["MIRRORFS_DEMO_WRITER"] = "qemu-io"
    proc = subprocess.run([str(REPO / "scripts" / "demo")], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=240, env=env, cwd="/")
    out = proc.stdout
    assert proc.returncode == 0, out[-4000:]
    assert out.rstrip().endswith("demo: OK"), out[-2000:]
    assert "Images are identical." in out
    # (while the guest writes on, a cluster or two may be dirty again at any instant)
    assert re.search(r"status.json \(in the mount\): status=ready offset=\d+ len=67108864", out), out
    assert "has 0x5a at 60M" in out and "still zero at 60M" in out
    assert "at the switch:   qemu-img compare: source and target identical" in out
    if writer == "guest":
        stopped = re.search(r"WRITER stopped records=(\d+) first=1 last=(\d+)", out)
        assert stopped, out
        assert f"records 1..{stopped.group(2)} on both" in out
    seconds = float(re.search(r"total time:\s+([\d.]+) s", out).group(1))
    assert seconds < 120, f"the demo took {seconds} s"
    # Cleaned up: its temp dir is gone and nothing is mounted there.
    work = re.search(r"mount (/tmp/mirrorfs-demo\.\w+)/source", out).group(1)
    assert not Path(work).exists(), f"{work} left behind"
    assert not is_mounted(Path(work) / "mnt")
