"""Persistent jobs (``mount --state-dir``, ``mirror --persistent``) and offline NBD servers.

- Restart during an outage: a persistent job to a real qemu-nbd server; the server goes away,
  writes land through the mount, mirrorfs is SIGKILLed and mounted again with the same state
  directory, more writes land, the server comes back: the job is ready on its own, with no
  command re-issued, and after ``complete --no-pivot`` the export equals the image.
- A clean unmount and remount re-attaches the job; ``cancel`` removes its record (the next mount
  has no job); a record whose image changed size or is gone refuses the mount (exit 2, one line
  per record, nothing mounted); ``--persistent`` without a state directory is refused.
- A server away at ``mirror`` time: the job starts with ``target-connected`` false, tracks the
  writes, and is ready once the server appears. A server of the wrong size is refused up front,
  and one that appears later with the wrong size fails the job with that reason.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any, Callable

import pytest

from compare import assert_identical
from mirrorfs.errors import SourceError, StateDirError
from mirrorfs.mirror.job import MirrorJob
from mirrorfs.state.directory import StateDir
from mounting import Mount, is_mounted, mirrorfs_argv, process_alive, wait_for
from nbdservers import qemu_nbd
from test_mirror_engine import engine, random_content
from test_mirror_mount import job, jobs, qemu_io, read_at, wait_job, wait_ready
from test_replication_support import NBD_TIMEOUT, make_blank, make_image

MiB = 1 << 20
SIZE = 8 * MiB

MountFactory = Callable[..., Mount]


def persistent_mount(mount_factory: MountFactory, tmp_path: Path, *,
                     fstab: bool = False) -> tuple[Mount, Path]:
    """A mount with the state directory ``tmp_path/state``; returns it and the directory."""
    state = tmp_path / "state"
    args = ["-o", f"state_dir={state}"] if fstab else ["--state-dir", str(state)]
    mount = mount_factory(extra_args=args)
    mount.allow_log(r"WARNING")  # an unreachable target is a warning, by design
    return mount, state


def image_and_export(mount: Mount, tmp_path: Path, size: int = SIZE) -> tuple[Path, Path]:
    """``vm.raw`` of random bytes in the mount's source, and a blank file to export as target."""
    source = mount.source / "vm.raw"
    make_image(source, size)
    served = tmp_path / "served.raw"
    make_blank(served, size)
    return source, served


def assert_no_job_after_a_remount(mount: Mount) -> None:
    mount.unmount()
    mount.start()
    assert jobs(mount) == []


def refused_mount(mount: Mount) -> str:
    """``mirrorfs mount`` with the mount's arguments must fail with exit 2 and mount nothing;
    returns its stderr."""
    mount.allow_log(r"ERROR: ")  # the refusal, as the daemon logs it
    proc = mount.cli("mount", mount.source, mount.mountpoint, *mount.extra_args, check=False,
                     timeout=60)
    if proc.returncode == 0:
        mount.cli("unmount", mount.mountpoint, check=False)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert not is_mounted(mount.mountpoint)
    return proc.stderr


def sigkill_and_remount(mount: Mount) -> None:
    pid = mount.pid
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not process_alive(pid), 10, "the killed daemon to exit")
    problems = mount.close()  # the dead mount: lazy unmount, nothing left behind
    assert not any("still alive" in p for p in problems), problems
    mount.start()


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_restart_during_an_outage_catches_up_on_its_own(mount_factory: MountFactory,
                                                       tmp_path: Path) -> None:
    mount, state = persistent_mount(mount_factory, tmp_path)
    source, served = image_and_export(mount, tmp_path)
    image = mount.mountpoint / "vm.raw"
    with qemu_nbd(served) as server:
        mount.cli("mirror", mount.mountpoint, "vm.raw", server.uri, "--persistent")
        assert json.loads((state / "job-vm.raw.json").read_text())["target"] == server.uri
        assert (state / "job-vm.raw.bitmap").is_file()  # the bitmap's default place
        wait_ready(mount, "vm.raw")
        server.kill()
        qemu_io(image, "write -P 0x5a 1M 300k", "flush")
        sigkill_and_remount(mount)
        entry = job(mount, "vm.raw")  # re-attached before the mount answered
        assert entry is not None and entry["__org.mirrorfs_target-connected"] is False, entry
        assert entry["dirty-bytes"] >= 300 * 1024 and entry["ready"] is False, entry
        qemu_io(image, "write -P 0xa5 5M 123k", "flush")
        server.start()  # the same export on the same socket: nothing re-issued
        ready = wait_ready(mount, "vm.raw", timeout=90)
        assert ready["__org.mirrorfs_target-connected"] is True, ready
        mount.cli("complete", mount.mountpoint, "vm.raw", "--no-pivot")
        assert_identical(source, served)
    assert read_at(served, 1 * MiB, 300 * 1024) == b"\x5a" * 300 * 1024
    assert read_at(served, 5 * MiB, 123 * 1024) == b"\xa5" * 123 * 1024
    assert not (state / "job-vm.raw.json").exists()  # complete ended the persistent job
    assert_no_job_after_a_remount(mount)


def test_a_clean_remount_reattaches_and_cancel_removes_the_record(mount_factory: MountFactory,
                                                                  tmp_path: Path) -> None:
    mount, state = persistent_mount(mount_factory, tmp_path, fstab=True)
    source = mount.source / "disk.raw"
    make_image(source, 4 * MiB)
    target = tmp_path / "copy.raw"
    mount.cli("mirror", mount.mountpoint, "disk.raw", target, "--create", "--persistent",
              "--job-id", "disk", "--speed", "8M")
    assert sorted(os.listdir(state)) == ["job-disk.bitmap", "job-disk.journal", "job-disk.json",
                                         "lock"]
    assert (state.stat().st_mode & 0o777) == 0o700
    mount.unmount()
    mount.start()
    entry = job(mount, "disk")
    assert entry is not None and entry["__org.mirrorfs_image"] == "disk.raw", entry
    assert entry["speed"] == 8 * MiB, entry  # the recorded parameters
    qemu_io(mount.mountpoint / "disk.raw", "write -P 0x44 3M 64k")
    wait_ready(mount, "disk")
    mount.cli("cancel", mount.mountpoint, "disk")  # after ready: leaves an exact copy
    assert sorted(os.listdir(state)) == ["job-disk.bitmap", "lock"]
    assert read_at(target, 3 * MiB, 64 * 1024) == b"\x44" * 64 * 1024
    assert_no_job_after_a_remount(mount)


def test_a_record_that_does_not_match_its_image_refuses_the_mount(mount_factory: MountFactory,
                                                                  tmp_path: Path) -> None:
    mount, state = persistent_mount(mount_factory, tmp_path)
    for name in ("a.raw", "b.raw"):
        make_image(mount.source / name, 1 * MiB)
        mount.cli("mirror", mount.mountpoint, name, tmp_path / f"{name}.copy", "--create",
                  "--persistent", "--job-id", name[0])
    mount.unmount()
    records = sorted(os.listdir(state))
    os.truncate(mount.source / "a.raw", 2 * MiB)
    os.rename(mount.source / "b.raw", tmp_path / "b.raw")
    err = refused_mount(mount)
    lines = err.strip().splitlines()
    assert any(f"image a.raw has {2 * MiB} bytes, but the job was recorded with {MiB}" in line
               for line in lines), err
    assert any("persistent job b: image b.raw is gone" in line for line in lines), err
    assert sorted(os.listdir(state)) == records  # nothing changed
    # The way out the message names: without the records the mount starts, with no job.
    for name in ("job-a.json", "job-b.json"):
        (state / name).unlink()
    mount.start()
    assert jobs(mount) == []


def test_a_record_whose_bitmap_is_gone_refuses_the_mount(mount_factory: MountFactory,
                                                         tmp_path: Path) -> None:
    mount, state = persistent_mount(mount_factory, tmp_path)
    make_image(mount.source / "a.raw", 1 * MiB)
    mount.cli("mirror", mount.mountpoint, "a.raw", tmp_path / "copy.raw", "--create",
              "--persistent")
    mount.unmount()
    bitmap = state / "job-a.raw.bitmap"
    bitmap.rename(tmp_path / "saved.bitmap")
    err = refused_mount(mount)
    assert "persistent job a.raw (image a.raw):" in err and "does not exist" in err, err
    assert err.count("\n") <= 1, err
    assert not bitmap.exists() and (state / "job-a.raw.json").exists()
    # Written behind the mount's back while unmounted: the bitmap cannot vouch for the image.
    (tmp_path / "saved.bitmap").rename(bitmap)
    qemu_io(mount.source / "a.raw", "write -P 0x33 100k 64k")
    err = refused_mount(mount)
    assert "changed after its job was stopped by an unmount" in err, err
    mount.allow_log(r"changed after its job was stopped")


def test_persistent_without_a_state_dir_is_refused(mounted: Mount, tmp_path: Path) -> None:
    make_image(mounted.source / "a.raw", 1 * MiB)
    target = tmp_path / "copy.raw"
    proc = mounted.cli("mirror", mounted.mountpoint, "a.raw", target, "--create", "--persistent",
                       check=False)
    assert proc.returncode == 2, proc.stderr
    assert "this mount has none: mount with --state-dir DIR" in proc.stderr
    assert proc.stderr.count("\n") == 1
    assert not target.exists() and jobs(mounted) == []
    # A job id that cannot name a record file (nor be typed in a control-file line) is refused
    # before anything is sent.
    make_image(mounted.source / "dir.raw", 1 * MiB)
    proc = mounted.cli("mirror", mounted.mountpoint, "a.raw", target, "--create", "--persistent",
                       "--job-id", "../x", check=False)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr == ("mirrorfs mirror: job id '../x' may hold only letters, digits and _.+- "
                           "(not first: . + -), up to 128\n")


@pytest.mark.timeout(120)
def test_a_server_away_at_mirror_time_starts_the_job_offline(mount_factory: MountFactory,
                                                             tmp_path: Path) -> None:
    mount = mount_factory()
    mount.allow_log(r"WARNING")
    source, served = image_and_export(mount, tmp_path)
    with qemu_nbd(served) as server:
        server.kill()  # away (no socket) when the job starts
        mount.cli("mirror", mount.mountpoint, "vm.raw", server.uri, "--sync", "full")
        entry = job(mount, "vm.raw")
        assert entry is not None and entry["__org.mirrorfs_target-connected"] is False, entry
        assert entry["status"] == "running" and entry["offset"] == 0, entry  # the copy waits
        status = mount.cli("status", mount.mountpoint).stdout
        assert "running (target away)" in status, status
        lag = re.compile(r"\b\d+\.\ds\b")  # the LAG column moves with the clock
        assert lag.sub("", (mount.control / "status").read_text()) == lag.sub("", status)
        qemu_io(mount.mountpoint / "vm.raw", "write -P 0x77 2M 64k")
        server.start()
        entry = wait_ready(mount, "vm.raw", timeout=60)
        assert entry["__org.mirrorfs_target-connected"] is True
        assert entry["__org.mirrorfs_reconnects"] == 1, entry
        mount.cli("complete", mount.mountpoint, "vm.raw", "--no-pivot")
        assert_identical(source, served)


def test_a_server_of_the_wrong_size_is_refused_up_front_or_fails_the_job(
        mount_factory: MountFactory, tmp_path: Path) -> None:
    mount = mount_factory()
    mount.allow_log(r"WARNING")
    make_image(mount.source / "vm.raw", SIZE)
    wrong = tmp_path / "wrong.raw"
    make_blank(wrong, SIZE + MiB)
    with qemu_nbd(wrong) as server:
        proc = mount.cli("mirror", mount.mountpoint, "vm.raw", server.uri, check=False)
        assert proc.returncode == 2, proc.stderr
        assert f"is {SIZE + MiB} bytes, but {SIZE} bytes are needed" in proc.stderr
        assert jobs(mount) == []
        # Away at the start, the wrong size once it answers: the job fails with the reason.
        server.kill()
        mount.cli("mirror", mount.mountpoint, "vm.raw", server.uri)
        server.start()
        entry = wait_job(mount, "vm.raw", lambda j: j["status"] == "concluded", "the job to fail")
        assert "bytes are needed" in entry["error"], entry
    assert os.path.getsize(wrong) == SIZE + MiB


def test_persistent_through_the_control_file_and_qmp(mount_factory: MountFactory,
                                                     tmp_path: Path) -> None:
    mount, state = persistent_mount(mount_factory, tmp_path)
    for name in ("c.raw", "q.raw"):
        make_image(mount.source / name, 1 * MiB)
    (mount.control / "control").write_text(
        f"mirror c.raw {tmp_path / 'c.copy'} mode=absolute-paths persistent=true\n")
    out = mount.cli("qmp", mount.mountpoint, json.dumps({
        "execute": "drive-mirror", "arguments": {
            "device": "q.raw", "target": str(tmp_path / "q.copy"), "mode": "absolute-paths",
            "sync": "full", "persistent": True}}), check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    assert sorted(p.name for p in state.glob("*.json")) == ["job-c.raw.json", "job-q.raw.json"]
    records: dict[str, Any] = {p.name: json.loads(p.read_text()) for p in state.glob("*.json")}
    assert records["job-q.raw.json"]["bitmap"] == str(state / "job-q.raw.bitmap")
    assert records["job-c.raw.json"]["image-size"] == MiB


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_no_write_lands_before_the_jobs_are_attached(mount_factory: MountFactory,
                                                     tmp_path: Path) -> None:
    """A server that accepts but never answers makes the re-attach take the NBD timeout; a
    write through the mount in that window waits for its job, so the job records it."""
    mount, state = persistent_mount(mount_factory, tmp_path)
    source, served = image_and_export(mount, tmp_path)
    with qemu_nbd(served) as server:
        mount.cli("mirror", mount.mountpoint, "vm.raw", server.uri, "--persistent")
        wait_ready(mount, "vm.raw")
        mount.unmount()
        server.kill()
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as mute:
            mute.bind(str(server.addr))
            mute.listen(8)  # connects, never speaks NBD: the handshake times out
            mount._closed = False  # the fixture's teardown unmounts whatever happens below
            started = time.monotonic()
            proc = subprocess.Popen([*mirrorfs_argv(), "mount", mount.source, mount.mountpoint,
                                     *mount.extra_args], env=mount.env(), text=True,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            try:
                wait_for(lambda: is_mounted(mount.mountpoint), 20, "the kernel mount")
                fd = os.open(mount.mountpoint / "vm.raw", os.O_WRONLY)
                try:
                    os.pwrite(fd, b"\x6b" * 65536, 3 * MiB)
                finally:
                    os.close(fd)
                waited = time.monotonic() - started
                out, err = proc.communicate(timeout=60)
            finally:
                if proc.poll() is None:
                    proc.kill()
            assert proc.returncode == 0, err
        mount.pid = int((mount.control / "pid").read_text())
        assert waited > NBD_TIMEOUT / 2, f"the write returned after {waited:.1f} s"
        entry = job(mount, "vm.raw")
        assert entry is not None and entry["dirty-bytes"] >= 65536, entry
        os.unlink(server.addr)
        server.start()
        wait_ready(mount, "vm.raw", timeout=60)
        mount.cli("complete", mount.mountpoint, "vm.raw", "--no-pivot")
        assert_identical(source, served)
    assert read_at(served, 3 * MiB, 65536) == b"\x6b" * 65536


# -- the engine alone (no mount) --------------------------------------------------------------------
async def test_a_record_that_cannot_be_saved_undoes_the_start(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    with StateDir.open(tmp_path / "state") as state:
        async with engine(tmp_path, random_content(MiB), state=state) as env:
            def full(self: StateDir, record: Any) -> None:
                raise StateDirError(f"cannot save the record of job {record.job_id} in "
                                    f"{self.path}: No space left on device")

            monkeypatch.setattr(StateDir, "save", full)
            target = tmp_path / "created.img"
            with pytest.raises(StateDirError, match="No space left on device"):
                await env.mirror(target, persistent=True)
            assert env.manager.query() == [] and env.node.job is None
            assert not target.exists()  # created by the start, removed by its undo
            assert sorted(os.listdir(state.path)) == ["lock"]  # no bitmap, no record
            monkeypatch.undo()
            job = await env.mirror(target, persistent=True)
            assert job.params.bitmap == state.bitmap_path("img")
            assert [r.job_id for r in state.load_all()[0]] == ["img"]
            await env.wait_event("BLOCK_JOB_READY")
            await env.manager.complete(["img"], pivot=False)
            assert state.load_all() == ([], [])
            assert_identical(env.source, target)


async def test_a_failed_start_removes_the_record_it_saved(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    with StateDir.open(tmp_path / "state") as state:
        async with engine(tmp_path, random_content(MiB), state=state) as env:
            async def unreadable_image(self: MirrorJob, **kwargs: Any) -> None:
                raise SourceError("cannot read image 'img': Input/output error", errno=5)

            monkeypatch.setattr(MirrorJob, "run", unreadable_image)
            with pytest.raises(SourceError, match="cannot read image"):
                await env.mirror(tmp_path / "t.img", persistent=True)
            assert state.load_all() == ([], []) and env.manager.query() == []


@pytest.mark.parametrize("where,expect", [
    ("src/state", "is inside the source directory"),
    ("src/a.raw", "is inside the source directory"),
    ("mnt", "is inside the mountpoint"),
    ("mnt/state", "is inside the mountpoint"),
])
def test_a_state_dir_inside_the_source_or_the_mountpoint_is_refused(tmp_path: Path, where: str,
                                                                    expect: str) -> None:
    """Records and bitmaps there would show up as images of the mount (or hide under it)."""
    src, mnt = tmp_path / "src", tmp_path / "mnt"
    src.mkdir()
    mnt.mkdir()
    make_image(src / "a.raw", 1 * MiB)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    image = (src / "a.raw").read_bytes()
    from mounting import mirrorfs_cli
    proc = mirrorfs_cli("mount", src, mnt, "--state-dir", tmp_path / where, check=False)
    if is_mounted(mnt):  # never expected; leave nothing behind if it happens
        mirrorfs_cli("unmount", mnt, check=False)
    assert proc.returncode == 2, proc.stderr
    assert expect in proc.stderr and "choose a directory outside both" in proc.stderr
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert not is_mounted(mnt)
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # nothing created
    assert (src / "a.raw").read_bytes() == image
