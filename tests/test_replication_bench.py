"""scripts/bench-nbd runs from a checkout and reports its figures: a smoke run, not a timed test.

Every row runs in a tiny configuration: the full copy and resync, the journal replay against the
bitmap resync (the journal really replayed, the bitmap job really had none), the writer's
latency with the journal active against a bare mount. It leaves no mount, server or file
behind, also when interrupted, and bad input changes nothing.
"""

import json
import re
import subprocess
from pathlib import Path

import pytest

from benchscripts import SCRIPTS, assert_nothing_left, interrupt, mounts_under, processes_naming, running
from conftest import requires_fuse


def bench_nbd(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(SCRIPTS / "bench-nbd"), *args], capture_output=True, text=True, timeout=300)


def positive(spread: dict) -> bool:
    return 0 < spread["min"] <= spread["median"] <= spread["max"] and len(spread["values"]) == 1


@requires_fuse
def test_bench_nbd_tiny_run_of_every_row_reports_ratios_and_identical_copies(tmp_path: Path) -> None:
    out, scratch = tmp_path / "out.json", tmp_path / "scratch"
    scratch.mkdir()
    proc = bench_nbd("--size", "16", "--reps", "1", "--replay-mib", "2", "--latency-ops", "40",
                     "--dir", str(scratch), "--json", str(out))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    text = proc.stdout
    assert re.search(r"ratio mirrorfs / qemu-img \(time\): \d+\.\d+", text), text
    assert re.search(r"^\s+\d+ MiB\s+[\d.]+s\s+[\d.]+s", text, re.M), text
    assert "Images are identical." in text, text
    assert re.search(r"4k journal / bitmap: replay rate / resync rate \d+\.\d+", text), text
    assert re.search(r"pwrite\+fdatasync journaling: p50 \d+ .* x bare: p50 \d+\.\d+", text), text

    res = json.loads(out.read_text())
    assert res["complete"] is True and res["params"]["rows"] == ["copy", "replay", "latency"]
    assert res["machine"]["cores"] >= 1 and len(res["machine"]["load_before"]) == 3
    assert res["copy"]["identical"] is True and res["copy"]["full_copy"]["ratio"] > 0
    for bs, block in (("4k", 4096), ("64k", 65536)):
        row = res["replay"][bs]
        journal, bitmap = row["runs"]["journal"][0], row["runs"]["bitmap"][0]
        writes = (2 << 20) // block
        assert journal["written_bytes"] == bitmap["written_bytes"] == 2 << 20
        # Every write of the outage came back from the journal (plus the one that noticed the
        # loss, and the flush records); the job without a journal replayed nothing and copied instead.
        assert writes + 1 <= journal["replayed_records"] <= writes + 8, journal
        assert bitmap["replayed_records"] == 0 and bitmap["copied_bytes"] >= 2 << 20, bitmap
        assert journal["replay"] > 0 and journal["replay_rate"] > 0 and bitmap["replay_rate"] is None
        for fig in (row["journal"]["catch_up_rate"], row["bitmap"]["catch_up_rate"], row["ratio_catch_up"],
                    row["ratio_replay"], row["journal"]["replay_rate"]):
            assert positive(fig), (bs, fig)
    for kind in ("write", "sync"):
        lat = res["latency"][kind]
        assert set(lat) == {"bare", "ready", "journaling"}
        for cfg, fig in lat.items():
            assert positive(fig["p50"]) and fig["p50"]["median"] <= fig["p99"]["median"], (kind, cfg)
            assert ("p50_ratio" in fig) == (cfg != "bare")
            if cfg != "bare":
                assert positive(fig["p50_ratio"]) and positive(fig["p99_ratio"]), (kind, cfg)
    assert res["targets_identical"] == {"journal": True, "bitmap": True}
    assert_nothing_left(scratch)


@requires_fuse
@pytest.mark.parametrize("rows, servers", [("copy", 1), ("replay", 2)])
def test_bench_nbd_ctrl_c_stops_the_mount_and_the_servers(tmp_path: Path, rows: str, servers: int) -> None:
    def qemu_nbds() -> int:
        return sum(1 for pid in processes_naming(tmp_path)
                   if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"qemu-nbd\0"))

    interrupt("bench-nbd", ["--rows", rows, "--size", "64", "--reps", "50", "--dir", str(tmp_path)],
              lambda: len(mounts_under(tmp_path)) == 1 and running("qemu-nbd", tmp_path)
              and qemu_nbds() >= servers)
    assert_nothing_left(tmp_path)


@pytest.mark.parametrize("args, message", [
    (["--rows", "copy,bogus"], "--rows: unknown row 'bogus'"),
    (["--size", "16", "--replay-mib", "9"], "--replay-mib must be from 1 to half of --size (8)"),
    (["--latency-ops", "3"], "--latency-ops must be at least 10"),
    (["--dir", "/nonexistent/bench"], "--dir /nonexistent/bench: not a directory"),
])
def test_bench_nbd_bad_input_is_one_line_usage_error(tmp_path: Path, args: list[str], message: str) -> None:
    proc = bench_nbd(*args, *([] if "--dir" in args else ["--dir", str(tmp_path)]))
    assert proc.returncode == 2
    assert message in proc.stderr.splitlines()[-1]
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    assert list(tmp_path.iterdir()) == []
