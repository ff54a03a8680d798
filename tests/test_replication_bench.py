"""scripts/bench-nbd runs from a checkout and reports its ratios (issue 6): a smoke run, not a
timed test; the closing note quotes the figures of full runs."""

import re
import subprocess
from pathlib import Path

from conftest import requires_fuse

ROOT = Path(__file__).resolve().parents[1]


@requires_fuse
def test_bench_nbd_small_run_reports_ratios_and_an_identical_copy() -> None:
    proc = subprocess.run([str(ROOT / "scripts" / "bench-nbd"), "--size", "16", "--reps", "1"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    out = proc.stdout
    assert re.search(r"ratio mirrorfs / qemu-img \(time\): \d+\.\d+", out), out
    assert re.search(r"^\s+\d+ MiB\s+[\d.]+s\s+[\d.]+s", out, re.M), out
    assert "Images are identical." in out, out
