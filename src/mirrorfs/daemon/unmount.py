"""``mirrorfs unmount``: stop a mount's daemon cleanly and wait until it has exited.

``cli_unmount`` reads the daemon's pid from ``.mirrorfs/pid``, sends SIGTERM and returns only once
that process is gone, so everything the daemon does at teardown is done; ``fusermount3 -u`` is
the fallback for a daemon that is dead or does not stop. The pid is only a claim of whatever is
mounted there: it is signalled only if it is a ``mirrorfs mount`` of that mountpoint, of the
caller's user, holding ``/dev/fuse`` (``daemon_refusal``).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import threading
import time

from ..errors import MountError
from ..fs.control_dir import CONTROL_DIR_NAME
from .mount import FSTYPE, FUSE_DEVICE, mount_fstype

log = logging.getLogger(__name__)

#: How long ``unmount`` waits for the daemon to finish its teardown before falling back.
UNMOUNT_TIMEOUT = 120.0


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


def names_mountpoint(argv: list[str], mnt: str) -> bool:
    """Whether ``argv`` is a ``mirrorfs mount SOURCE MOUNTPOINT`` command line for ``mnt``.

    A relative mountpoint in ``argv`` was relative to a directory we no longer know, so it
    matches when ``mnt`` ends with it.
    """
    if not any("mirrorfs" in os.path.basename(a) for a in argv[:3]) or "mount" not in argv:
        return False
    for arg in argv[argv.index("mount") + 1:]:
        if not arg or arg.startswith("-"):
            continue
        if os.path.isabs(arg):
            if os.path.normpath(arg) == mnt:
                return True
        elif (mnt + "/").endswith("/" + os.path.normpath(arg).rstrip("/") + "/") \
                and not os.path.normpath(arg).startswith(".."):
            return True
    return False


def daemon_refusal(pid: int, mnt: str, *, uid: int, proc: str = "/proc") -> str | None:
    """Why ``pid`` must not be signalled as the mirrorfs daemon of ``mnt`` (None: it may).

    A mount's ``.mirrorfs/pid`` is only a claim: any FUSE filesystem can call itself mirrorfs
    and name any process. Only a process of the caller's user whose command line is a
    ``mirrorfs mount`` of this very mountpoint and which holds ``/dev/fuse`` open is believed.
    """
    base = os.path.join(proc, str(pid))
    try:
        with open(os.path.join(base, "status"), encoding="ascii", errors="replace") as f:
            uids = next((line.split()[1:] for line in f if line.startswith("Uid:")), [])
        with open(os.path.join(base, "cmdline"), "rb") as f:
            argv = [os.fsdecode(a) for a in f.read().split(b"\0") if a]
    except OSError:
        return f"process {pid} cannot be inspected"
    if not uids or any(int(u) != uid for u in uids):
        return f"process {pid} does not belong to uid {uid}"
    if not names_mountpoint(argv, mnt):
        return f"process {pid} is not a mirrorfs daemon for {mnt} ({' '.join(argv)[:80]!r})"
    try:
        fds = os.listdir(os.path.join(base, "fd"))
        holds_fuse = any(_readlink(os.path.join(base, "fd", fd)) == FUSE_DEVICE for fd in fds)
    except OSError:
        holds_fuse = False
    if not holds_fuse:
        return f"process {pid} does not serve a FUSE mount"
    return None


def _readlink(path: str) -> str | None:
    try:
        return os.readlink(path)
    except OSError:
        return None


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
        why = daemon_refusal(pid, mnt, uid=os.getuid())
        if why is not None:
            raise MountError(f"{mnt} names process {pid} as its daemon, but {why}: not "
                             f"signalling it (if this is your mount: fusermount3 -u {mnt})")
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
