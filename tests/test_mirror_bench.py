"""scripts/bench-mirror runs (with the venv, no setup step), cleans up, and reports every figure
issue 4's "Done when" 8 asks for: time to ready vs cp, fio writes native / bare mount / ready job."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_bench_mirror_quick_runs_and_reports_ratios(tmp_path: Path) -> None:
    r = subprocess.run([str(ROOT / "scripts" / "bench-mirror"), "--quick", "--size", "64M", "--runtime", "1",
                        "--dir", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    assert "full mirror of a fully written 64.0 MiB image" in out
    assert re.search(r"mirror \(drive-mirror to BLOCK_JOB_READY\)\s+[\d.]+ s\s+\d+ MiB/s", out), out
    assert re.search(r"cp --sparse=never of the same file\s+[\d.]+ s", out), out
    assert re.search(r"ratio mirror / cp\s+[\d.]+x", out), out
    for row in ("native file", "bare mount", r"mount \+ ready job \(background\)",
                r"mount \+ ready job \(write-blocking\)"):
        assert re.search(row + r"\s+\d+\s+[\d.]+x\s+[\d.]+x\s+\d+\s+[\d.]+x\s+[\d.]+x\n", out), (row, out)
    assert re.search(r"native file\s+\d+\s+1\.00x", out)
    # Its work directory (mount, images, targets) is gone and nothing stays mounted.
    assert list(tmp_path.iterdir()) == []
    assert not any("bench-mirror-" in line for line in Path("/proc/mounts").read_text().splitlines())
