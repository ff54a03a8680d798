"""scripts/bench cannot rot: its plan, a tiny real run (content of its JSON), bad input, Ctrl-C.

Not timed tests: the figures are only checked to exist and be positive; what is asserted is that
every configuration really ran, that the mirrors' targets equal their images, and that nothing
the script started (mounts, qemu-storage-daemon, mirrorfs processes, scratch files) survives it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mounting import wait_for

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "scripts" / "bench"

pytestmark = pytest.mark.fuse


def bench(*args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(BENCH), *args], capture_output=True, text=True, timeout=timeout)


def mounts_under(path: Path) -> list[str]:
    with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
        return [line.split()[4] for line in f if line.split()[4].startswith(str(path))]


def processes_naming(path: Path) -> list[int]:
    """Live processes whose command line mentions ``path`` (the bench's daemons would)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
            state = (entry / "stat").read_bytes().rsplit(b")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if str(path) in cmdline and state not in (b"Z", b"X"):
            found.append(int(entry.name))
    return found


def test_dry_run_quick_plans_every_workload_and_starts_nothing(tmp_path: Path) -> None:
    proc = bench("--quick", "--dry-run", "--dir", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    for wl in ("seq-write-1M", "seq-read-1M", "rand-write-4k-qd1", "rand-write-4k-qd16", "rand-read-4k-qd1"):
        assert f"workload {wl}:" in proc.stdout
    for cfg in ("native", "mirrorfs-wb", "qsd-fuse", "qsd-mirror"):
        assert f"configuration {cfg}:" in proc.stdout
    assert "--ioengine=libaio --iodepth=16" in proc.stdout
    assert "1 reps x 5 workloads x 4 configurations" in proc.stdout
    assert list(tmp_path.iterdir()) == []


def test_unknown_configuration_is_one_line_usage_error(tmp_path: Path) -> None:
    proc = bench("--configs", "native,bogus", "--dir", str(tmp_path))
    assert proc.returncode == 2
    assert "unknown configuration 'bogus'" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_tiny_run_measures_every_configuration_and_leaves_nothing(tmp_path: Path) -> None:
    out = tmp_path / "out.json"
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    proc = bench("--configs", "native,mirrorfs,mirrorfs-wb,qsd-fuse,qsd-mirror", "--workloads",
                 "rand-write-4k-qd1,seq-read-1M", "--reps", "1", "--runtime", "1", "--size", "16M",
                 "--ready-size", "32M", "--sparse-size", "512M", "--sparse-data", "8M",
                 "--dir", str(scratch), "--json", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    for wl, metric in (("rand-write-4k-qd1", "IOPS"), ("seq-read-1M", "MB/s")):
        assert res["fio"][wl]["metric"] == metric
        for cfg in ("native", "mirrorfs", "mirrorfs-wb", "qsd-fuse", "qsd-mirror"):
            assert res["fio"][wl]["median"][cfg] > 0, (wl, cfg)
    # The write-blocking job stayed ready under fio and its target equals the image afterwards.
    assert res["mirror_targets_identical"] == {"mirrorfs-wb": True}
    full = res["ready_full"]
    assert set(full["median"]) == {"cp", "qemu-img-convert", "qsd-mirror", "mirrorfs"}
    assert all(full["target_identical"].values()), full
    sparse = res["ready_sparse"]
    assert sparse["image_size"] == 512 << 20 and 8 << 20 <= sparse["image_allocated"] < 9 << 20
    assert sparse["target_identical"] == {"qsd-mirror": True, "mirrorfs": True}
    assert all(0 < rss < 1 << 30 for rss in res["peak_rss"].values())
    # The printed table carries the ratios to the QEMU references.
    assert "mirrorfs-wb / qsd-mirror" in proc.stdout and "| rand write 4k, QD1 |" in proc.stdout
    assert list(scratch.iterdir()) == [], proc.stderr[-3000:]
    assert mounts_under(tmp_path) == [] and processes_naming(scratch) == []


def test_ctrl_c_during_the_run_stops_everything(tmp_path: Path) -> None:
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    proc = subprocess.Popen([sys.executable, str(BENCH), "--configs", "mirrorfs-wb,qsd-mirror", "--workloads",
                             "rand-write-4k-qd1", "--reps", "3", "--runtime", "3", "--size", "16M", "--no-ready",
                             "--dir", str(scratch)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # Interrupt once both the mirrorfs mount and QEMU's front FUSE export are up and fio runs
        # (fio forks its job processes: they must go too).
        def fio_running() -> bool:
            for pid in processes_naming(scratch):
                try:
                    if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"fio\0"):
                        return True
                except OSError:
                    pass
            return False

        wait_for(lambda: (len(mounts_under(scratch)) >= 2 and fio_running()) or proc.poll() is not None, 90,
                 "the bench's mounts and fio")
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err[-3000:]
    assert "interrupted: cleaning up" in err
    assert mounts_under(scratch) == []
    wait_for(lambda: processes_naming(scratch) == [], 10, "the bench's daemons to be gone")
    assert list(scratch.iterdir()) == [], err[-3000:]
