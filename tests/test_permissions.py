"""Permissions and ownership: what the daemon creates, where it logs, whom ``unmount`` signals,
and the lock a job holds on its target.

- the daemon keeps the user's umask (never one that allows world-writable files): a bitmap is
  not world-writable; a target made with ``--create`` gets the source's mode and owner; files
  made through the mount still get exactly the mode their creator asked for;
- the log goes to ``/tmp/mirrorfs-UID`` only if that is a directory of ours (made 0700); a
  symlink or another user's directory of that name is not used, and the log file itself is
  never opened through a symlink;
- ``unmount`` signals only a mirrorfs daemon of the caller's user serving that mountpoint: a
  FUSE filesystem calling itself mirrorfs cannot make it kill another process;
- a target is locked while its job runs: a second mount's job or a QEMU holding the file is
  refused, and the lock is gone once the job ended.
"""

from __future__ import annotations

import json
import os
import pwd
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from mirrorfs.daemon import unmount as fsmount
from mounting import Mount, is_mounted, mirrorfs_cli, process_alive, wait_for

MiB = 1 << 20
NOBODY = pwd.getpwnam("nobody")


def jobs(mount: Mount) -> list[dict[str, Any]]:
    return json.loads(mount.cli("status", mount.mountpoint, "--json").stdout)


def umask_of(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(next(line.split()[1] for line in f if line.startswith("Umask:")), 8)


# ---------------------------------------------------------------------------- modes and owners

def test_the_daemon_makes_no_world_writable_files_and_targets_get_the_sources_mode_and_owner(
        mounted: Mount, tmp_path: Path) -> None:
    source = mounted.source / "a.raw"
    source.write_bytes(os.urandom(1 * MiB))
    os.chown(source, NOBODY.pw_uid, NOBODY.pw_gid)
    os.chmod(source, 0o640)
    target, bitmap = tmp_path / "t.raw", tmp_path / "t.bitmap"
    mounted.cli("mirror", mounted.mountpoint, "a.raw", target, "--create", "--bitmap", bitmap)
    st = target.stat()
    assert stat.S_IMODE(st.st_mode) == 0o640 and (st.st_uid, st.st_gid) == (NOBODY.pw_uid, NOBODY.pw_gid)
    assert not stat.S_IMODE(bitmap.stat().st_mode) & 0o002, oct(bitmap.stat().st_mode)
    assert umask_of(mounted.pid) & 0o002
    wait_for(lambda: jobs(mounted)[0]["ready"], 30, "ready")
    mounted.cli("cancel", mounted.mountpoint, "a.raw")


def test_files_made_through_the_mount_get_the_mode_their_creator_asked_for(mounted: Mount) -> None:
    script = ("import os, sys\nos.umask(0)\nd = sys.argv[1]\n"
              "os.close(os.open(d + '/f.raw', os.O_CREAT | os.O_WRONLY, 0o666))\n"
              "os.mkdir(d + '/sub', 0o777)\nos.umask(0o027)\n"
              "os.close(os.open(d + '/g.raw', os.O_CREAT | os.O_WRONLY, 0o666))\n")
    subprocess.run([sys.executable, "-c", script, str(mounted.mountpoint)], check=True, timeout=30)
    modes = {n: stat.S_IMODE((mounted.source / n).stat().st_mode) for n in ("f.raw", "sub", "g.raw")}
    assert modes == {"f.raw": 0o666, "sub": 0o777, "g.raw": 0o640}


# ---------------------------------------------------------------------------- the log directory

@pytest.fixture
def default_log_mount(tmp_path: Path) -> Iterator[Callable[[], Mount]]:
    """Mounts that log where ``mirrorfs mount`` decides (``TMPDIR=tmp_path/tmp``, no
    ``MIRRORFS_LOG_FILE``); unmounted at the end."""
    made: list[Mount] = []
    env = {k: v for k, v in os.environ.items() if k != "MIRRORFS_LOG_FILE"}
    env["TMPDIR"] = str(tmp_path / "tmp")
    (tmp_path / "tmp").mkdir()

    def make() -> Mount:
        (tmp_path / "source").mkdir(exist_ok=True)
        (tmp_path / "mnt").mkdir(exist_ok=True)
        mount = Mount(tmp_path / "source", tmp_path / "mnt", tmp_path / "unknown.log")
        mount.env = lambda: env  # type: ignore[method-assign]
        made.append(mount)
        mount.start()
        return mount

    try:
        yield make
    finally:
        problems = [p for m in made for p in m.close()]
        assert not problems, problems


def _logs(tmp_path: Path) -> list[Path]:
    return sorted((tmp_path / "tmp").glob("mirrorfs-*/mount-*.log"))


def _assert_private_log(log: Path) -> None:
    assert "mounted" in log.read_text()
    st, dst = log.lstat(), log.parent.lstat()
    assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == os.getuid()
    assert stat.S_ISDIR(dst.st_mode) and stat.S_IMODE(dst.st_mode) == 0o700 and dst.st_uid == os.getuid()


def test_a_symlink_in_place_of_the_log_directory_is_not_followed(
        default_log_mount: Callable[[], Mount], tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "tmp" / f"mirrorfs-{os.getuid()}").symlink_to(elsewhere)
    default_log_mount()
    assert list(elsewhere.iterdir()) == []
    logs = _logs(tmp_path)
    assert len(logs) == 1 and not logs[0].parent.is_symlink(), logs
    _assert_private_log(logs[0])


def test_another_users_log_directory_is_not_used(default_log_mount: Callable[[], Mount],
                                                 tmp_path: Path) -> None:
    theirs = tmp_path / "tmp" / f"mirrorfs-{os.getuid()}"
    theirs.mkdir(mode=0o777)
    os.chown(theirs, NOBODY.pw_uid, NOBODY.pw_gid)
    default_log_mount()
    assert list(theirs.iterdir()) == []
    logs = _logs(tmp_path)
    assert len(logs) == 1 and logs[0].parent != theirs, logs
    _assert_private_log(logs[0])


def test_our_log_directory_is_made_private_and_the_log_is_not_opened_through_a_symlink(
        default_log_mount: Callable[[], Mount], tmp_path: Path) -> None:
    ours = tmp_path / "tmp" / f"mirrorfs-{os.getuid()}"
    ours.mkdir()
    os.chmod(ours, 0o777)
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    name = "mount-" + str(tmp_path / "mnt").strip("/").replace("/", "_") + ".log"
    (ours / name).symlink_to(victim)
    (tmp_path / "source").mkdir()
    (tmp_path / "mnt").mkdir()
    env = {k: v for k, v in os.environ.items() if k != "MIRRORFS_LOG_FILE"}
    env["TMPDIR"] = str(tmp_path / "tmp")
    proc = mirrorfs_cli("mount", tmp_path / "source", tmp_path / "mnt", check=False, env=env, timeout=30)
    if proc.returncode == 0:  # mounted after all: unmount before failing
        mirrorfs_cli("unmount", tmp_path / "mnt", check=False, env=env)
    assert proc.returncode == 2 and "cannot open the log file" in proc.stderr, proc.stderr
    assert proc.stderr.count("\n") == 1
    assert victim.read_text() == "precious\n"
    assert stat.S_IMODE(ours.stat().st_mode) == 0o700
    # without the symlink the directory is used
    (ours / name).unlink()
    default_log_mount()
    assert _logs(tmp_path) == [ours / name]
    _assert_private_log(ours / name)


# ---------------------------------------------------------------------------- unmount

def test_names_mountpoint() -> None:
    py = ["/usr/bin/python3", "-m", "mirrorfs.cli", "mount"]
    assert fsmount.names_mountpoint([*py, "/s", "/m"], "/m")
    assert fsmount.names_mountpoint(["/usr/bin/python3", "/usr/bin/mirrorfs", "mount", "s", "x/m"], "/home/u/x/m")
    assert fsmount.names_mountpoint(["mirrorfs", "mount", "/s", "/m/", "--foreground"], "/m")
    assert not fsmount.names_mountpoint([*py, "/s", "/m2"], "/m")
    assert not fsmount.names_mountpoint(["/usr/bin/python3", "-m", "mirrorfs.cli", "unmount", "/m"], "/m")
    assert not fsmount.names_mountpoint(["sleep", "mount", "/m"], "/m")
    assert not fsmount.names_mountpoint(["mirrorfs", "mount", "/s", "x/m"], "/home/u/xx/m")


def _fake_proc(root: Path, pid: int, uid: int, argv: list[str], fuse: bool) -> None:
    base = root / str(pid)
    (base / "fd").mkdir(parents=True)
    (base / "status").write_text(f"Name:\tx\nUid:\t{uid}\t{uid}\t{uid}\t{uid}\n")
    (base / "cmdline").write_bytes(b"\0".join(a.encode() for a in argv) + b"\0")
    (base / "fd" / "3").symlink_to("/dev/fuse" if fuse else "/dev/null")


def test_daemon_refusal(tmp_path: Path) -> None:
    good = ["python3", "-m", "mirrorfs.cli", "mount", "/s", "/m"]
    _fake_proc(tmp_path, 10, 1000, good, True)
    _fake_proc(tmp_path, 11, 1001, good, True)
    _fake_proc(tmp_path, 12, 1000, ["sleep", "100"], True)
    _fake_proc(tmp_path, 13, 1000, good, False)
    assert fsmount.daemon_refusal(10, "/m", uid=1000, proc=str(tmp_path)) is None
    assert "does not belong to uid 1000" in fsmount.daemon_refusal(11, "/m", uid=1000, proc=str(tmp_path))
    assert "not a mirrorfs daemon for /m" in fsmount.daemon_refusal(12, "/m", uid=1000, proc=str(tmp_path))
    assert "not a mirrorfs daemon for /m2" in fsmount.daemon_refusal(10, "/m2", uid=1000, proc=str(tmp_path))
    assert "does not serve a FUSE mount" in fsmount.daemon_refusal(13, "/m", uid=1000, proc=str(tmp_path))
    assert "cannot be inspected" in fsmount.daemon_refusal(14, "/m", uid=1000, proc=str(tmp_path))


FAKE_MOUNT = """
import os, sys
from mirrorfs.fs.control_dir import VirtualFile
from mirrorfs.daemon.mount import MountService, run_service
source, mnt, sock, victim = sys.argv[1:5]
service = MountService(source, mnt, socket_path=sock)
service.operations.control_dir.register("pid", VirtualFile(lambda: f"{victim}\\n".encode()))
run_service(service, None)
"""


def test_unmount_signals_no_process_a_mount_merely_names(mount_factory: Callable[..., Mount],
                                                         tmp_path: Path) -> None:
    """A FUSE filesystem of subtype mirrorfs whose ``.mirrorfs/pid`` names a process that is not
    its daemon (an unrelated process; another mount's real daemon): ``unmount`` refuses and
    signals nobody."""
    other = mount_factory()
    victim = subprocess.Popen(["sleep", "300"])
    (tmp_path / "fsrc").mkdir()
    fake_mnt = tmp_path / "fmnt"
    fake_mnt.mkdir()
    fake = None
    try:
        for named in (victim.pid, other.pid):
            fake = subprocess.Popen([sys.executable, "-c", FAKE_MOUNT, str(tmp_path / "fsrc"),
                                     str(fake_mnt), str(tmp_path / "fake.qmp"), str(named)],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            wait_for(lambda: is_mounted(fake_mnt) and (fake_mnt / ".mirrorfs" / "pid").exists(),
                     30, "the fake mount")
            assert int((fake_mnt / ".mirrorfs" / "pid").read_text()) == named
            proc = mirrorfs_cli("unmount", fake_mnt, check=False, timeout=60)
            assert proc.returncode == 2 and "not signalling it" in proc.stderr, proc.stderr
            assert proc.stderr.count("\n") == 1
            time.sleep(0.5)
            assert victim.poll() is None and process_alive(other.pid)
            assert is_mounted(fake_mnt)
            fake.terminate()
            fake.wait(30)
            wait_for(lambda: not is_mounted(fake_mnt), 30, "the fake mount to go")
    finally:
        if fake is not None and fake.poll() is None:
            fake.kill()
            fake.wait()
        if is_mounted(fake_mnt):
            subprocess.run(["fusermount3", "-u", "-z", str(fake_mnt)], capture_output=True)
        victim.kill()
        victim.wait()
    assert (other.mountpoint / ".mirrorfs" / "pid").read_text().strip() == str(other.pid)


# ---------------------------------------------------------------------------- target lock

def _locked(path: Path) -> bool:
    st = path.stat()
    key = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    with open("/proc/locks") as f:
        return any(key in line for line in f)


def test_a_target_is_locked_while_its_job_runs(mount_factory: Callable[..., Mount], tmp_path: Path) -> None:
    one, two = mount_factory(), mount_factory()
    for mount in (one, two):
        (mount.source / "a.raw").write_bytes(os.urandom(4 * MiB))
    target = tmp_path / "t.raw"
    one.cli("mirror", one.mountpoint, "a.raw", target, "--create", "--speed", "64K", "--buf-size", "64K")
    proc = two.cli("mirror", two.mountpoint, "a.raw", target, check=False)
    assert proc.returncode == 2 and "is in use by another program" in proc.stderr, proc.stderr
    assert jobs(two) == []
    # QEMU cannot open it for writing meanwhile
    qio = subprocess.run(["qemu-io", "-f", "raw", "-c", "write 0 4k", str(target)],
                         capture_output=True, text=True, timeout=30)
    assert qio.returncode != 0 and "lock" in (qio.stdout + qio.stderr), qio
    one.cli("cancel", one.mountpoint, "a.raw", "--force")
    wait_for(lambda: jobs(one) == [], 30, "the job to end")
    assert not _locked(target)
    # a QEMU holding the file keeps a job off it
    holder = subprocess.Popen(["qemu-io", "-f", "raw", "-c", "sleep 60000", str(target)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: _locked(target), 30, "qemu-io to lock the target")
        proc = two.cli("mirror", two.mountpoint, "a.raw", target, check=False)
        assert proc.returncode == 2 and "is in use by another program" in proc.stderr, proc.stderr
    finally:
        holder.kill()
        holder.wait()
    two.cli("mirror", two.mountpoint, "a.raw", target)
    wait_for(lambda: jobs(two)[0]["ready"], 60, "ready")
    two.cli("complete", two.mountpoint, "a.raw", "--no-pivot")
    assert target.read_bytes() == (two.source / "a.raw").read_bytes()
    assert not _locked(target)
