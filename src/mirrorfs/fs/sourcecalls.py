"""The blocking calls on the source directory that the FUSE handlers run in a worker thread
(``fileio.call``): each is decided on the trio thread and run whole off it.

Invariants:
- Files and directories created for another user (the daemon runs as root) get their owner and
  mode through the new descriptor, never by path: the name may point elsewhere by then.
- A call that fails after it created something removes what it created, and only that.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat

import pyfuse3

from .. import fileio

log = logging.getLogger(__name__)


def list_dir(path: str) -> list[str]:
    with os.scandir(path) as it:
        return [de.name for de in it]


def close_fd(fd: int, path: str, twin: int | None = None) -> None:
    """Close a source descriptor and its O_DIRECT twin, if it has one."""
    try:
        fileio.close_twin(twin)
        os.close(fd)
    except OSError as exc:
        log.info("close of %s failed: %s", path, exc)


def open_classified(path: str, flags: int, direct: bool = False) -> tuple[int, int | None, bool]:
    """Open ``path`` (with an O_DIRECT twin if ``direct``); returns the descriptor, its twin and
    whether its I/O may run inline (``fstatfs``: on a FUSE or NFS file a request to that
    filesystem, so asked here in the worker thread too)."""
    fd = os.open(path, flags)
    try:
        twin = fileio.open_direct_twin(fd, flags, "source") if direct else None
        return fd, twin, fileio.inline_capable(fd)
    except BaseException:
        close_fd(fd, path)
        raise


def set_owner_and_mode(fd: int, owner: tuple[int, int] | None, mode: int) -> os.stat_result:
    """Give the new file or directory ``fd`` its ``owner`` (None: leave it) and exactly ``mode``
    (the process umask applied at creation is not the caller's); returns its attributes."""
    if owner is not None:
        os.fchown(fd, *owner)  # first: a chown clears set-user-ID and set-group-ID bits
    st = os.fstat(fd)
    if stat.S_ISDIR(st.st_mode):
        mode |= st.st_mode & stat.S_ISGID  # inherited from a set-group-ID parent, as mkdir(2) does
    if stat.S_IMODE(st.st_mode) != mode:
        os.fchmod(fd, mode)
        st = os.fstat(fd)
    return st


def create_file(path: str, fd_flags: int, mode: int, owner: tuple[int, int] | None,
                direct: bool = False) -> tuple[int, int | None, bool, os.stat_result] | None:
    """Create ``path`` exclusively and open it with ``fd_flags``; None if the name exists.

    Returns the descriptor, its O_DIRECT twin (if ``direct``), whether its I/O may run inline,
    and its attributes. Owner and mode
    are set through the descriptor before it is returned, so they reach the file that was
    created whatever happens to its name meanwhile. On failure nothing is left behind.
    """
    try:
        fd = os.open(path, fd_flags | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError:
        return None
    try:
        st = set_owner_and_mode(fd, owner, mode)
        twin = fileio.open_direct_twin(fd, fd_flags, "source") if direct else None
        return fd, twin, fileio.inline_capable(fd), st
    except BaseException:
        _unlink_if_same(path, fd)
        close_fd(fd, path)
        raise


def _unlink_if_same(path: str, fd: int) -> None:
    """Remove ``path`` if it still names the file open as ``fd``."""
    with contextlib.suppress(OSError):
        mine, now = os.fstat(fd), os.lstat(path)
        if (mine.st_dev, mine.st_ino) == (now.st_dev, now.st_ino):
            os.unlink(path)


def make_dir(path: str, mode: int, owner: tuple[int, int] | None) -> os.stat_result:
    os.mkdir(path, mode)
    try:
        # Not by path: between mkdir and chown the name could be renamed away and replaced.
        # O_NOFOLLOW | O_DIRECTORY: whatever took the name, never a symlink or a file.
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            return set_owner_and_mode(fd, owner, mode)
        finally:
            os.close(fd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.rmdir(path)  # only if still empty: nothing of anyone else's goes
        raise


def apply_setattr(path: str, fd: int | None, follow: bool, attr: pyfuse3.EntryAttributes,
                  fields: pyfuse3.SetattrFields) -> os.stat_result:
    """The blocking part of ``setattr``, on ``fd`` (which it closes) if given, else on
    ``path``; returns the new attributes (``follow``: stat through a symlink, as getattr does
    for image nodes)."""
    try:
        _apply_setattr_fields(path, fd, attr, fields)
        if fd is not None:
            return os.fstat(fd)
        return os.stat(path) if follow else os.lstat(path)
    finally:
        if fd is not None:
            os.close(fd)


def _apply_setattr_fields(path: str, fd: int | None, attr: pyfuse3.EntryAttributes,
                          fields: pyfuse3.SetattrFields) -> None:
    if fields.update_size:
        if fd is not None:
            os.ftruncate(fd, attr.st_size)
        else:
            os.truncate(path, attr.st_size)
    if fields.update_mode:
        if fd is not None:
            os.fchmod(fd, stat.S_IMODE(attr.st_mode))
        else:
            # The kernel resolves symlinks before chmod, so path is never a symlink here.
            os.chmod(path, stat.S_IMODE(attr.st_mode))
    if fields.update_uid or fields.update_gid:
        uid = attr.st_uid if fields.update_uid else -1
        gid = attr.st_gid if fields.update_gid else -1
        if fd is not None:
            os.fchown(fd, uid, gid)
        else:
            os.chown(path, uid, gid, follow_symlinks=False)
    if fields.update_atime or fields.update_mtime:
        cur = os.fstat(fd) if fd is not None else os.lstat(path)
        atime = attr.st_atime_ns if fields.update_atime else cur.st_atime_ns
        mtime = attr.st_mtime_ns if fields.update_mtime else cur.st_mtime_ns
        if fd is not None:
            os.utime(fd, ns=(atime, mtime))
        else:
            os.utime(path, ns=(atime, mtime), follow_symlinks=False)
