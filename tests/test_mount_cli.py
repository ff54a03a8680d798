"""Done-when 6 (and signals): mount/unmount from the command line, errors as one line, exit 2."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest

from conftest import MountFactory
from mounting import STARTED, Mount, is_mounted, mirrorfs_argv, mirrorfs_cli, process_alive, wait_for


def assert_one_line_error(proc: subprocess.CompletedProcess[str], *words: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    for w in words:
        assert w in lines[0], lines[0]


def test_missing_source(tmp_path: Path) -> None:
    (tmp_path / "mnt").mkdir()
    proc = mirrorfs_cli("mount", tmp_path / "nope", tmp_path / "mnt", check=False)
    assert_one_line_error(proc, "source directory", "does not exist")
    assert not is_mounted(tmp_path / "mnt")


def test_missing_mountpoint(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    proc = mirrorfs_cli("mount", tmp_path / "src", tmp_path / "nope", check=False)
    assert_one_line_error(proc, "mountpoint", "does not exist")


def test_mountpoint_not_empty(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "mnt").mkdir()
    (tmp_path / "mnt" / "x").write_text("x")
    proc = mirrorfs_cli("mount", tmp_path / "src", tmp_path / "mnt", check=False)
    assert_one_line_error(proc, "not empty")
    assert not is_mounted(tmp_path / "mnt")


def test_mountpoint_inside_source(tmp_path: Path) -> None:
    (tmp_path / "src" / "mnt").mkdir(parents=True)
    proc = mirrorfs_cli("mount", tmp_path / "src", tmp_path / "src" / "mnt", check=False)
    assert_one_line_error(proc, "inside the source")


def test_busy_mountpoint(mounted: Mount, tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.mkdir()
    proc = mirrorfs_cli("mount", other, mounted.mountpoint, check=False)
    assert_one_line_error(proc, "busy")
    # The existing mount is untouched.
    assert int((mounted.control / "pid").read_text()) == mounted.pid


def test_unmount_of_a_non_mount(tmp_path: Path) -> None:
    proc = mirrorfs_cli("unmount", tmp_path, check=False)
    assert_one_line_error(proc, "not a mirrorfs mount")


def test_unmount_waits_for_the_daemon(mounted: Mount) -> None:
    pid = mounted.pid
    (mounted.mountpoint / "f").write_bytes(b"data")
    mounted.cli("unmount", mounted.mountpoint)
    assert not process_alive(pid)  # gone when unmount returned, not later
    assert not is_mounted(mounted.mountpoint)
    assert (mounted.source / "f").read_bytes() == b"data"
    assert "unmounted" in mounted.read_log()
    mounted.remount()
    assert (mounted.mountpoint / "f").read_bytes() == b"data"


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_unmounts_cleanly(mounted: Mount, signum: int) -> None:
    os.kill(mounted.pid, signum)
    wait_for(lambda: not process_alive(mounted.pid), 30, "the daemon to exit")
    assert not is_mounted(mounted.mountpoint)
    assert "unmounted" in mounted.read_log()


def test_foreground(tmp_path: Path) -> None:
    src, mnt = tmp_path / "src", tmp_path / "mnt"
    src.mkdir()
    mnt.mkdir()
    (src / "a").write_text("A")
    STARTED.append((mnt, None))
    proc = subprocess.Popen([*mirrorfs_argv(), "mount", "--foreground", str(src), str(mnt)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    STARTED.append((mnt, proc.pid))
    try:
        wait_for(lambda: is_mounted(mnt) or proc.poll() is not None, 30, "the mount")
        assert proc.poll() is None, proc.communicate()
        assert (mnt / "a").read_text() == "A"
        assert int((mnt / ".mirrorfs" / "pid").read_text()) == proc.pid
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        assert "Traceback" not in err
        assert not is_mounted(mnt)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if is_mounted(mnt):
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)])


def test_no_dev_fuse(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """No FUSE device: one line naming it, exit 2 (in-process: the device exists on this machine)."""
    from mirrorfs import cli
    from mirrorfs.daemon import mount as m

    (tmp_path / "src").mkdir()
    (tmp_path / "mnt").mkdir()
    monkeypatch.setattr(m, "FUSE_DEVICE", str(tmp_path / "fuse"))
    assert cli.main(["mount", str(tmp_path / "src"), str(tmp_path / "mnt")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{tmp_path / 'fuse'} is missing" in err
    assert not is_mounted(tmp_path / "mnt")


def test_checklogs_flags_tracebacks(tmp_path: Path) -> None:
    """The fixtures' log check can fail: tracebacks, ERROR lines and BUGs are reported."""
    log = tmp_path / "m.log"
    log.write_text("2026 1 mirrorfs.daemon.mount INFO: mounted\n"
                   "2026 1 mirrorfs.fs.operations ERROR: BUG in FUSE handler read; request answered with EIO\n"
                   "Traceback (most recent call last):\n"
                   "2026 1 mirrorfs.mirror ERROR: target lost (expected by this test)\n")
    mount = Mount(source=tmp_path, mountpoint=tmp_path, log_file=log)
    assert len(mount.bad_log_lines()) == 3
    mount.allow_log(r"expected by this test")
    assert len(mount.bad_log_lines()) == 2


@pytest.mark.parametrize("value", ["-1", "abc", "10000001"])
def test_bad_poll_max_ns_is_refused_and_mounts_nothing(tmp_path: Path, value: str) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "mnt").mkdir()
    proc = mirrorfs_cli("mount", tmp_path / "src", tmp_path / "mnt", "--poll-max-ns", value, check=False)
    assert_one_line_error(proc, "--poll-max-ns", repr(value))
    assert not is_mounted(tmp_path / "mnt")


@pytest.mark.parametrize("value", ["0", "1000000"])
def test_poll_max_ns_mounts_serve_data(mount_factory: MountFactory, value: str) -> None:
    """Polling off, and a long window: both serve writes and reads byte for byte."""
    mount = mount_factory(extra_args=("--poll-max-ns", value))
    data = os.urandom(1 << 20)
    (mount.mountpoint / "f").write_bytes(data)
    assert (mount.mountpoint / "f").read_bytes() == data
    assert (mount.source / "f").read_bytes() == data
