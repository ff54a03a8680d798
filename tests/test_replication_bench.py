"""scripts/bench-nbd runs from a checkout and reports its ratios: a smoke run, not a timed test.
It leaves no mount, server or file behind, also when interrupted."""

import re
import subprocess
from pathlib import Path

from benchscripts import SCRIPTS, assert_nothing_left, interrupt, mounts_under, running
from conftest import requires_fuse


@requires_fuse
def test_bench_nbd_small_run_reports_ratios_and_an_identical_copy(tmp_path: Path) -> None:
    proc = subprocess.run([str(SCRIPTS / "bench-nbd"), "--size", "16", "--reps", "1", "--dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    out = proc.stdout
    assert re.search(r"ratio mirrorfs / qemu-img \(time\): \d+\.\d+", out), out
    assert re.search(r"^\s+\d+ MiB\s+[\d.]+s\s+[\d.]+s", out, re.M), out
    assert "Images are identical." in out, out
    assert_nothing_left(tmp_path)


@requires_fuse
def test_bench_nbd_ctrl_c_stops_the_mount_and_the_server(tmp_path: Path) -> None:
    interrupt("bench-nbd", ["--size", "64", "--reps", "50", "--dir", str(tmp_path)],
              lambda: len(mounts_under(tmp_path)) == 1 and running("qemu-nbd", tmp_path))
    assert_nothing_left(tmp_path)
