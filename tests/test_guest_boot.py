"""The QEMU test guest: boot, self-checking writer, verifiers (guest and host), markers.

(a) On a plain directory: the writer/verifier round trip for raw and qcow2, and the verifiers
    catch damage. (b) Issue 2, done-when 7: the guest boots from an image inside a mirrorfs
    mount with cache=none and cache=writeback, writes, powers off, and the SOURCE file holds
    what it wrote.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from guest import GuestError, RecordError
from guest.build import build
from guest.records import (RECORD_SIZE, assert_same_records, check_markers, make_record,
                           marker_bytes, marker_regions, verify_file)
from guest.vm import GuestVM, run_guest, verify_in_guest

pytestmark = [pytest.mark.guest, pytest.mark.timeout(300)]

DISK_SIZE = 64 << 20


@pytest.fixture(scope="session")
def guest_image():
    """The guest kernel and initramfs (downloaded and built once, then cached)."""
    return build()


def make_disk(path: Path, fmt: str, size: int = DISK_SIZE) -> Path:
    """An empty disk image of ``size`` bytes, created with qemu-img."""
    subprocess.run(["qemu-img", "create", "-q", "-f", fmt, str(path), str(size)], check=True)
    return path


def write_records(disk: Path, workdir: Path, image, *, fmt: str = "raw", cache: str = "none",
                  min_records: int = 300):
    """Boot the writer, let it write at least ``min_records``, stop it; return its report."""
    with GuestVM(disk, mode="writer", workdir=workdir, fmt=fmt, cache=cache, image=image) as vm:
        boot = vm.wait_ready(timeout=60)
        vm.wait_for_records(min_records, timeout=120)
        result = vm.stop_writer(timeout=60)
        assert result.run_id == vm.run_id and result.stopped_by == "stop"
    print(f"guest boot {boot:.2f}s ({vm.accel}); wrote {result.records} records "
          f"{fmt} cache={cache}")
    return result


# ---- (a) plain directory -------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_writer_then_verifiers_round_trip(tmp_path, guest_image, fmt):
    disk = make_disk(tmp_path / f"disk.{fmt}", fmt)
    result = write_records(disk, tmp_path / "writer", guest_image, fmt=fmt)
    assert result.first == 1 and result.last == result.records >= 300

    host = verify_file(disk, fmt=fmt)
    assert (host.first, host.last, host.run_id) == (1, result.last, result.run_id)
    if fmt == "raw":
        with open(disk, "rb") as f:
            f.seek((result.last - 1) * RECORD_SIZE)
            assert f.read(RECORD_SIZE) == make_record(result.run_id, result.last)

    guest = verify_in_guest(disk, workdir=tmp_path / "verify", fmt=fmt, image=guest_image)
    assert (guest.records, guest.first, guest.last, guest.run_id) == (
        result.last, 1, result.last, result.run_id)


def _fill(disk: Path, run_id: int, count: int) -> None:
    with open(disk, "r+b") as f:
        for seq in range(1, count + 1):
            f.write(make_record(run_id, seq))


@pytest.mark.parametrize("damage, reason", [
    ("flip", "bad-checksum"), ("hole", "data-after-end"), ("swap", "misplaced"),
    ("replay", "sequence-gap"), ("foreign", "run-id-mismatch"),
])
def test_host_verifier_catches_damage(tmp_path, damage, reason):
    disk = make_disk(tmp_path / "disk.raw", "raw", 4 << 20)
    _fill(disk, 7, 50)
    assert verify_file(disk).last == 50
    with open(disk, "r+b") as f:
        f.seek(20 * RECORD_SIZE)
        if damage == "flip":
            f.seek(20 * RECORD_SIZE + 2000)
            f.write(b"\xff")
        elif damage == "hole":
            f.write(bytes(RECORD_SIZE))
        elif damage == "swap":
            f.write(make_record(7, 22))            # seq 22 in slot 20: written elsewhere
        elif damage == "replay":
            f.write(make_record(7, 25, slot=20))   # right slot, wrong sequence number
        else:
            f.write(make_record(8, 21))            # another run's record
    with pytest.raises(RecordError, match=rf"slot 2[01]: {reason}"):
        verify_file(disk)
    other = tmp_path / "copy.raw"
    _fill(make_disk(other, "raw", 4 << 20), 7, 50)
    assert_same_records(disk, other, 20)
    with pytest.raises(RecordError, match=r"differ at slot 20 \(seq 21\)"):
        assert_same_records(disk, other, 50)


def test_guest_verifier_catches_damage(tmp_path, guest_image):
    disk = make_disk(tmp_path / "disk.raw", "raw", 4 << 20)
    _fill(disk, 9, 40)
    with open(disk, "r+b") as f:
        f.seek(30 * RECORD_SIZE + 100)
        f.write(b"torn")
    with pytest.raises(RecordError, match=r"VERIFY fail slot=30 records=30 reason=bad-checksum"):
        verify_in_guest(disk, workdir=tmp_path, image=guest_image)


def test_writer_stops_after_count_and_resumes(tmp_path, guest_image):
    disk = make_disk(tmp_path / "disk.raw", "raw", 8 << 20)
    console = run_guest(disk, "writer", workdir=tmp_path / "one", image=guest_image,
                        params={"count": 123, "run": 555})
    assert "WRITER stopped records=123 first=1 last=123 run=555 by=count" in console
    console = run_guest(disk, "writer", workdir=tmp_path / "two", image=guest_image,
                        params={"count": 77, "resume": 1, "sync": 1},
                        drive_opts="werror=report,rerror=report")
    assert "WRITER stopped records=77 first=124 last=200 run=555 by=count" in console
    run = verify_file(disk)
    assert (run.count, run.last, run.run_id) == (200, 200, 555)


def test_writer_on_full_disk_waits_for_stop(tmp_path, guest_image):
    disk = make_disk(tmp_path / "disk.raw", "raw", 1 << 20)
    with GuestVM(disk, mode="writer", workdir=tmp_path, image=guest_image,
                 params={"interval_us": 1000}) as vm:
        vm.wait_for_console(r"WRITER full last=256", timeout=90)
        assert vm.proc.poll() is None, "the writer must keep the guest up until told to stop"
        result = vm.stop_writer(timeout=60)
    assert (result.records, result.last, result.stopped_by) == (256, 256, "stop")
    assert verify_file(disk).last == 256


def test_write_marker_plain(tmp_path, guest_image):
    disk = make_disk(tmp_path / "disk.raw", "raw", 4 << 20)
    console = run_guest(disk, "write-marker", workdir=tmp_path, image=guest_image,
                        params={"token": "plain-1"})
    assert "MARKER ok token=plain-1 regions=4" in console
    check_markers(disk, "plain-1")
    with pytest.raises(RecordError):
        check_markers(disk, "plain-2")


def test_vm_rejects_bad_parameters_and_reports_early_exit(tmp_path, guest_image):
    with pytest.raises(GuestError, match="unknown guest mode"):
        GuestVM(tmp_path / "x", mode="bogus", workdir=tmp_path)
    with pytest.raises(GuestError, match="bad guest parameter"):
        GuestVM(tmp_path / "x", mode="writer", workdir=tmp_path, params={"token": "a b"})
    # A disk QEMU cannot open: the wait fails fast with QEMU's own message, not a timeout.
    t0 = time.monotonic()
    with GuestVM(tmp_path / "missing.raw", mode="verify", workdir=tmp_path,
                 image=guest_image) as vm:
        with pytest.raises(GuestError, match="(?s)QEMU exited.*missing.raw"):
            vm.wait_ready(timeout=60)
    assert time.monotonic() - t0 < 30


def test_marker_layout_is_what_the_guest_writes():
    # The host's expectation must not drift from guestrec.c's: pin the layout.
    regions = marker_regions(4 << 20)
    assert regions == [(0, 4096), (61440, 8192), (1 << 20, 128 << 10), ((4 << 20) - 4096, 4096)]
    block = marker_bytes("t", 512, 512)
    assert block.startswith(b"MFSMARK t 0000000000000200\n") and block.endswith(b"\x01")
    assert len(block) == 512


# ---- (b) issue 2, done-when 7: a guest on an image inside a mirrorfs mount ----------------

@pytest.mark.slow
@pytest.mark.parametrize("cache", ["none", "writeback"])
def test_guest_in_mount_writes_reach_source(tmp_path, guest_image, mounted, cache):
    # Created through the mount, as a user would; the guest then runs on the mounted path.
    make_disk(mounted.mountpoint / "vm.raw", "raw")
    make_disk(mounted.mountpoint / "marks.raw", "raw", 4 << 20)
    assert (mounted.source / "vm.raw").stat().st_size == DISK_SIZE

    result = write_records(mounted.mountpoint / "vm.raw", tmp_path / "writer", guest_image,
                           cache=cache)
    on_source = verify_file(mounted.source / "vm.raw")
    assert (on_source.first, on_source.last, on_source.run_id) == (1, result.last, result.run_id)

    console = run_guest(mounted.mountpoint / "marks.raw", "write-marker", workdir=tmp_path / "mark",
                        cache=cache, image=guest_image, params={"token": f"mount-{cache}"})
    assert f"MARKER ok token=mount-{cache}" in console
    check_markers(mounted.source / "marks.raw", f"mount-{cache}")


@pytest.mark.slow
def test_guest_in_mount_qcow2_round_trip(tmp_path, guest_image, mounted):
    # qcow2 through the mount: QEMU opens read-only first, then read-write (image locking).
    disk = make_disk(mounted.mountpoint / "vm.qcow2", "qcow2")
    result = write_records(disk, tmp_path / "writer", guest_image, fmt="qcow2", cache="none")
    on_source = verify_file(mounted.source / "vm.qcow2", fmt="qcow2")
    assert (on_source.last, on_source.run_id) == (result.last, result.run_id)
    guest = verify_in_guest(disk, workdir=tmp_path / "verify", fmt="qcow2", cache="none",
                            image=guest_image)
    assert (guest.records, guest.last, guest.run_id) == (result.last, result.last, result.run_id)
