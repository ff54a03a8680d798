"""Real mirrorfs mounts for tests: start the CLI, wait for the mount, always clean up.

Used through the ``mounted`` and ``mount_factory`` fixtures of ``conftest.py``; importable by any
test (``from mounting import Mount, mirrorfs_cli``).

Guarantees:
- ``start_mount`` runs the real ``mirrorfs mount`` (detached daemon) in a subprocess with a
  deadline; the CLI returns only once the mount serves requests, and the daemon's pid is read back
  from ``.mirrorfs/pid``.
- ``Mount.close`` (called from the fixtures' ``finally``) runs ``mirrorfs unmount``, then
  ``fusermount3 -u -z`` if the mount is still there, then SIGKILLs the daemon's pid (and only that
  pid) if it is still alive; it never raises before all three steps ran.
- Each mount logs to its own file; after the unmount, the file must not contain a traceback,
  ERROR/CRITICAL line or a handler BUG, unless the test declared it with ``allow_log(regex)``.
- Every mountpoint and pid is recorded in ``STARTED`` so the session-end check can prove that
  nothing was left behind.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import pytest

#: Every (mountpoint, pid) a test started, for the session-end leak check.
STARTED: list[tuple[Path, int | None]] = []

MOUNT_TIMEOUT = 30.0
UNMOUNT_TIMEOUT = 150.0


def mirrorfs_argv() -> list[str]:
    """The command that runs the CLI of the checkout under test."""
    return [sys.executable, "-m", "mirrorfs.cli"]


def mirrorfs_cli(*args: str | os.PathLike[str], check: bool = True, timeout: float = 120.0,
                 env: dict[str, str] | None = None, input: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``mirrorfs ARGS`` with text output captured.

    Raises:
        AssertionError: ``check`` and the exit code is not 0 (message includes stderr).
    """
    proc = subprocess.run([*mirrorfs_argv(), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env, input=input)
    if check and proc.returncode != 0:
        raise AssertionError(f"mirrorfs {' '.join(map(str, args))} exited {proc.returncode}:\n"
                             f"stdout: {proc.stdout}\nstderr: {proc.stderr}")
    return proc


#: Tests of the no-FUSE path point this at a missing device.
FUSE_DEVICE_ENV = "MIRRORFS_TEST_FUSE_DEVICE"


def fuse_available() -> tuple[bool, str]:
    """Whether real FUSE mounts can be made here, and why not."""
    device = os.environ.get(FUSE_DEVICE_ENV, "/dev/fuse")
    if not os.path.exists(device):
        return False, f"{device} is missing"
    if not os.access(device, os.R_OK | os.W_OK):
        return False, f"{device} is not accessible"
    if shutil.which("fusermount3") is None:
        return False, "fusermount3 is not installed"
    return True, ""


def is_mounted(path: Path) -> bool:
    """True if anything is mounted exactly at ``path`` (reads /proc, never stats the mount)."""
    from mirrorfs.daemon.mount import mount_fstype

    return mount_fstype(str(path)) is not None


def process_alive(pid: int) -> bool:
    from mirrorfs.daemon.unmount import process_gone

    return not process_gone(pid)


def stop_process(proc: subprocess.Popen, timeout: float) -> None:
    """SIGTERM ``proc`` (a child of the test), SIGKILL it after ``timeout`` s; reap it."""
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def wait_for(predicate: Callable[[], bool], timeout: float, what: str, interval: float = 0.02) -> None:
    """Poll ``predicate`` until true; fail with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


_BAD_LOG = re.compile(r"Traceback|\bBUG\b| ERROR: | CRITICAL: ")


@dataclass
class Mount:
    """A running mirrorfs mount started by a test."""

    source: Path
    mountpoint: Path
    log_file: Path
    extra_args: tuple[str, ...] = ()
    pid: int = 0
    allowed_log: list[re.Pattern[str]] = field(default_factory=list)
    _closed: bool = True

    @property
    def control(self) -> Path:
        """``MOUNTPOINT/.mirrorfs``."""
        return self.mountpoint / ".mirrorfs"

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["MIRRORFS_LOG_FILE"] = str(self.log_file)
        return env

    def cli(self, *args: str | os.PathLike[str], check: bool = True, timeout: float = 120.0,
            input: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run ``mirrorfs ARGS`` (text output); see ``mirrorfs_cli``."""
        return mirrorfs_cli(*args, check=check, timeout=timeout, env=self.env(), input=input)

    def allow_log(self, regex: str) -> None:
        """Declare that log lines matching ``regex`` are expected (checklogs escape hatch)."""
        self.allowed_log.append(re.compile(regex))

    def start(self) -> None:
        """Run ``mirrorfs mount`` and wait until the mount serves requests.

        Raises:
            AssertionError: the CLI failed, timed out, or the mount is not there afterwards.
        """
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        STARTED.append((self.mountpoint, None))
        self._closed = False
        try:
            proc = self.cli("mount", self.source, self.mountpoint, "--log-level", "info", *self.extra_args,
                            check=False, timeout=MOUNT_TIMEOUT)
        except subprocess.TimeoutExpired:
            # The detached daemon is ours but its pid was never reported: find it by its argv.
            strays = daemon_pids(self.mountpoint)
            if is_mounted(self.mountpoint):
                subprocess.run(["fusermount3", "-u", "-z", str(self.mountpoint)], capture_output=True)
            for pid in strays:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            raise AssertionError(f"mirrorfs mount did not return within {MOUNT_TIMEOUT:.0f} s "
                                 f"(killed {strays}); log:\n{self.read_log()}") from None
        if proc.returncode != 0:
            raise AssertionError(f"mirrorfs mount exited {proc.returncode}: {proc.stderr.strip()}\n"
                                 f"log:\n{self.read_log()}")
        assert is_mounted(self.mountpoint), "mount returned 0 but nothing is mounted"
        self.pid = int((self.control / "pid").read_text())
        STARTED.append((self.mountpoint, self.pid))

    def read_log(self) -> str:
        try:
            return self.log_file.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def bad_log_lines(self) -> list[str]:
        """Log lines that indicate a bug or an unexpected error."""
        return [line for line in self.read_log().splitlines()
                if _BAD_LOG.search(line) and not any(p.search(line) for p in self.allowed_log)]

    def close(self) -> list[str]:
        """Unmount, whatever state the mount is in; returns the problems met (empty = clean)."""
        if self._closed:
            return []
        self._closed = True
        problems: list[str] = []
        if is_mounted(self.mountpoint):
            try:
                proc = self.cli("unmount", self.mountpoint, check=False, timeout=UNMOUNT_TIMEOUT)
                if proc.returncode != 0:
                    problems.append(f"mirrorfs unmount exited {proc.returncode}: {proc.stderr.strip()}")
            except subprocess.TimeoutExpired:
                problems.append("mirrorfs unmount timed out")
        if is_mounted(self.mountpoint):
            problems.append("still mounted after mirrorfs unmount")
            subprocess.run(["fusermount3", "-u", "-z", str(self.mountpoint)], capture_output=True)
        if self.pid and process_alive(self.pid):
            problems.append(f"mount process {self.pid} still alive after unmount")
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            wait_for(lambda: not process_alive(self.pid), 10, f"pid {self.pid} to die")
        return problems

    def unmount(self) -> None:
        """Unmount now (checked); a later ``close`` does nothing."""
        problems = self.close()
        assert not problems, "; ".join(problems)

    def remount(self) -> None:
        """Unmount and mount again with the same arguments (pid changes)."""
        self.unmount()
        self.start()


def random_image(mount: Mount, name: str, size: int = 2 << 20) -> bytes:
    """Write ``size`` random bytes as ``name`` through the mount; returns them."""
    data = os.urandom(size)
    with open(mount.mountpoint / name, "wb") as f:
        f.write(data)
    return data


def start_mount(source: Path, mountpoint: Path, log_file: Path, extra_args: Iterable[str] = ()) -> Mount:
    """Mount ``source`` at ``mountpoint`` with the real CLI; the caller must ``close()`` it."""
    mount = Mount(source=source, mountpoint=mountpoint, log_file=log_file, extra_args=tuple(extra_args))
    try:
        mount.start()
    except BaseException:
        mount.close()
        raise
    return mount


def daemon_pids(mountpoint: Path) -> list[int]:
    """Live mirrorfs mount processes whose command line names ``mountpoint``."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            args = [a.decode(errors="replace") for a in (entry / "cmdline").read_bytes().split(b"\0")]
        except OSError:
            continue
        if any("mirrorfs" in a for a in args) and "mount" in args and str(mountpoint) in args \
                and process_alive(int(entry.name)):
            pids.append(int(entry.name))
    return pids


def leftovers(started: Iterable[tuple[Path, int | None]] = None) -> list[str]:  # type: ignore[assignment]
    """Mounts and processes started by the tests that are still there."""
    started = STARTED if started is None else started
    found = []
    for mountpoint, pid in started:
        if is_mounted(mountpoint):
            found.append(f"mount {mountpoint} still mounted")
        if pid is not None and process_alive(pid):
            found.append(f"mirrorfs process {pid} ({mountpoint}) still running")
    # A daemon whose pid we never learnt (the test failed during mount) still names its mountpoint.
    for mountpoint in {m for m, _ in started}:
        for pid in daemon_pids(mountpoint):
            found.append(f"mirrorfs process {pid} ({mountpoint}) still running")
    return found


@contextlib.contextmanager
def qsd_fuse_export(blockdev: str, mountpoint: Path, *, writable: bool = False) -> Iterator[None]:
    """qemu-storage-daemon exporting one block node as a FUSE file at ``mountpoint`` (an
    existing regular file): a source with injected latency or errors for the tests. Skips the
    test where the daemon cannot export FUSE; always stops its own daemon and unmounts."""
    export = f"type=fuse,id=e,node-name=n,mountpoint={mountpoint}" + (",writable=on" if writable else "")
    proc = subprocess.Popen(["qemu-storage-daemon", "--blockdev", blockdev, "--export", export],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: is_mounted(mountpoint) or proc.poll() is not None, 30,
                 "qemu-storage-daemon's FUSE export")
        if proc.poll() is not None:
            pytest.skip(f"qemu-storage-daemon cannot export FUSE here: {proc.stdout.read() if proc.stdout else ''}")
        yield
    finally:
        stop_process(proc, 10)
        if is_mounted(mountpoint):
            subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], capture_output=True)
