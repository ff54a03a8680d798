"""``mirrorfs mount``: the mount process and its lifetime.

Role: ``MountService`` owns everything a mount runs: the pyfuse3 session (global in pyfuse3, so
one mount per process), the only trio nursery, and an ``AsyncExitStack`` through which every
component registers its teardown, so shutdown runs in reverse order of startup (s3ql's pattern).
The components (job manager, QMP server, ``.mirrorfs/`` files) start in
``MountService._start_components`` and nowhere else, through ``components.start_engine``; the
metrics endpoint (``components.start_metrics``) starts before the kernel mount.

Lifetime:
- ``cli_mount`` checks its arguments, forks, and the child detaches (``setsid``, stdio to the log
  file) and mounts. The parent waits on a pipe until the child reports that the mount answers
  requests (a real ``stat`` of ``.mirrorfs/pid`` through the kernel) or why it could not mount,
  so ``mount`` returns only once the mount is usable, and exits 2 with one line otherwise.
  ``--foreground`` runs the service in this process (for systemd, with ``READY=1``).
- With ``--state-dir``, the state directory is opened and its records checked before the kernel
  mount (a bad record: nothing is mounted), and every persistent job is re-attached before the
  mount reports ready; until then opening a file through the mount waits.
- SIGTERM, SIGINT and SIGHUP call ``pyfuse3.terminate()``; the main loop returns, the session is
  unmounted and closed first (no new requests can hang on a half-stopped process), then the
  components are torn down (jobs flush their bitmaps), then the source descriptors close.
- ``unmount`` (``unmount.py``) signals the daemon and waits until it has exited.

Files: the daemon keeps the user's umask with world-write always masked; files created through
the mount get the mode their creator asked for (set on the descriptor). The detached daemon logs
to a file it opens append-only, 0600, never through a symlink, in ``/tmp/mirrorfs-UID`` only if
that directory is ours (``open_log_file``).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import os
import signal
import stat
import sys
import tempfile
from contextlib import AsyncExitStack
from typing import TYPE_CHECKING, Any, Callable

import trio

from ..errors import MirrorfsError, MountError, StateDirError
from ..fs import fuseloop
from ..fs.control_dir import CONTROL_DIR_NAME, VirtualFile
from ..fs.fuseloop import DEFAULT_POLL_MAX_NS
from ..state.directory import open_private_dir
from . import sdnotify

if TYPE_CHECKING:
    from ..control.qmp_server import QMPServer
    from ..state.directory import StateDir
    from ..state.record import JobRecord
    from ..metrics.server import MetricsServer
    from ..mirror.manager import JobManager

log = logging.getLogger(__name__)

#: fstype of our mounts in /proc/self/mountinfo ("fuse." + the subtype option).
FSTYPE = "fuse.mirrorfs"
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
        metrics_address: (host, port) to serve Prometheus metrics on; None: no metrics.
        state_dir: the state directory of the mount's persistent jobs (``--state-dir``); every
            job recorded there is re-attached before the mount reports ready.

    Attributes:
        operations: the pyfuse3 ``Operations`` (``operations.control_dir`` for ``.mirrorfs/``).
        nursery: the only nursery of the mount, valid while ``run()`` runs.
        exit_stack: the teardown stack, valid while ``run()`` runs.
        manager: the job manager, once the components have started.
        qmp_server: the QMP server, once the components have started.
        metrics_server: the metrics endpoint, while ``run()`` runs with ``metrics_address``.
    """

    def __init__(self, source_dir: str, mountpoint: str, *, allow_other: bool = False,
                 socket_path: str | None = None, poll_max_ns: int = DEFAULT_POLL_MAX_NS,
                 metrics_address: tuple[str, int] | None = None,
                 state_dir: str | None = None) -> None:
        from ..fs.operations import Operations  # pyfuse3 only where a mount really runs

        self.source_dir = os.path.abspath(source_dir)
        self.mountpoint = os.path.abspath(mountpoint)
        self.allow_other = allow_other
        self.poll_max_ns = poll_max_ns
        self.socket_path = os.path.abspath(socket_path) if socket_path else None
        self.metrics_address = metrics_address
        self.state_dir = os.path.abspath(state_dir) if state_dir else None
        self._state: StateDir | None = None
        self._records: list[JobRecord] = []
        self.operations = Operations(self.source_dir)
        self.nursery: trio.Nursery | None = None
        self.exit_stack: AsyncExitStack | None = None
        self.manager: JobManager | None = None
        self.qmp_server: QMPServer | None = None
        self.metrics_server: MetricsServer | None = None
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
        """THE place where the components start and register their teardown.

        Teardown runs in reverse order, after the FUSE session is unmounted and before the
        source files close (``components.start_engine`` says in which order).
        """
        from .components import start_engine  # the engine and its control surfaces

        assert self.nursery is not None and self.exit_stack is not None, "only inside run()"
        self.manager, self.qmp_server = await start_engine(
            self.operations, self.nursery, self.exit_stack, source_dir=self.source_dir,
            mountpoint=self.mountpoint, socket_path=self.socket_path, state=self._state)
        if self._state is not None:
            from .components import reattach_jobs

            await reattach_jobs(self.manager, self._state, self._records)

    async def _open_state(self, stack: AsyncExitStack) -> None:
        """Open and lock the state directory and check its records against the images, before
        anything is mounted: a record that does not match refuses the mount, with one line
        per bad record, and nothing changes."""
        from ..state.directory import StateDir, image_checker

        if self.state_dir is None:
            return
        state = await trio.to_thread.run_sync(StateDir.open, self.state_dir)
        stack.callback(state.close)  # after the jobs stopped: registered before them
        records, errors = await trio.to_thread.run_sync(state.load_all,
                                                        image_checker(self.source_dir))
        if errors:
            raise StateDirError("\n".join(errors))
        self._state, self._records = state, records

    def _jobs(self) -> list[dict[str, Any]]:
        """``query-block-jobs`` of the mount; empty until the job manager runs."""
        return self.manager.query() if self.manager is not None else []

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
            await self._open_state(stack)
            if self.metrics_address is not None:
                # Before the kernel mount: a port in use fails the mount with nothing mounted.
                from .components import start_metrics

                self.metrics_server = start_metrics(self.metrics_address, self.operations,
                                                    self.source_dir, self.mountpoint, self._jobs)
                stack.push_async_callback(self.metrics_server.aclose)
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
            attached = trio.Event()
            if self._records:
                self.operations.hold_images(attached)
            self.nursery.start_soon(self._serve, main_done)
            try:
                # ---- components ----
                await self._start_components()
                # --------------------
                self.operations.release_images()
            except BaseException:
                attached.set()  # the held requests fail: the jobs are not attached
                self._terminate()
                # The session is destroyed by the teardown: the main loop must have returned
                # first, or its workers would still be using it (a crash, the error unreported).
                with trio.CancelScope(shield=True):
                    await main_done.wait()
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


def check_state_dir(state_dir: str, source: str, mountpoint: str) -> str:
    """Refuse a state directory inside the mount or the source directory: the mount would
    serve its records and bitmaps as images, or wait on itself to read them.

    Returns:
        its absolute path.

    Raises:
        MountError: it lies inside the mountpoint or the source directory.
    """
    path = os.path.abspath(state_dir)
    real = os.path.realpath(path)
    for name, place in (("the mountpoint", mountpoint), ("the source directory", source)):
        real_place = os.path.realpath(place).rstrip("/")
        if real == real_place or real.startswith(real_place + "/"):
            raise MountError(f"state directory {path} is inside {name} {place}: choose a "
                             f"directory outside both")
    return path


def default_log_file(mountpoint: str) -> str:
    """Where a detached mount logs: ``$MIRRORFS_LOG_FILE``, else a file per mountpoint in
    ``/tmp/mirrorfs-UID`` (``TMPDIR`` is honoured)."""
    env = os.environ.get("MIRRORFS_LOG_FILE")
    if env:
        return env
    name = os.path.abspath(mountpoint).strip("/").replace("/", "_") or "root"
    return os.path.join(tempfile.gettempdir(), f"mirrorfs-{os.getuid()}", f"mount-{name}.log")


def _own_private_dir(path: str) -> bool:
    """Make ``path`` a directory of ours, mode 0700; False if it is a symlink, not a directory,
    or someone else's (in a shared /tmp anybody can create it first)."""
    try:
        os.close(open_private_dir(path, "log directory", fix_mode=True))
    except StateDirError:
        return False
    return True


def open_log_file(log_file: str) -> tuple[int, str]:
    """Open the detached mount's log: append-only, 0600, never through a symlink.

    The default directory ``/tmp/mirrorfs-UID`` is used only if it is ours (mode set to 0700);
    if another user or a symlink holds that name, a fresh private directory is made instead. A
    file named by ``$MIRRORFS_LOG_FILE`` is the user's choice (``/dev/null`` works).

    Returns:
        the descriptor and the path actually opened.

    Raises:
        MountError: the log cannot be opened.
    """
    chosen = bool(os.environ.get("MIRRORFS_LOG_FILE"))
    try:
        directory = os.path.dirname(log_file)
        if chosen:
            os.makedirs(directory or ".", mode=0o700, exist_ok=True)
        elif not _own_private_dir(directory):
            directory = tempfile.mkdtemp(prefix=f"mirrorfs-{os.getuid()}-")
            log_file = os.path.join(directory, os.path.basename(log_file))
        fd = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW
                     | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise MountError(f"cannot open the log file {log_file}: {exc.strerror or exc}; "
                         f"set MIRRORFS_LOG_FILE to a file you own") from None
    st = os.fstat(fd)
    if not chosen and (not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid()):
        os.close(fd)
        raise MountError(f"the log file {log_file} is not a regular file of yours; remove it or "
                         f"set MIRRORFS_LOG_FILE")
    return fd, log_file


class _ReplyNoLongerAwaited(logging.Filter):
    """Lowers pyfuse3's "fuse_reply_* failed with No such file or directory" to INFO.

    The kernel answers a reply with ENOENT when it no longer holds the request: the caller was
    interrupted, or the mount ended while a RELEASE (which the kernel sends without waiting)
    was still being answered. Nothing of ours failed, so it must not read as an error.
    """

    _ENOENT = os.strerror(errno.ENOENT)

    def filter(self, record: logging.LogRecord) -> bool:
        if (record.levelno == logging.ERROR and isinstance(record.msg, str)
                and record.msg.endswith("fuse_reply_* failed with %s")
                and record.args == (self._ENOENT,)):
            record.levelno, record.levelname = logging.INFO, "INFO"
            record.msg += " (the kernel no longer waits for this reply)"
            return record.levelno >= logging.getLogger().getEffectiveLevel()
        return True


def _setup_logging(level: str, stream: object) -> None:
    handler = logging.StreamHandler(stream)  # type: ignore[arg-type]
    handler.setFormatter(logging.Formatter(
        "%(asctime)s %(process)d %(name)s %(levelname)s: %(message)s"))
    handler.addFilter(_ReplyNoLongerAwaited())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level.upper(), logging.WARNING))


def run_service(service: MountService, on_ready: Callable[[], None] | None) -> None:
    """Run ``service`` to its end in a new trio run, in this process.

    Raises:
        MirrorfsError: an expected failure of the mount (unwrapped from the nursery's group).
    """
    # The user's umask stays in force for what the daemon creates itself (bitmaps), but never
    # lets a file be world-writable; files created through the mount get their mode set
    # explicitly from the request (``Operations.create``/``mkdir``).
    os.umask(os.umask(0o022) | 0o002)
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
    [--poll-max-ns NS] [--metrics HOST:PORT] [--state-dir DIR] [--log-level L]``.

    Raises:
        MountError: the mount cannot be made (one line for the user, exit 2).
    """
    source, mnt = check_mount_args(args.source_dir, args.mountpoint)
    if args.state_dir:
        args.state_dir = check_state_dir(args.state_dir, source, mnt)
    service = MountService(source, mnt, allow_other=args.allow_other, socket_path=args.socket,
                           poll_max_ns=DEFAULT_POLL_MAX_NS if args.poll_max_ns is None else args.poll_max_ns,
                           metrics_address=args.metrics, state_dir=args.state_dir)
    if args.foreground:
        _setup_logging(args.log_level, sys.stderr)
        run_service(service, sdnotify.ready_notifier())
        return 0

    log_fd, log_file = open_log_file(default_log_file(mnt))
    sys.stdout.flush()
    sys.stderr.flush()
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid > 0:
        os.close(write_end)
        os.close(log_fd)
        return _wait_for_child(pid, read_end, mnt, log_file)

    # ---- the daemon ----
    code = 1
    try:
        os.close(read_end)
        os.setsid()
        os.chdir("/")
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
            run_service(service, ready)
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
