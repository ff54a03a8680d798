"""Daemons a benchmark starts and must stop: ``mirrorfs mount`` and ``qemu-storage-daemon``.

Both stop on every path: a mount interrupted while it was coming up is found by its command
line and told to exit; a FUSE export left behind by a dead daemon is lazily unmounted.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from benchlib.procs import BenchError, mounted, pid_alive, run, wait_for
from benchlib.venv import VENV


def qsd_blockdev_args(image: Path, *, locking: bool = True) -> list[str]:
    """``image`` as node ``fmt0`` (raw over file), opened with O_DIRECT as QEMU's cache=none does."""
    return ["--blockdev", f"driver=file,node-name=file0,filename={image},cache.direct=on"
            + ("" if locking else ",locking=off"),
            "--blockdev", "driver=raw,node-name=fmt0,file=file0"]


@dataclass
class Daemon:
    """A qemu-storage-daemon (own session, so Ctrl-C reaches only the script)."""

    name: str
    argv: list[str]
    log_file: Path
    fuse_mount: Path | None = None
    proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> None:
        with open(self.log_file, "ab") as logf:
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf,
                                         start_new_session=True)

    def check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise BenchError(f"{self.name} exited {self.proc.returncode}: "
                             f"{self.log_file.read_text(errors='replace')[-1500:]}")

    def wait_exported(self, timeout: float = 30) -> None:
        """Wait until the FUSE export is mounted; fail at once if the daemon died."""
        assert self.fuse_mount is not None
        mnt = self.fuse_mount
        wait_for(lambda: (self.check_alive(), mounted(mnt))[1], timeout, f"{self.name} FUSE export")

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=15)
        if self.fuse_mount is not None and mounted(self.fuse_mount):
            subprocess.run(["fusermount3", "-u", "-z", str(self.fuse_mount)], capture_output=True)


@dataclass
class MirrorfsMount:
    """A ``mirrorfs mount`` (detached daemon) of ``source`` at ``mountpoint``."""

    name: str
    source: Path
    mountpoint: Path
    log_file: Path
    extra_env: dict[str, str] = field(default_factory=dict)
    mount_args: list[str] = field(default_factory=list)
    pid: int = 0
    started: bool = False

    def env(self) -> dict[str, str]:
        return {**os.environ, **self.extra_env, "MIRRORFS_LOG_FILE": str(self.log_file)}

    def cli(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        return run([str(VENV / "bin" / "mirrorfs"), *args], timeout=timeout, env=self.env())

    def start(self) -> None:
        self.source.mkdir(parents=True, exist_ok=True)
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        self.started = True
        try:
            self.cli("mount", str(self.source), str(self.mountpoint), "--log-level", "warning",
                     *self.mount_args, timeout=60)
        finally:
            with contextlib.suppress(OSError, ValueError):
                self.pid = int((self.mountpoint / ".mirrorfs" / "pid").read_text())

    def qmp_socket(self) -> Path:
        return Path((self.mountpoint / ".mirrorfs" / "socket").read_text().strip())

    def jobs(self) -> list[dict[str, object]]:
        return json.loads(self.cli("status", str(self.mountpoint), "--json").stdout)

    def mirror(self, image: str, target: str, *extra: str, copy_mode: str = "write-blocking",
               job_id: str | None = None, timeout: float = 600) -> None:
        """Start a mirror with the CLI and poll ``mirrorfs status --json`` until it is ready
        (``job_id``: for a second job of ``image``, which cannot take the default id, the image)."""
        self.cli("mirror", str(self.mountpoint), image, target, "--copy-mode", copy_mode,
                 *(["--job-id", job_id] if job_id else []), *extra)
        self.wait_ready(job_id or image, timeout)

    def wait_ready(self, job_id: str, timeout: float = 600) -> None:
        """Wait until the job ``job_id`` (by default its image's name) is ready."""
        def ready() -> bool:
            job = next(j for j in self.jobs() if j["device"] == job_id)
            if job.get("status") in ("concluded", "null") or job.get("io-status") != "ok":
                raise BenchError(f"mirror job {job_id} stopped: {job}")
            return bool(job.get("ready"))

        wait_for(ready, timeout, f"mirror job {job_id} on {self.name} to be ready", interval=0.05)

    def complete(self, job_id: str, timeout: float = 120) -> None:
        """Complete the job ``job_id`` (or the only job of an image so named) without a pivot and
        wait until it is gone."""
        self.cli("complete", str(self.mountpoint), job_id, "--no-pivot")
        wait_for(lambda: all(j["device"] != job_id for j in self.jobs()), timeout,
                 f"{self.name} job {job_id} to end", interval=0.1)

    def daemon_pids(self) -> list[int]:
        """Live ``mirrorfs mount`` processes naming our mountpoint (for a mount cut short)."""
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                args = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
            except OSError:
                continue
            if "mount" in args and str(self.mountpoint) in args and any("mirrorfs" in a for a in args) \
                    and pid_alive(int(entry.name)):
                pids.append(int(entry.name))
        return pids

    def stop(self) -> None:
        if not self.started:
            return
        self.started = False
        if not self.pid:
            # Interrupted while mounting: the detached daemon may still be coming up. SIGTERM
            # makes it unmount and exit (its signal watcher runs before the mount).
            for pid in self.daemon_pids():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
                with contextlib.suppress(BenchError):
                    wait_for(lambda: not pid_alive(pid), 30, f"mirrorfs daemon {pid} to exit")
        if mounted(self.mountpoint):
            with contextlib.suppress(BenchError, subprocess.TimeoutExpired):
                self.cli("unmount", str(self.mountpoint), timeout=120)
        if mounted(self.mountpoint):
            subprocess.run(["fusermount3", "-u", "-z", str(self.mountpoint)], capture_output=True)
        if self.pid and pid_alive(self.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
            with contextlib.suppress(BenchError):
                wait_for(lambda: not pid_alive(self.pid), 10, f"pid {self.pid} to exit")
