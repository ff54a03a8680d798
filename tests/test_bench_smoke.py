"""scripts/bench cannot rot: its plan, a tiny real run (content of its JSON), bad input, Ctrl-C.

Not timed tests: the figures are only checked to exist and be positive; what is asserted is that
every configuration really ran, in both places (tmpfs and the disk), with the daemons' CPU time
per request and the machine recorded, that the mirrors' targets equal their images, and that
nothing the script started (mounts, qemu-storage-daemon, mirrorfs processes, scratch files)
survives it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchscripts import SCRIPTS, assert_nothing_left, interrupt, mounts_under, running

BENCH = SCRIPTS / "bench"

pytestmark = pytest.mark.fuse


def bench(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(BENCH), *args], capture_output=True, text=True, timeout=timeout)


def test_dry_run_quick_plans_every_workload_and_both_places_and_starts_nothing(tmp_path: Path) -> None:
    proc = bench("--quick", "--dry-run", "--dir", str(tmp_path), "--disk-dir", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    for wl in ("seq-write-1M", "seq-read-1M", "rand-write-4k-qd1", "rand-write-4k-qd16", "rand-read-4k-qd1"):
        assert f"workload {wl}:" in proc.stdout
    for cfg in ("native", "mirrorfs-wb", "qsd-fuse", "qsd-mirror"):
        assert f"configuration {cfg} (tmpfs):" in proc.stdout
    for cfg in ("mirrorfs", "mirrorfs-wb", "qsd-fuse"):
        assert f"configuration {cfg} (disk):" in proc.stdout
    assert "--direct=1" in proc.stdout and "--ioengine=libaio --iodepth=16" in proc.stdout
    assert "fio runs (tmpfs): 1 reps x 5 workloads x 4 configurations" in proc.stdout
    assert "fio runs (disk): 1 reps x 5 workloads x 3 configurations" in proc.stdout
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args, message", [
    (["--configs", "native,bogus"], "unknown configuration 'bogus'"),
    (["--disk-configs", "mirrorfs,bogus"], "unknown configuration 'bogus'"),
    (["--disk-dir", "/dev/shm"], "--disk-dir /dev/shm is on tmpfs, not a disk"),
    (["--disk-dir", "/nonexistent/bench"], "--disk-dir /nonexistent/bench: not a directory"),
    (["--runtime", "1e999"], "--runtime inf must be seconds from 0.001 to 3600"),
    (["--runtime", "nan"], "--runtime nan must be seconds from 0.001 to 3600"),
    (["--runtime", "-1"], "--runtime -1.0 must be seconds from 0.001 to 3600"),
    (["--runtime", "0"], "--runtime 0.0 must be seconds from 0.001 to 3600"),
    (["--reps", "0"], "--reps must be at least 1"),
])
def test_bad_input_is_one_line_usage_error(tmp_path: Path, args: list[str], message: str) -> None:
    proc = bench(*args, "--dir", str(tmp_path))
    assert proc.returncode == 2
    assert message in proc.stderr.splitlines()[-1]
    assert "Traceback" not in proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_tiny_run_measures_every_configuration_and_leaves_nothing(tmp_path: Path) -> None:
    out = tmp_path / "out.json"
    scratch, disk = tmp_path / "scratch", tmp_path / "disk"
    scratch.mkdir()
    disk.mkdir()
    proc = bench("--configs", "native,mirrorfs,mirrorfs-wb,qsd-fuse,qsd-mirror",
                 "--disk-configs", "native,mirrorfs,mirrorfs-wb,qsd-fuse", "--workloads",
                 "rand-write-4k-qd1,seq-read-1M", "--reps", "1", "--runtime", "0.3", "--size", "16M",
                 "--disk-size", "16M", "--ready-size", "32M", "--sparse-size", "512M", "--sparse-data", "8M",
                 "--dir", str(scratch), "--disk-dir", str(disk), "--json", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    machine = res["machine"]
    assert machine["cores"] >= 1 and machine["kernel"] and machine["memory_bytes"] > 0
    assert len(machine["load_before"]) == 3 and machine["cpu_model"] and machine["date"]
    # (Here --dir is not tmpfs either: the report names each place's real file system.)
    places = res["places"]
    assert places["tmpfs"]["dir"] == str(scratch) and places["disk"]["dir"] == str(disk)
    assert places["disk"]["fstype"] not in ("tmpfs", "ramfs")
    for key, cfgs in (("fio", ("native", "mirrorfs", "mirrorfs-wb", "qsd-fuse", "qsd-mirror")),
                      ("fio_disk", ("native", "mirrorfs", "mirrorfs-wb", "qsd-fuse"))):
        for wl, metric in (("rand-write-4k-qd1", "IOPS"), ("seq-read-1M", "MB/s")):
            r = res[key][wl]
            assert r["metric"] == metric
            for cfg in cfgs:
                assert r["median"][cfg] > 0, (key, wl, cfg)
                # The daemons' CPU time per request; none for the file itself.
                cpu = r["cpu_us_per_request"][cfg]
                assert (cpu is None) if cfg == "native" else (0 <= cpu < 100_000), (key, wl, cfg, cpu)
    # QEMU opens the disk image with O_DIRECT: none of it is in the page cache after the runs.
    cache = res["fio_disk_page_cache"]
    assert set(cache) == {"native", "mirrorfs", "mirrorfs-wb", "qsd-fuse"} and cache["qsd-fuse"]["image"] == 0
    assert "target" in cache["mirrorfs-wb"]
    # The write-blocking jobs stayed ready under fio and their targets equal the images afterwards.
    assert res["mirror_targets_identical"] == {"tmpfs": {"mirrorfs-wb": True}, "disk": {"mirrorfs-wb": True}}
    full = res["ready_full"]
    assert set(full["median"]) == {"cp", "qemu-img-convert", "qsd-mirror", "mirrorfs"}
    assert all(full["target_identical"].values()), full
    sparse = res["ready_sparse"]
    assert sparse["image_size"] == 512 << 20 and 8 << 20 <= sparse["image_allocated"] < 9 << 20
    assert sparse["target_identical"] == {"qsd-mirror": True, "mirrorfs": True, "mirrorfs-cli": True}
    assert 0 < sparse["cli_startup"] < 30
    assert all(0 < rss < 1 << 30 for rss in res["peak_rss"].values())
    # The printed report: the machine, both places, the ratios with the CPU time beside them.
    text = proc.stdout
    assert text.startswith("Machine: ") and f"Linux {machine['kernel']}" in text
    for place in places.values():
        assert f"on {place['fstype']} ({place['dir']})" in text
    assert "mirrorfs-wb / qsd-mirror" in text and "| rand write 4k, QD1 |" in text
    assert "mirrorfs-wb / mirrorfs" in text and "In the page cache after these runs: " in text
    assert "The mirrorfs command's start-up" in text
    assert_nothing_left(scratch, disk)


def test_ctrl_c_during_the_run_stops_everything(tmp_path: Path) -> None:
    scratch, disk = tmp_path / "scratch", tmp_path / "disk"
    scratch.mkdir()
    disk.mkdir()
    # Interrupt once the mirrorfs mounts and QEMU's FUSE exports are up in both places and fio
    # runs (fio forks its job processes: they must go too).
    interrupt("bench", ["--configs", "mirrorfs-wb,qsd-mirror", "--disk-configs", "mirrorfs-wb,qsd-fuse",
                        "--workloads", "rand-write-4k-qd1", "--reps", "3", "--runtime", "3", "--size", "16M",
                        "--disk-size", "16M", "--no-ready", "--dir", str(scratch), "--disk-dir", str(disk)],
              lambda: len(mounts_under(scratch)) >= 2 and len(mounts_under(disk)) >= 2 and running("fio", scratch))
    assert_nothing_left(scratch, disk)


def test_two_jobs_on_one_image_ratios_and_both_targets(tmp_path: Path) -> None:
    """Two ready jobs on one image, each to its own target: measured beside one job and the bare
    mount, both targets equal to the image after fio wrote to it. The disk rows have no bare
    mount: only the ratio to one job is given there."""
    out = tmp_path / "out.json"
    scratch, disk = tmp_path / "scratch", tmp_path / "disk"
    scratch.mkdir()
    disk.mkdir()
    proc = bench("--configs", "mirrorfs,mirrorfs-wb,mirrorfs-wb2,mirrorfs-bg,mirrorfs-bg2",
                 "--disk-configs", "mirrorfs-wb,mirrorfs-wb2", "--workloads", "rand-write-4k-qd1,seq-write-1M",
                 "--reps", "1", "--runtime", "0.3", "--size", "16M", "--disk-size", "16M", "--no-ready",
                 "--dir", str(scratch), "--disk-dir", str(disk), "--json", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    two = res["two_jobs"]
    assert set(two["tmpfs"]) == {"mirrorfs-wb2", "mirrorfs-bg2"} and set(two["disk"]) == {"mirrorfs-wb2"}
    expected = {("tmpfs", "mirrorfs-wb2"): ("mirrorfs-wb", "mirrorfs"),
                ("tmpfs", "mirrorfs-bg2"): ("mirrorfs-bg", "mirrorfs"),
                ("disk", "mirrorfs-wb2"): ("mirrorfs-wb", None)}
    text = proc.stdout
    for (key, cfg), (one_job, bare) in expected.items():
        t = two[key][cfg]
        assert (t["one_job"], t["bare"]) == (one_job, bare), t
        # Every write fio made reached both targets.
        assert t["targets_identical"] == {"img.raw": True, "second": True}, t
        assert res["mirror_targets_identical"][key][cfg] is True
        median = res["fio" if key == "tmpfs" else "fio_disk"]
        for wl in ("rand-write-4k-qd1", "seq-write-1M"):
            ratios, m = t["ratios"][wl], median[wl]["median"]
            assert ratios["to_one_job"] == pytest.approx(m[cfg] / m[one_job]) and ratios["to_one_job"] > 0
            assert ratios["to_bare"] == (pytest.approx(m[cfg] / m[bare]) if bare else None)
        assert f"Two jobs on one image, {key} {cfg}: targets identical to the image: " \
               "job img.raw True, job second True" in text
    assert set(res["fio_disk_page_cache"]["mirrorfs-wb2"]) == {"image", "target", "target2"}
    # The printed table: per place, two jobs against one job and against the bare mount.
    tmpfs_part, disk_part = text.split(f"on {res['places']['disk']['fstype']} ({disk})")
    heading = "| two jobs on one image: ratio to one job of the same copy mode and to the bare mount"
    assert heading in tmpfs_part and heading in disk_part
    tmpfs_table = tmpfs_part[tmpfs_part.index(heading):].split("\n\n")[0]
    assert tmpfs_table.splitlines()[0].endswith(
        "| mirrorfs-wb2 / mirrorfs-wb | mirrorfs-wb2 / mirrorfs | mirrorfs-bg2 / mirrorfs-bg | "
        "mirrorfs-bg2 / mirrorfs |")
    row = next(line for line in tmpfs_table.splitlines() if line.startswith("| rand write 4k, QD1 |"))
    r = two["tmpfs"]["mirrorfs-wb2"]["ratios"]["rand-write-4k-qd1"]
    assert row.startswith(f"| rand write 4k, QD1 | {r['to_one_job']:.2f}x (") and f"| {r['to_bare']:.2f}x (" in row
    disk_table = disk_part[disk_part.index(heading):].split("\n\n")[0]
    assert disk_table.splitlines()[0].endswith("| mirrorfs-wb2 / mirrorfs-wb |")
    # The one-job ratio table keeps its columns: the two-job rows are only in their own.
    assert "| mirrorfs-wb / mirrorfs | mirrorfs-bg / mirrorfs |" in tmpfs_part
    assert "mirrorfs-wb2 / mirrorfs-wb |" not in tmpfs_part.split(heading)[0]
    assert_nothing_left(scratch, disk)
