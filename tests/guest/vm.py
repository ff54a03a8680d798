"""Run the test guest under an unmodified ``qemu-system-x86_64``.

:class:`GuestVM` is a context manager: it boots the guest on one disk (``-drive
file=...,if=virtio,format=...,cache=...,aio=...``), with the serial console going to a file,
a virtio-serial control port (``mirrorfs.ctl``) on a UNIX socket, a QMP socket, and
``-no-reboot`` so QEMU exits when the guest powers off. Whatever happens, leaving the ``with``
block kills the QEMU it started (and only that one).

Acceleration: this machine has ``/dev/kvm`` but no VMX/SVM, and a stock kernel hangs under KVM
there, so KVM is used only when ``/proc/cpuinfo`` shows ``vmx`` or ``svm`` and ``/dev/kvm`` is
usable; otherwise TCG. ``MIRRORFS_GUEST_ACCEL=kvm|tcg`` overrides the detection.

Speed here (TCG, 2 shared cores): about 2 s from start to ``MIRRORFS-GUEST ready``; the
writer does about 4000 records/s (16 MB/s) on a local file with ``cache=none`` and about 6000
with ``cache=writeback``, so a 64 MiB disk fills in seconds: size the disk, or slow the writer
with ``params={"interval_us": N}``. A full disk is not an error: the writer prints ``WRITER
full`` and waits for ``stop``.

Example::

    with GuestVM(disk, mode="writer", workdir=tmp_path, cache="none") as vm:
        vm.wait_for_records(100, timeout=60)
        result = vm.stop_writer(timeout=60)
    verify_file(disk).last == result.last
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from . import GuestError, RecordError
from .build import GuestImage, build

QEMU = "qemu-system-x86_64"
MODES = ("writer", "verify", "write-marker", "shell")
_PARAM_RE = re.compile(r"^[A-Za-z0-9_.:/+-]+$")


def detect_accel() -> str:
    """``kvm`` when hardware virtualisation is really available, else ``tcg``."""
    forced = os.environ.get("MIRRORFS_GUEST_ACCEL")
    if forced:
        return forced
    try:
        flags = set()
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags.update(line.split(":", 1)[1].split())
                    break
    except OSError:
        return "tcg"
    if ({"vmx", "svm"} & flags) and os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "kvm"
    return "tcg"


@dataclass(frozen=True)
class WriterResult:
    """What the guest writer reported when it stopped."""

    records: int
    first: int
    last: int
    run_id: int
    stopped_by: str


@dataclass(frozen=True)
class VerifyResult:
    """The guest verifier's ``VERIFY ok`` line."""

    records: int
    first: int
    last: int
    run_id: int


class GuestVM:
    """One QEMU process running the test guest on one disk.

    Args:
        disk: the disk image (its path may be inside a mirrorfs mount).
        mode: ``writer``, ``verify``, ``write-marker`` or ``shell`` (see ``guestrec.c``).
        workdir: where the console log and QEMU's own output are kept.
        fmt: the image format QEMU is told (``raw``, ``qcow2``).
        cache: QEMU's ``cache=`` (``none`` opens with O_DIRECT, ``writeback``, ...).
        aio: QEMU's ``aio=`` (``threads``; ``native`` needs ``cache=none``).
        params: extra ``mirrorfs.KEY=VALUE`` kernel arguments (``count``, ``interval_us``,
            ``sync``, ``resume``, ``token``). The writer's ``run`` defaults to a random id.
        memory_mib: guest RAM.
        image: the guest kernel/initramfs; built (or taken from the cache) when None.
        accel: ``kvm`` or ``tcg``; detected when None.
        drive_opts: appended to ``-drive`` (e.g. ``werror=report,rerror=report``: by default
            QEMU pauses the VM on ENOSPC instead of failing the guest's write).
        extra_args: appended to QEMU's command line.

    Raises:
        GuestError: a bad mode or parameter (nothing is started).
    """

    def __init__(self, disk: Path, *, mode: str, workdir: Path, fmt: str = "raw",
                 cache: str = "none", aio: str = "threads", params: dict[str, object] | None = None,
                 memory_mib: int = 256, image: GuestImage | None = None, accel: str | None = None,
                 drive_opts: str = "", extra_args: tuple[str, ...] = ()) -> None:
        if mode not in MODES:
            raise GuestError(f"unknown guest mode {mode!r}; use one of {', '.join(MODES)}")
        self.disk = Path(disk)
        self.mode = mode
        self.workdir = Path(workdir)
        self.fmt, self.cache, self.aio = fmt, cache, aio
        self.params = {str(k): str(v) for k, v in (params or {}).items()}
        if mode == "writer":
            self.params.setdefault("run", str(secrets.randbits(63) | 1))
        for key, value in self.params.items():
            if key == "mode" or not _PARAM_RE.match(key) or not _PARAM_RE.match(value):
                raise GuestError(f"bad guest parameter {key}={value!r}")
        self.run_id = int(self.params["run"]) if "run" in self.params else None
        self.memory_mib = memory_mib
        self.image = image
        self.accel = accel or detect_accel()
        self.drive_opts = drive_opts
        self.extra_args = tuple(extra_args)
        self.console_path = self.workdir / "console.log"
        self.qemu_log_path = self.workdir / "qemu.log"
        # UNIX socket paths are limited to 107 bytes: keep them short, outside workdir.
        self._sockdir = Path(tempfile.mkdtemp(prefix="mfsvm."))
        self.ctl_socket = self._sockdir / "ctl.sock"
        self.qmp_socket = self._sockdir / "qmp.sock"
        self.proc: subprocess.Popen | None = None
        self.started_at = 0.0
        self.boot_seconds: float | None = None
        self._ctl: socket.socket | None = None

    # ---- lifecycle ------------------------------------------------------------------------

    def command(self) -> list[str]:
        """QEMU's command line."""
        assert self.image is not None
        drive = (f"file={_escape(str(self.disk))},if=virtio,format={self.fmt},"
                 f"cache={self.cache},aio={self.aio}"
                 + (f",{self.drive_opts}" if self.drive_opts else ""))
        append = " ".join(["console=ttyS0", "panic=-1", "quiet", f"mirrorfs.mode={self.mode}",
                           *(f"mirrorfs.{k}={v}" for k, v in self.params.items())])
        accel = ["-accel", "kvm", "-cpu", "host"] if self.accel == "kvm" else ["-accel", "tcg"]
        return [
            QEMU, "-nodefaults", "-no-user-config", "-display", "none", *accel,
            "-machine", "pc", "-m", str(self.memory_mib), "-smp", "1",
            "-kernel", str(self.image.kernel), "-initrd", str(self.image.initrd),
            "-append", append,
            "-drive", drive,
            "-device", "virtio-serial-pci",
            "-chardev", f"socket,id=ctl,path={_escape(str(self.ctl_socket))},server=on,wait=off",
            "-device", "virtserialport,chardev=ctl,name=mirrorfs.ctl",
            "-qmp", f"unix:{_escape(str(self.qmp_socket))},server=on,wait=off",
            "-serial", f"file:{_escape(str(self.console_path))}",
            "-no-reboot",
            *self.extra_args,
        ]

    def start(self) -> GuestVM:
        """Start QEMU (returns at once; use :meth:`wait_ready` to wait for the boot).

        Raises:
            GuestError: the guest cannot be built or QEMU cannot be started.
        """
        if self.proc is not None:
            raise GuestError("this GuestVM was already started")
        if shutil.which(QEMU) is None:
            raise GuestError(f"{QEMU} is not installed: run ./scripts/setup")
        if self.image is None:
            self.image = build()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.console_path.write_bytes(b"")
        with open(self.qemu_log_path, "wb") as log:
            self.started_at = time.monotonic()
            self.proc = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT)
        return self

    def __enter__(self) -> GuestVM:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        """Kill QEMU if it still runs, and remove the sockets. Safe to call twice."""
        if self._ctl is not None:
            self._ctl.close()
            self._ctl = None
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self._sockdir, ignore_errors=True)

    # ---- observing ------------------------------------------------------------------------

    def console(self) -> str:
        """Everything the guest printed on its serial console so far."""
        try:
            return self.console_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def _describe(self) -> str:
        try:
            qemu_out = self.qemu_log_path.read_text(errors="replace").strip()
        except FileNotFoundError:
            qemu_out = ""
        tail = "\n".join(self.console().splitlines()[-15:])
        rc = self.proc.poll() if self.proc else None
        return (f"[qemu {'running' if rc is None else f'exited {rc}'}; accel {self.accel};"
                f" disk {self.disk} {self.fmt} cache={self.cache}]\n--- console tail ---\n{tail}"
                + (f"\n--- qemu output ---\n{qemu_out[-2000:]}" if qemu_out else ""))

    def wait_for_console(self, pattern: str | re.Pattern[str],
                         timeout: float = 60) -> re.Match[str]:
        """Wait until the console shows ``pattern`` (a regex) and return the first match.

        Raises:
            GuestError: the deadline passed or QEMU exited first.
        """
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        while True:
            exited = self.proc is None or self.proc.poll() is not None
            m = regex.search(self.console())
            if m:
                return m
            if exited:
                raise GuestError(f"QEMU exited before the console showed {regex.pattern!r}\n"
                                 + self._describe())
            if time.monotonic() > deadline:
                raise GuestError(f"console did not show {regex.pattern!r} within {timeout}s\n"
                                 + self._describe())
            time.sleep(0.05)

    def wait_ready(self, timeout: float = 60) -> float:
        """Wait until /init has found its disk and port; return the boot time in seconds."""
        m = self.wait_for_console(r"MIRRORFS-GUEST ready mode=\S+ disk=(\S+)", timeout)
        if self.boot_seconds is None:
            self.boot_seconds = time.monotonic() - self.started_at
        if m.group(1) != "/dev/vda":
            raise GuestError("the guest found no /dev/vda\n" + self._describe())
        return self.boot_seconds

    def writer_progress(self) -> int:
        """The highest sequence number the writer has reported so far (0 if none)."""
        text = self.console()
        seqs = [int(s) for s in re.findall(r"WRITER progress seq=(\d+)", text)]
        seqs += [int(s) for s in re.findall(r"WRITER stopped .*?last=(\d+)", text)]
        return max(seqs, default=0)

    def wait_for_records(self, seq: int, timeout: float = 60) -> int:
        """Wait until the writer reports having written sequence number ``seq``; return the
        number it reported (progress lines come every 0.5 s, so usually more).

        Raises:
            GuestError: the deadline passed, the writer failed, or QEMU exited.
        """
        deadline = time.monotonic() + timeout
        while True:
            have = self.writer_progress()
            if have >= seq:
                return have
            if "WRITER error" in self.console() or (self.proc and self.proc.poll() is not None):
                raise GuestError(f"the writer stopped at seq {have} before {seq}\n"
                                 + self._describe())
            if time.monotonic() > deadline:
                raise GuestError(f"the writer reached seq {have}, not {seq}, within {timeout}s\n"
                                 + self._describe())
            time.sleep(0.1)

    # ---- controlling ----------------------------------------------------------------------

    def send_stop(self) -> None:
        """Tell the writer to stop (``stop`` on the virtio-serial control port).

        Raises:
            GuestError: the control socket cannot be reached.
        """
        if self._ctl is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            deadline = time.monotonic() + 10
            while True:
                try:
                    sock.connect(str(self.ctl_socket))
                    break
                except OSError as exc:
                    if time.monotonic() > deadline or (self.proc and self.proc.poll() is not None):
                        sock.close()
                        raise GuestError(f"cannot connect to {self.ctl_socket}: {exc}\n"
                                         + self._describe()) from exc
                    time.sleep(0.05)
            # Kept open until close(): hanging up before the guest has read the line
            # could lose it.
            self._ctl = sock
        self._ctl.sendall(b"stop\n")

    def wait_exit(self, timeout: float = 120) -> int:
        """Wait for the guest to power off (QEMU exits) and return the guest's /init status.

        Raises:
            GuestError: QEMU still runs after ``timeout``, failed, or /init did not finish.
        """
        assert self.proc is not None
        try:
            qrc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise GuestError(f"the guest did not power off within {timeout}s\n"
                             + self._describe()) from None
        m = re.search(r"MIRRORFS-GUEST exit rc=(\d+)", self.console())
        if qrc != 0 or not m:
            raise GuestError(f"QEMU exited with {qrc} without a clean guest exit\n"
                             + self._describe())
        return int(m.group(1))

    def stop_writer(self, timeout: float = 120) -> WriterResult:
        """Send ``stop``, wait for the writer's report and for the power-off.

        Raises:
            GuestError: the writer failed or the guest did not shut down in time.
        """
        self.send_stop()
        rc = self.wait_exit(timeout)
        result = parse_writer(self.console())
        if rc != 0 or result is None:
            raise GuestError(f"the writer ended with status {rc}\n" + self._describe())
        return result


def parse_writer(console: str) -> WriterResult | None:
    """The writer's ``WRITER stopped`` line, or None."""
    m = re.search(r"WRITER stopped records=(\d+) first=(\d+) last=(\d+) run=(\d+) by=(\w+)",
                  console)
    if not m:
        return None
    return WriterResult(int(m.group(1)), int(m.group(2)), int(m.group(3)), int(m.group(4)),
                        m.group(5))


def run_guest(disk: Path, mode: str, *, workdir: Path, timeout: float = 120,
              **kwargs: object) -> str:
    """Boot a guest that ends by itself (``verify``, ``write-marker``, a ``writer`` with
    ``count``), wait for the power-off, and return its console output.

    Raises:
        GuestError: it did not finish cleanly within ``timeout``.
    """
    with GuestVM(disk, mode=mode, workdir=workdir, **kwargs) as vm:  # type: ignore[arg-type]
        rc = vm.wait_exit(timeout)
        console = vm.console()
    if rc != 0 and mode != "verify":
        raise GuestError(f"guest mode {mode} ended with status {rc}:\n{console[-2000:]}")
    return console


def verify_in_guest(disk: Path, *, workdir: Path, timeout: float = 120,
                    **kwargs: object) -> VerifyResult:
    """Boot the verifying guest on ``disk`` and return its result.

    Raises:
        RecordError: the guest reported ``VERIFY fail``.
        GuestError: the guest did not run to the end.
    """
    console = run_guest(disk, "verify", workdir=workdir, timeout=timeout, **kwargs)
    m = re.search(r"VERIFY ok records=(\d+) first=(\d+) last=(\d+) run=(\d+)", console)
    if m:
        return VerifyResult(*(int(g) for g in m.groups()))
    fail = re.search(r"VERIFY fail .*", console)
    if fail:
        raise RecordError(f"in-guest verification of {disk}: {fail.group(0)}")
    raise GuestError(f"the verifying guest printed no VERIFY line:\n{console[-2000:]}")


def _escape(value: str) -> str:
    """QEMU option values double their commas."""
    return value.replace(",", ",,")
