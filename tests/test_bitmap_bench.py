"""scripts/bench-bitmap runs (a Python script that re-runs itself with the venv) and reports its figures."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_bench_bitmap_runs_and_reports(tmp_path):
    r = subprocess.run([str(ROOT / "scripts" / "bench-bitmap"), "--reps", "1", "--dir", str(tmp_path)],
                       capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert re.search(r"clusters\s+16777216\n", out)
    assert re.search(r"memory, in-memory bitmap \(words\)\s+2\.00 MiB", out)
    for row in ("mark 4 KiB, in memory, already set", "mark 4 KiB, persistent, already set",
                "mark 4 KiB, persistent, 0->1 (memory and file)", "flush (msync), nothing changed"):
        assert re.search(re.escape(row) + r"\s+[\d.]+ us\n", out), row
    assert re.search(r"list all runs, half dirty \(every other 1 MiB: 524288 runs\)\s+[\d.]+ ms", out)
    assert list(tmp_path.iterdir()) == []  # the bitmap file is removed
