"""``mirrorfs mount`` / ``mirrorfs unmount``: the mount process and its lifetime.

Role: ``MountService`` owns everything a mount runs: the pyfuse3 session (global in pyfuse3, so
one mount per process), the only trio nursery, and an ``AsyncExitStack`` through which every
component registers its teardown, so shutdown runs in reverse order of startup (s3ql's pattern).
Later components (mirror job manager, QMP server) are started in ``MountService._start_components``
and nowhere else.

Lifetime:
- ``mount`` checks its arguments, forks, and the child detaches (``setsid``, stdio to the log
  file) and mounts. The parent waits on a pipe until the child reports that the mount answers
  requests (a real ``stat`` of ``.mirrorfs/pid`` through the kernel) or why it could not mount,
  so ``mount`` returns only once the mount is usable, and exits 2 with one line otherwise.
- SIGTERM, SIGINT and SIGHUP call ``pyfuse3.terminate()``; the main loop returns, the session is
  unmounted and closed first (no new requests can hang on a half-stopped process), then the
  components are torn down (jobs flush their bitmaps), then the source descriptors close.
- ``unmount`` reads the daemon's pid from ``.mirrorfs/pid``, sends SIGTERM and returns only once
  that process is gone, so everything the daemon does at teardown is done; ``fusermount3 -u`` is
  the fallback for a daemon that is dead or does not stop.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import AsyncExitStack
from typing import Callable

import trio

from ..errors import MirrorfsError, MountError
from . import fuseloop
from .control_dir import CONTROL_DIR_NAME, VirtualFile
from .fuseloop import DEFAULT_POLL_MAX_NS

log = logging.getLogger(__name__)

#: fstype of our mounts in /proc/self/mountinfo ("fuse." + the subtype option).
FSTYPE = "fuse.mirrorfs"
#: How long ``unmount`` waits for the daemon to finish its teardown before falling back.
UNMOUNT_TIMEOUT = 120.0
#: The FUSE device the kernel mount needs.
FUSE_DEVICE = "/dev/fuse"


class MountService:
    """One mount: the pyfuse3 session, the nursery and the teardown stack.

    Args:
        source_dir: the directory to expose.
        mountpoint: where to mount it.
        allow_other: let other users access the mount (FUSE ``allow_other``).
        socket_path: the QMP socket path (stored for the QMP server, which is started later).
        poll_max_ns: the request loop's largest polling window (``fuseloop``); 0: never poll.

    Attributes:
        operations: the pyfuse3 ``Operations`` (``operations.control_dir`` for ``.mirrorfs/``).
        nursery: the only nursery of the mount, valid while ``run()`` runs.
        exit_stack: the teardown stack, valid while ``run()`` runs.
    """

    def __init__(self, source_dir: str, mountpoint: str, *, allow_other: bool = False,
                 socket_path: str | None = None, poll_max_ns: int = DEFAULT_POLL_MAX_NS) -> None:
        from .operations import Operations  # pyfuse3 only where a mount really runs

        self.source_dir = os.path.abspath(source_dir)
        self.mountpoint = os.path.abspath(mountpoint)
        self.allow_other = allow_other
        self.poll_max_ns = poll_max_ns
        self.socket_path = os.path.abspath(socket_path) if socket_path else None
        self.operations = Operations(self.source_dir)
        self.nursery: trio.Nursery | None = None
        self.exit_stack: AsyncExitStack | None = None
        self._session_open = False
        self.operations.control_dir.register("status", VirtualFile(lambda: b"no jobs\n"))
        self.operations.control_dir.register("pid", VirtualFile(lambda: f"{os.getpid()}\n".encode()))

    def fuse_options(self) -> set[str]:
        """The mount options passed to ``pyfuse3.init``."""
        import pyfuse3

        # libfuse splits options at commas; a comma in the fsname would break the option string.
        options = set(pyfuse3.default_options)  # default_permissions: the kernel checks modes
        options |= {"fsname=" + self.source_dir.replace(",", "_"), "subtype=mirrorfs"}
        if self.allow_other:
            options.add("allow_other")
        return options

    async def _start_components(self) -> None:
        """THE place where later components start and register their teardown.

        Each component takes ``nursery=self.nursery`` and ``operations=self.operations`` (to
        attach jobs to ``operations.node_for_relpath(...)`` and to register ``.mirrorfs/`` files),
        and registers its teardown with ``self.exit_stack.push_async_callback(...)``. Teardown runs
        in reverse order, after the FUSE session is unmounted and before source files close::

            manager = await JobManager.create(operations=self.operations, nursery=self.nursery)
            self.exit_stack.push_async_callback(manager.shutdown)
            if self.socket_path:
                server = await QmpServer.start(self.socket_path, manager, nursery=self.nursery)
                self.exit_stack.push_async_callback(server.stop)
        """
        from ..control.wiring import start_components  # the engine and its control surfaces

        await start_components(self)

    def _close_session(self) -> None:
        """Unmount and destroy the pyfuse3 session (idempotent)."""
        import pyfuse3

        if self._session_open:
            self._session_open = False
            log.debug("unmounting %s", self.mountpoint)
            pyfuse3.close(unmount=True)

    async def _serve(self, done: trio.Event) -> None:
        import pyfuse3

        try:
            fuseloop.install(self.poll_max_ns)
            try:
                await pyfuse3.main()
            finally:
                fuseloop.uninstall()
        finally:
            done.set()

    def _terminate(self) -> None:
        import pyfuse3

        if self._session_open:
            pyfuse3.terminate()

    async def _watch_signals(self, *, task_status: trio.TaskStatus[trio.CancelScope] = trio.TASK_STATUS_IGNORED) -> None:
        import pyfuse3

        with trio.CancelScope() as scope:
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
                task_status.started(scope)
                async for signum in signals:
                    log.info("received %s: unmounting", signal.Signals(signum).name)
                    self._terminate()

    async def _report_ready(self, on_ready: Callable[[], None]) -> None:
        # A real request through the kernel: when it returns, the mount serves requests.
        probe = os.path.join(self.mountpoint, CONTROL_DIR_NAME, "pid")
        await trio.to_thread.run_sync(os.stat, probe, abandon_on_cancel=True)
        log.info("mounted %s at %s (pid %d)", self.source_dir, self.mountpoint, os.getpid())
        on_ready()

    async def run(self, on_ready: Callable[[], None] | None = None) -> None:
        """Mount, serve until unmounted or signalled, then tear everything down.

        Args:
            on_ready: called once the mount answers requests.

        Raises:
            MountError: the kernel mount failed (mountpoint busy, no /dev/fuse, ...).
        """
        import pyfuse3

        async with AsyncExitStack() as stack:
            self.exit_stack = stack
            self.nursery = await stack.enter_async_context(trio.open_nursery())
            # Signals first: a SIGTERM right after the mount must unmount, not kill.
            signal_scope = await self.nursery.start(self._watch_signals)
            stack.callback(signal_scope.cancel)
            stack.callback(self.operations.close_all)
            try:
                pyfuse3.init(self.operations, self.mountpoint, self.fuse_options())
            except RuntimeError as exc:
                raise MountError(f"cannot mount {self.mountpoint}: {exc}") from None
            self._session_open = True
            stack.callback(self._close_session)
            # The main loop runs BEFORE the components start: until it has answered the kernel's
            # INIT request, any stat of the mountpoint (a realpath() of it, say) blocks forever,
            # and a component doing one before the loop ran would deadlock the mount.
            main_done = trio.Event()
            self.nursery.start_soon(self._serve, main_done)
            try:
                # ---- components ----
                await self._start_components()
                # --------------------
            except BaseException:
                self._terminate()
                raise
            if on_ready is not None:
                self.nursery.start_soon(self._report_ready, on_ready)
            await main_done.wait()
            # Unmount before the components stop, so no request waits on a stopping process.
            self._close_session()
            log.info("main loop ended; tearing down")
        log.info("unmounted %s", self.mountpoint)


# ---------------------------------------------------------------------- helpers shared by the CLI

def _unescape_mountinfo(field: str) -> str:
    return field.encode().decode("unicode_escape") if "\\" in field else field


def mount_fstype(path: str) -> str | None:
    """The filesystem type mounted exactly at ``path`` (last mount wins), or None."""
    path = os.path.abspath(path)
    fstype = None
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
            for line in f:
                left, _, right = line.partition(" - ")
                fields = left.split()
                if len(fields) >= 5 and _unescape_mountinfo(fields[4]) == path:
                    fstype = right.split()[0] if right else "?"
    except OSError:
        return None
    return fstype


def check_mount_args(source_dir: str, mountpoint: str) -> tuple[str, str]:
    """Validate ``mount``'s arguments before anything is started.

    Returns:
        the absolute source directory and mountpoint.

    Raises:
        MountError: missing source, mountpoint missing / busy / not empty / inside the source,
            no usable /dev/fuse.
    """
    source = os.path.abspath(source_dir)
    mnt = os.path.abspath(mountpoint)
    if not os.path.isdir(source):
        what = "is not a directory" if os.path.exists(source) else "does not exist"
        raise MountError(f"source directory {source} {what}: give an existing directory of images")
    if mount_fstype(mnt) is not None:
        raise MountError(f"mountpoint {mnt} is busy (already a mount point): unmount it first")
    try:
        entries = os.listdir(mnt)
    except FileNotFoundError:
        raise MountError(f"mountpoint {mnt} does not exist: create an empty directory first") from None
    except NotADirectoryError:
        raise MountError(f"mountpoint {mnt} is not a directory: give an empty directory") from None
    except OSError as exc:
        raise MountError(f"mountpoint {mnt} is not usable ({exc.strerror}): give an empty directory") from None
    if entries:
        raise MountError(f"mountpoint {mnt} is not empty: give an empty directory")
    real_src, real_mnt = os.path.realpath(source), os.path.realpath(mnt)
    if real_mnt == real_src or real_mnt.startswith(real_src.rstrip("/") + "/"):
        raise MountError(f"mountpoint {mnt} is inside the source directory {source}: choose a path outside it")
    if not os.path.exists(FUSE_DEVICE):
        raise MountError(f"{FUSE_DEVICE} is missing: load the fuse module (modprobe fuse) or give the "
                         f"container the device (--device /dev/fuse)")
    if not os.access(FUSE_DEVICE, os.R_OK | os.W_OK):
        raise MountError(f"{FUSE_DEVICE} is not accessible to this user: check its permissions")
    return source, mnt


def default_log_file(mountpoint: str) -> str:
    """Where a detached mount logs: ``$MIRRORFS_LOG_FILE``, else a file per mountpoint in /tmp."""
    env = os.environ.get("MIRRORFS_LOG_FILE")
    if env:
        return env
    name = os.path.abspath(mountpoint).strip("/").replace("/", "_") or "root"
    return os.path.join(tempfile.gettempdir(), f"mirrorfs-{os.getuid()}", f"mount-{name}.log")


def _setup_logging(level: str, stream: object) -> None:
    handler = logging.StreamHandler(stream)  # type: ignore[arg-type]
    handler.setFormatter(logging.Formatter(
        "%(asctime)s %(process)d %(name)s %(levelname)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level.upper(), logging.WARNING))


def _run_service(service: MountService, on_ready: Callable[[], None] | None) -> None:
    # Files the daemon creates get exactly the mode the kernel passes (already masked with the
    # caller's umask), not the daemon's own umask on top.
    os.umask(0)
    try:
        trio.run(service.run, on_ready)
    except BaseExceptionGroup as group:
        # The nursery wraps errors of the mount's body in a group; expected ones are unwrapped.
        mount_errors, rest = group.split(MirrorfsError)
        if mount_errors is not None and rest is None:
            leaf: BaseException = mount_errors
            while isinstance(leaf, BaseExceptionGroup):
                leaf = leaf.exceptions[0]
            raise leaf from None
        raise


def cli_mount(args: argparse.Namespace) -> int:
    """``mirrorfs mount SOURCE_DIR MOUNTPOINT [--foreground] [--socket P] [--allow-other]
    [--poll-max-ns NS] [--log-level L]``.

    Raises:
        MountError: the mount cannot be made (one line for the user, exit 2).
    """
    source, mnt = check_mount_args(args.source_dir, args.mountpoint)
    service = MountService(source, mnt, allow_other=args.allow_other, socket_path=args.socket,
                           poll_max_ns=DEFAULT_POLL_MAX_NS if args.poll_max_ns is None else args.poll_max_ns)
    if args.foreground:
        _setup_logging(args.log_level, sys.stderr)
        _run_service(service, None)
        return 0

    log_file = default_log_file(mnt)
    os.makedirs(os.path.dirname(log_file), exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid > 0:
        os.close(write_end)
        return _wait_for_child(pid, read_end, mnt, log_file)

    # ---- the daemon ----
    code = 1
    try:
        os.close(read_end)
        os.setsid()
        os.chdir("/")
        log_fd = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        null_fd = os.open(os.devnull, os.O_RDONLY)
        # Nothing of the caller's stdio may stay open: callers read it through pipes until EOF.
        os.dup2(null_fd, 0)
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        os.close(null_fd)
        os.close(log_fd)
        # Names from the source directory may not be UTF-8 (lone surrogates): a log line that
        # mentions one must still be written, escaped, rather than fail in the logging module.
        sys.stdout = open(1, "w", buffering=1, closefd=False, errors="backslashreplace")
        sys.stderr = open(2, "w", buffering=1, closefd=False, errors="backslashreplace")
        _setup_logging(args.log_level, sys.stderr)

        def ready() -> None:
            with contextlib.suppress(OSError):
                os.write(write_end, b"ok\n")
                os.close(write_end)

        try:
            _run_service(service, ready)
            code = 0
        except MirrorfsError as exc:
            # Expected failures (mount refused, a component that cannot start): one line.
            log.error("%s", exc)
            with contextlib.suppress(OSError):
                os.write(write_end, f"error {exc} (log: {log_file})\n".encode())
        except BaseException:
            log.exception("mount process failed")
            raise
    finally:
        os._exit(code)


def _wait_for_child(pid: int, read_end: int, mnt: str, log_file: str) -> int:
    """Parent side of ``mount``: wait for the daemon's readiness report."""
    chunks = []
    with os.fdopen(read_end, "rb") as pipe:
        # EOF comes when the daemon reported (it closes its end) or died.
        chunks.append(pipe.read())
    reply = b"".join(chunks).decode(errors="replace").strip()
    if reply.startswith("ok"):
        return 0
    if reply.startswith("error "):
        raise MountError(reply[len("error "):])
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)
    raise MountError(f"the mount process for {mnt} exited before the mount was ready; see {log_file}")


def process_gone(pid: int) -> bool:
    # Zombies count as gone: in a container nobody may reap the detached daemon.
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
        return state in (b"Z", b"X")
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return True
    except OSError:
        return False


def _read_pid(mnt: str, timeout: float = 5.0) -> int | None:
    """The daemon's pid from ``.mirrorfs/pid``; None if the mount does not answer."""
    result: list[int | None] = [None]

    def read() -> None:
        try:
            with open(os.path.join(mnt, CONTROL_DIR_NAME, "pid"), encoding="ascii") as f:
                result[0] = int(f.read().strip())
        except (OSError, ValueError):
            pass

    # A stuck daemon would make the read hang forever: read in a thread with a deadline.
    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    thread.join(timeout)
    return result[0]


def _fusermount_unmount(mnt: str) -> None:
    for extra in ([], ["-z"]):
        proc = subprocess.run(["fusermount3", "-u", *extra, mnt], capture_output=True, text=True)
        if proc.returncode == 0 or mount_fstype(mnt) is None:
            return
    log.warning("fusermount3 -u %s failed: %s", mnt, proc.stderr.strip())


def cli_unmount(args: argparse.Namespace) -> int:
    """``mirrorfs unmount MOUNTPOINT``: stop the daemon cleanly and wait until it has exited.

    Raises:
        MountError: MOUNTPOINT is not a mirrorfs mount, or the unmount failed.
    """
    mnt = os.path.abspath(args.mountpoint)
    fstype = mount_fstype(mnt)
    if fstype != FSTYPE:
        what = "nothing is mounted there" if fstype is None else f"it is a {fstype} mount"
        raise MountError(f"{mnt} is not a mirrorfs mount ({what})")
    pid = _read_pid(mnt)
    if pid is not None and not process_gone(pid):
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + UNMOUNT_TIMEOUT
        while not process_gone(pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        if not process_gone(pid):
            _fusermount_unmount(mnt)
            raise MountError(f"the mount process {pid} did not exit within {UNMOUNT_TIMEOUT:.0f} s; "
                             f"forced the unmount of {mnt}, jobs may not have stopped cleanly")
    if mount_fstype(mnt) == FSTYPE:
        # The daemon was already dead (or never answered): only the kernel mount is left.
        _fusermount_unmount(mnt)
    if mount_fstype(mnt) == FSTYPE:
        raise MountError(f"could not unmount {mnt}: it is still mounted (busy?)")
    return 0
