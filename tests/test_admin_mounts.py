"""Mounting the way admins do: ``mount -t fuse.mirrorfs`` and an fstab line (through the
``mount.fuse.mirrorfs`` helper), and the example systemd unit's commands with readiness
notification, each against a real mount."""

from __future__ import annotations

import os
import shlex
import socket
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

from mirrorfs.daemon.mount import FSTYPE, mount_fstype
from mirrorfs.daemon import sdnotify
from mounting import STARTED, Mount, is_mounted, process_alive, wait_for

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
#: Where mount(8) looks for helpers (libmount's FS_SEARCH_PATH starts with /sbin).
HELPER_LINK = Path("/sbin/mount.fuse.mirrorfs")
UNIT = ROOT / "docs" / "mirrorfs@.service"


@pytest.fixture
def mount_helper() -> Iterator[Path]:
    """This checkout's ``mount.fuse.mirrorfs`` where mount(8) finds it, for the test's duration."""
    if os.geteuid() != 0:
        pytest.skip("mount -t and fstab mounts need root")
    helper = BIN / "mount.fuse.mirrorfs"
    assert helper.exists(), f"{helper} missing: pip install -e . installs it"
    if os.path.lexists(HELPER_LINK):
        pytest.skip(f"{HELPER_LINK} is installed on this machine; not replacing it")
    os.symlink(helper, HELPER_LINK)
    try:
        yield helper
    finally:
        os.unlink(HELPER_LINK)


def _mount_for_cleanup(source: Path, mnt: Path, log: Path) -> Mount:
    """A Mount record for a mount made another way, so ``close()`` can always clean it up."""
    mount = Mount(source=source, mountpoint=mnt, log_file=log)
    mount._closed = False
    STARTED.append((mnt, None))
    return mount


def _adopt(mount: Mount) -> None:
    mount.pid = int((mount.control / "pid").read_text())
    STARTED.append((mount.mountpoint, mount.pid))


def _super_options(mnt: Path) -> list[str]:
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            if left.split()[4] == str(mnt):
                return right.split()[2].split(",")
    return []


@pytest.mark.fuse
@pytest.mark.parametrize("form", ["fstab", "mount -t"])
def test_mount_t_fuse_mirrorfs_and_an_fstab_line(form: str, mount_helper: Path, tmp_path: Path) -> None:
    source, mnt = tmp_path / "images", tmp_path / "mnt"
    source.mkdir()
    mnt.mkdir()
    (source / "vm.raw").write_bytes(b"\0" * 65536)
    sock = tmp_path / "vm.qmp"
    log = tmp_path / "mount.log"
    options = f"allow_other,socket={sock},log_level=info,nofail,x-systemd.device-timeout=5,_netdev"
    env = {**os.environ, "MIRRORFS_LOG_FILE": str(log)}
    if form == "fstab":
        fstab = tmp_path / "fstab"
        fstab.write_text(f"# mirrorfs, as in docs/reference.md\n{source}  {mnt}  {FSTYPE}  {options}  0  0\n")
        command = ["mount", "-T", str(fstab), str(mnt)]
    else:
        command = ["mount", "-t", FSTYPE, str(source), str(mnt), "-o", options]
    mount = _mount_for_cleanup(source, mnt, log)
    try:
        r = subprocess.run(command, capture_output=True, text=True, timeout=60, env=env)
        assert r.returncode == 0, r.stderr
        assert mount_fstype(str(mnt)) == FSTYPE
        _adopt(mount)
        assert "allow_other" in _super_options(mnt)
        assert (mnt / ".mirrorfs" / "socket").read_text() == f"{sock}\n"  # the -o value arrived
        assert "mounted" in log.read_text()  # log_level=info arrived
        with open(mnt / "vm.raw", "r+b") as f:
            f.write(b"via fstab")
        assert (source / "vm.raw").read_bytes()[:9] == b"via fstab"

        r = subprocess.run(["umount", str(mnt)], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        assert not is_mounted(mnt)
        wait_for(lambda: not process_alive(mount.pid), 30, "the mount process to exit after umount")
    finally:
        problems = mount.close()
    assert not problems, problems
    assert not mount.bad_log_lines(), mount.read_log()


def test_the_helper_refuses_a_bad_option_in_one_line(mount_helper: Path, tmp_path: Path) -> None:
    (tmp_path / "mnt").mkdir()
    r = subprocess.run(["mount", "-t", FSTYPE, str(tmp_path), str(tmp_path / "mnt"), "-o", "bogus"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    assert "unknown mount option -o bogus" in r.stderr
    assert not is_mounted(tmp_path / "mnt")


def _unit_commands(source: Path, mnt: Path, sock: Path) -> dict[str, list[str]]:
    """The unit's Exec lines as the service would run them, with this checkout's mirrorfs."""
    text = UNIT.read_text()
    assert "Type=notify" in text.splitlines()
    commands = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep and key in ("ExecStartPre", "ExecStart", "ExecStop"):
            value = (value.replace("/usr/local/bin/mirrorfs", str(BIN / "mirrorfs"))
                     .replace("%f", str(mnt)).replace("${SOURCE_DIR}", str(source))
                     .replace("$MIRRORFS_OPTIONS", f"-o socket={sock}"))
            commands[key] = shlex.split(value)
    assert set(commands) == {"ExecStartPre", "ExecStart", "ExecStop"}
    return commands


@pytest.mark.fuse
def test_the_systemd_units_commands_with_readiness_notification(tmp_path: Path) -> None:
    source, mnt, sock = tmp_path / "images", tmp_path / "srv" / "vm", tmp_path / "vm.qmp"
    source.mkdir()
    (source / "disk.raw").write_bytes(os.urandom(1 << 20))
    commands = _unit_commands(source, mnt, sock)
    notify_path = tmp_path / "notify"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(notify_path))
    listener.settimeout(30)
    subprocess.run(commands["ExecStartPre"], check=True, timeout=30)
    assert mnt.is_dir()
    env = {**os.environ, "NOTIFY_SOCKET": str(notify_path)}
    log = tmp_path / "service.log"
    mount = _mount_for_cleanup(source, mnt, log)
    with open(log, "w") as out:
        service = subprocess.Popen(commands["ExecStart"], stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        assert listener.recv(4096) == b"READY=1"
        # Ready means ready: the mount answers at once, served by the service's own process.
        assert mount_fstype(str(mnt)) == FSTYPE
        _adopt(mount)
        assert mount.pid == service.pid
        assert (mnt / ".mirrorfs" / "socket").read_text() == f"{sock}\n"
        assert (mnt / "disk.raw").read_bytes() == (source / "disk.raw").read_bytes()

        r = subprocess.run(commands["ExecStop"], capture_output=True, text=True, timeout=150)
        assert r.returncode == 0, r.stderr
        assert service.wait(timeout=30) == 0  # the main process ended cleanly: systemd sees success
        assert not is_mounted(mnt)
    finally:
        listener.close()
        if service.poll() is None:
            service.kill()
            service.wait()
        problems = mount.close()
    assert not problems, problems
    assert not mount.bad_log_lines(), mount.read_log()


def test_sd_notify_addresses_and_absence(tmp_path: Path) -> None:
    assert sdnotify.ready_notifier({}) is None
    assert sdnotify.notify("READY=1", {}) is False
    name = f"@mirrorfs-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind("\0" + name[1:])  # an abstract socket, as systemd often passes
        listener.settimeout(5)
        ready = sdnotify.ready_notifier({"NOTIFY_SOCKET": name})
        assert ready is not None
        ready()
        assert listener.recv(64) == b"READY=1"
    # A socket that is gone is logged, not fatal.
    assert sdnotify.notify("READY=1", {"NOTIFY_SOCKET": str(tmp_path / "gone")}) is False
