"""The demo's record tools, without a mount: ``guest.pivotcheck`` accepts the disks of a pivot
under a writer and rejects every way they can be wrong; ``guest.hostwriter`` writes the guest's
records in order through qemu-io and stops when told."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO

import pytest

from guest import RecordError
from guest.pivotcheck import check_pivot, main
from guest.records import RECORD_SIZE, make_record, verify_file

REPO = Path(__file__).resolve().parent.parent
SLOTS = 64
RUN = 4242


def disk(path: Path, seqs: list[int], run: int = RUN) -> Path:
    """A raw image of ``SLOTS`` slots holding the records ``seqs`` (each in its own slot)."""
    with open(path, "wb") as f:
        f.truncate(SLOTS * RECORD_SIZE)
        for seq in seqs:
            f.seek((seq - 1) * RECORD_SIZE)
            f.write(make_record(run, seq))
    return path


def pair(tmp_path: Path, on_source: list[int], on_target: list[int]) -> tuple[Path, Path]:
    return disk(tmp_path / "source.raw", on_source), disk(tmp_path / "target.raw", on_target)


def records(n: int) -> list[int]:
    return list(range(1, n + 1))


def test_accepts_a_prefix_on_the_source_and_everything_on_the_target(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source, target = pair(tmp_path, records(20), records(50))
    check = check_pivot(source, target, last=50, run_id=RUN, within=(15, 25))
    assert (check.switch, check.after, check.target.last) == (20, 30, 50)
    assert main([str(source), str(target), "--last", "50", "--run", str(RUN),
                 "--within", "20", "20", "--mount", str(target)]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "  before the switch: records 1..20 on both disks, byte for byte identical",
        "  after the switch:  records 21..50 (30) on the target only",
        "  source:            records 1..20, an unbroken prefix (none missing), then zeroes",
        "  target:            records 1..50, unbroken, then zeroes",
        "  verification:      ok",
    ]


@pytest.mark.parametrize("on_source, on_target, kwargs, error", [
    (records(20), records(50), {"last": 51}, r"target.raw: holds records 1\.\.50 of run 4242,"
                                             r" the writer wrote 1\.\.51"),
    (records(20), records(49) + [51], {}, r"target.raw: .*data-after-end"),
    (records(20) + [22], records(50), {}, r"source.raw: .*data-after-end"),
    (records(10) + records(20)[11:], records(50), {}, r"source.raw: .*slot 10"),
    ([], records(50), {}, r"source.raw: holds 0 records"),
    (records(50), records(50), {}, r"source.raw: holds all 50 records"),
    (records(20), records(50), {"within": (21, 30)}, r"after record 20, outside .* 21\.\.30"),
    (records(20), records(50), {"run_id": RUN + 1}, r"target.raw: .* of run 4242, the writer"
                                                    r" wrote 1\.\.50 of run 4243"),
], ids=["target-short", "target-gap", "source-past-switch", "source-hole", "source-empty",
        "no-switch", "outside-window", "other-run"])
def test_rejects(tmp_path: Path, on_source: list[int], on_target: list[int],
                 kwargs: dict[str, object], error: str) -> None:
    source, target = pair(tmp_path, on_source, on_target)
    args: dict[str, object] = {"last": 50, "run_id": RUN, **kwargs}
    with pytest.raises(RecordError, match=error):
        check_pivot(source, target, **args)  # type: ignore[arg-type]


def test_rejects_a_source_of_another_run(tmp_path: Path) -> None:
    source = disk(tmp_path / "source.raw", records(20), run=RUN + 1)
    target = disk(tmp_path / "target.raw", records(50))
    with pytest.raises(RecordError, match=r"holds 20 records of run 4243, expected a prefix"):
        check_pivot(source, target, last=50, run_id=RUN)


def test_cli_failure_says_why_and_exits_1(tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    source, target = pair(tmp_path, records(20), records(50))
    assert main([str(source), str(target), "--last", "50", "--run", str(RUN),
                 "--mount", str(source)]) == 1
    out = capsys.readouterr()
    assert out.out == ""
    assert out.err.strip() == f"verification:      FAILED: {source}: does not read as the target"


def run_hostwriter(image: Path, stop: Path, *extra: str,
                   log: IO[str] | None = None) -> subprocess.CompletedProcess[str]:
    """``python -m guest.hostwriter``; its output goes to ``log``, else into the result."""
    return subprocess.run([sys.executable, "-m", "guest.hostwriter", str(image), "--stop",
                           str(stop), *extra], stdout=log or subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=60,
                          env={"PYTHONPATH": str(REPO / "tests"), "PATH": "/usr/bin:/bin"})


def test_hostwriter_writes_the_guests_records_in_order_until_told_to_stop(
        tmp_path: Path) -> None:
    image, stop = tmp_path / "vm.raw", tmp_path / "stop"
    with open(image, "wb") as f:
        f.truncate(4 << 20)
    log = tmp_path / "log"

    def stop_after_progress() -> None:
        deadline = time.monotonic() + 30
        while "WRITER progress" not in (log.read_text() if log.exists() else ""):
            if time.monotonic() > deadline:
                break
            time.sleep(0.05)
        stop.touch()

    threading.Thread(target=stop_after_progress, daemon=True).start()
    with open(log, "w") as out:
        proc = run_hostwriter(image, stop, "--run", "99", "--cache", "writeback", log=out)
    lines = log.read_text().splitlines()
    assert proc.returncode == 0, lines
    assert lines[0] == "WRITER started run=99 first=1 slots=1024"
    last = int(lines[-1].split("last=")[1].split()[0])
    assert lines[-1] == f"WRITER stopped records={last} first=1 last={last} run=99 by=stop"
    on_disk = verify_file(image)
    assert (on_disk.first, on_disk.last, on_disk.run_id) == (1, last, 99)


def test_hostwriter_reports_a_failing_qemu_io(tmp_path: Path) -> None:
    image = tmp_path / "not-an-image"
    image.mkdir()
    proc = run_hostwriter(image, tmp_path / "stop", "--cache", "writeback")
    assert proc.returncode == 2, proc.stdout
    assert proc.stdout.splitlines()[-1] == (f"WRITER error qemu-io: qemu-io: can't open device"
                                            f" {image}: Could not open '{image}': Is a directory")
