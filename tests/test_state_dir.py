"""The state directory (``state/``): job records (pure) and the directory that keeps them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mirrorfs.errors import StateDirError, UsageError
from mirrorfs.state import record as rec
from mirrorfs.state.directory import StateDir, image_checker, record_name
from mirrorfs.state.record import JobRecord

RECORD = JobRecord(job_id="vm.raw", image="vms/vm.raw", image_size=1 << 20,
                   target="nbd+unix:///vm?socket=/run/nbd.sock", bitmap="/state/job-vm.raw.bitmap",
                   journal="/state/job-vm.raw.journal", granularity=65536, copy_mode="background",
                   on_target_error="report", speed=0, journal_size=1 << 30,
                   created_at=1_796_000_000_123_456_789)


# -- the record (pure) -----------------------------------------------------------------------------
@given(st.from_regex(rec.JOB_ID_RE, fullmatch=True), st.integers(0, 1 << 62),
       st.integers(0, 1 << 62), st.booleans(), st.integers(0, 4_000_000_000_000_000_000))
def test_record_round_trip(job_id: str, size: int, speed: int, journal: bool, created: int) -> None:
    record = RECORD.replace(job_id=job_id, image_size=size, speed=speed, created_at=created,
                            journal="/j" if journal else None, journal_size=5 if journal else 0)
    assert rec.decode(rec.encode(record)) == record


def test_the_record_is_readable_json_with_a_version() -> None:
    doc = json.loads(rec.encode(RECORD))
    assert doc["version"] == 1
    assert doc["created-at"] == "2026-11-30T00:53:20.123456789Z"
    assert doc["copy-mode"] == "background" and doc["journal-size"] == 1 << 30


def _doc(**changes: object) -> bytes:
    doc = json.loads(rec.encode(RECORD))
    for key, value in changes.items():
        if value is None and key != "journal":
            doc.pop(key)
        else:
            doc[key] = value
    return json.dumps(doc).encode()


@pytest.mark.parametrize(("data", "message"), [
    (b"{not json", "not a JSON document"),
    (b"[1]", "not a JSON object"),
    (_doc(version=2), "has version 2; this mirrorfs reads version 1"),
    (_doc(version=None), "has version None"),
    (_doc(target=None), "field 'target' is missing"),
    (_doc(extra=1), "unknown field 'extra'"),
    (_doc(speed="fast"), "field 'speed' has the wrong type"),
    (_doc(speed=True), "field 'speed' has the wrong type"),
    (_doc(granularity=-1), "negative value"),
    (_doc(image="/etc/passwd"), "relative path"),
    (_doc(image="a/../b"), "relative path"),
    (_doc(bitmap="relative.bitmap"), "must be absolute"),
    (_doc(journal=None), "journal path exactly when"),
    (_doc(**{"job-id": "../x"}), "job id"),
    (_doc(**{"created-at": "yesterday"}), "not a UTC time"),
    (_doc(target="nbd://user:hunter2@host/x"), "credential"),
])
def test_a_bad_record_is_refused_in_one_line(data: bytes, message: str) -> None:
    with pytest.raises(StateDirError, match=message) as info:
        rec.decode(data, name="R")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("target", ["nbds://h/x?tls-certificates=/etc/pki", "/srv/replica.raw",
                                    "nbd://h:10809/x"])
def test_targets_without_secrets_are_kept(target: str) -> None:
    assert rec.decode(rec.encode(RECORD.replace(target=target))).target == target


@pytest.mark.parametrize("target", ["nbd://u:p@h/x", "nbds://h/x?password=1", "nbds://h/x?psk=ab"])
def test_a_record_never_stores_a_credential(target: str) -> None:
    with pytest.raises(UsageError, match="credential"):
        RECORD.replace(target=target)


# -- the directory ----------------------------------------------------------------------------------
def test_open_creates_a_private_directory_and_records_survive_a_reopen(tmp_path: Path) -> None:
    path = tmp_path / "state"
    old = os.umask(0)
    try:
        with StateDir.open(path) as state:
            state.save(RECORD)
            state.save(RECORD.replace(job_id="b", speed=5))
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o700
    assert (path / "job-vm.raw.json").stat().st_mode & 0o777 == 0o600
    with StateDir.open(path) as state:
        assert state.load_all() == ([RECORD.replace(job_id="b", speed=5), RECORD], [])
        assert state.bitmap_path("vm.raw") == str(path / "job-vm.raw.bitmap")
        assert state.journal_path("vm.raw") == str(path / "job-vm.raw.journal")


def test_save_replaces_atomically_and_remove_is_durable(tmp_path: Path) -> None:
    with StateDir.open(tmp_path / "s") as state:
        state.save(RECORD)
        state.save(RECORD.replace(speed=1 << 20))
        assert [r.speed for r in state.load_all()[0]] == [1 << 20]
        assert sorted(os.listdir(tmp_path / "s")) == ["job-vm.raw.json", "lock"]  # no temp left
        assert state.remove("vm.raw") is True
        assert state.remove("vm.raw") is False
        assert state.load_all() == ([], [])


def test_a_temp_file_left_by_a_crashed_save_is_dropped(tmp_path: Path) -> None:
    path = tmp_path / "s"
    with StateDir.open(path) as state:
        state.save(RECORD)
    (path / ".job-vm.raw.json.123.abcd.tmp").write_bytes(b"{half")
    (path / ".notes.tmp").write_bytes(b"not ours")
    with StateDir.open(path) as state:
        assert state.load_all() == ([RECORD], [])
    assert not (path / ".job-vm.raw.json.123.abcd.tmp").exists()
    assert (path / ".notes.tmp").read_bytes() == b"not ours"


def test_two_mounts_cannot_share_a_state_directory(tmp_path: Path) -> None:
    path = tmp_path / "s"
    with StateDir.open(path):
        with pytest.raises(StateDirError, match="in use by another mount"):
            StateDir.open(path)
        other = subprocess.run(
            [sys.executable, "-c", "import sys; from mirrorfs.state.directory import StateDir; "
                                   "StateDir.open(sys.argv[1])", str(path)],
            capture_output=True, text=True)
        assert other.returncode != 0 and "in use by another mount" in other.stderr
    StateDir.open(path).close()  # free again once closed


def test_an_unsafe_directory_is_refused_and_left_alone(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    link = tmp_path / "link"
    link.symlink_to(real)
    with pytest.raises(StateDirError, match="symbolic link"):
        StateDir.open(link)
    (tmp_path / "file").write_text("x")
    with pytest.raises(StateDirError, match="not a directory"):
        StateDir.open(tmp_path / "file")
    open_ = tmp_path / "open"
    open_.mkdir()
    open_.chmod(0o777)
    with pytest.raises(StateDirError, match="writable by others"):
        StateDir.open(open_)
    assert os.listdir(open_) == [] and os.listdir(real) == []
    with pytest.raises(StateDirError, match="cannot create"):
        StateDir.open(tmp_path / "missing" / "deeper")


def test_another_users_directory_is_refused(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to give a directory to another user")
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o700)
    os.chown(theirs, 65534, 65534)
    with pytest.raises(StateDirError, match="belongs to uid 65534"):
        StateDir.open(theirs)
    assert os.listdir(theirs) == []


def test_load_all_reports_each_bad_record_in_one_line_and_keeps_the_good(tmp_path: Path) -> None:
    path = tmp_path / "s"
    with StateDir.open(path) as state:
        state.save(RECORD)
        (path / "job-bad.json").write_bytes(b"{")
        (path / "job-new.json").write_bytes(_doc(version=7))
        (path / "job-other.json").write_bytes(rec.encode(RECORD.replace(job_id="x")))
        (path / "job-link.json").symlink_to(path / "job-vm.raw.json")
        (path / "notes.txt").write_text("not a record: ignored")
        good, errors = state.load_all()
    assert good == [RECORD]
    assert len(errors) == 4 and all("\n" not in e for e in errors)
    assert "job-bad.json: not a JSON document" in errors[0]
    assert "job-link.json cannot be read: a symbolic link" in errors[1]
    assert "job-new.json has version 7" in errors[2]
    assert "job-other.json holds job 'x'" in errors[3]


def test_the_image_check_finds_a_gone_or_resized_image(tmp_path: Path) -> None:
    source = tmp_path / "src"
    (source / "vms").mkdir(parents=True)
    (source / "vms" / "vm.raw").write_bytes(bytes(1 << 20))
    (source / "b.raw").write_bytes(bytes(4096))
    with StateDir.open(tmp_path / "s") as state:
        state.save(RECORD)
        state.save(RECORD.replace(job_id="b", image="b.raw"))
        state.save(RECORD.replace(job_id="gone", image="gone.raw"))
        good, errors = state.load_all(image_checker(source))
    assert good == [RECORD]
    assert errors == [
        f"persistent job b: image b.raw has 4096 bytes, but the job was recorded with {1 << 20}: "
        f"the replica cannot follow a resize; remove the record and start the job again with "
        f"--sync full",
        f"persistent job gone: image gone.raw is gone from {source} (No such file or directory): "
        f"restore it, or remove the job's record to drop the job",
    ]


def test_a_record_for_a_bad_job_id_is_never_written(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="job id"):
        record_name("../../etc/x")
    with StateDir.open(tmp_path / "s") as state:
        with pytest.raises(UsageError, match="job id"):
            state.bitmap_path(".hidden")
    assert sorted(os.listdir(tmp_path / "s")) == ["lock"]
