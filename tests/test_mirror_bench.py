"""scripts/bench measures what the mirror job costs: the fio rows of the bare mount and of a
ready job in each copy mode, with their ratios to the bare mount and to the file itself, and the
job's target equal to its image afterwards (time to ready against cp: test_bench_smoke)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from benchscripts import SCRIPTS, assert_nothing_left

pytestmark = pytest.mark.fuse


def test_bench_reports_the_jobs_cost_against_the_bare_mount_and_the_file(tmp_path: Path) -> None:
    out = tmp_path / "out.json"
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    r = subprocess.run([sys.executable, str(SCRIPTS / "bench"), "--configs", "native,mirrorfs,mirrorfs-bg,mirrorfs-wb",
                        "--disk-configs", "", "--workloads", "seq-write-1M,rand-write-4k-qd1", "--reps", "1",
                        "--runtime", "0.3", "--size", "16M", "--no-ready", "--dir", str(scratch), "--json", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert "fio_disk" not in res and set(res["places"]) == {"tmpfs"}
    assert res["mirror_targets_identical"] == {"tmpfs": {"mirrorfs-bg": True, "mirrorfs-wb": True}}
    pairs = ["mirrorfs-bg / mirrorfs", "mirrorfs-wb / mirrorfs", "mirrorfs / native", "mirrorfs-bg / native",
             "mirrorfs-wb / native"]
    head = next(line for line in r.stdout.splitlines() if line.startswith("| ratio to the bare mount"))
    assert [c.strip() for c in head.split("|")[2:-1]] == pairs
    for row in ("seq write 1M", "rand write 4k, QD1"):
        line = next(line for line in r.stdout.splitlines()[r.stdout.splitlines().index(head):]
                    if line.startswith(f"| {row} |"))
        cells = [c.strip() for c in line.split("|")[2:-1]]
        assert len(cells) == len(pairs) and all(re.fullmatch(r"[\d.]+x \([\d.]+ / ([\d.]+|-)\)", c) for c in cells), line
    assert not (SCRIPTS / "bench-mirror").exists()
    assert_nothing_left(scratch)
