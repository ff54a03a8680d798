"""A mount's state directory (``mirrorfs mount --state-dir DIR``): its persistent jobs.

Layout: ``DIR/lock`` (held with ``flock(LOCK_EX)`` by the one mount that uses the directory),
``DIR/job-ID.json`` (one :class:`JobRecord` per persistent job, ``state/record.py``), and by
default the job's ``DIR/job-ID.bitmap`` and ``DIR/job-ID.journal``.

Safety: the directory is made 0700 if it does not exist; one that is a symbolic link, is owned by
another user, or that others may write is refused (whoever can write it can plant a record that
makes the next mount mirror an image anywhere). Every file is reached relative to the directory's
descriptor, never through a symbolic link. A record is saved atomically (temp file, fsync, rename,
fsync of the directory), so a crash leaves the old record or the new one, never a torn one.
"""

from __future__ import annotations

import errno
import fcntl
import os
import secrets
import stat
from collections.abc import Callable
from typing import Any

from ..errors import MirrorfsError, StateDirError
from . import record as rec
from .record import JobRecord

LOCK_NAME = "lock"
_PREFIX, _SUFFIX = "job-", ".json"
_OPEN_FLAGS = os.O_NOFOLLOW | os.O_CLOEXEC


def record_name(job_id: str) -> str:
    """The file name of a job's record."""
    return f"{_PREFIX}{rec.check_job_id(job_id)}{_SUFFIX}"


class StateDir:
    """An open, locked state directory. Build one with :meth:`open`; :meth:`close` releases it.

    Attributes:
        path: the directory (absolute).
    """

    def __init__(self, path: str, fd: int, lock_fd: int) -> None:
        self.path = path
        self._fd = fd
        self._lock_fd = lock_fd

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> "StateDir":
        """Open (creating it 0700 if missing) and lock a state directory.

        Raises:
            StateDirError: a symbolic link, not a directory, another user's, writable by others,
                used by another mount, or cannot be created.
        """
        path = os.path.abspath(os.fspath(path))
        fd = open_private_dir(path, "state directory")
        try:
            lock_fd = cls._lock(fd, path)
        except BaseException:
            os.close(fd)
            raise
        self = cls(path, fd, lock_fd)
        self._remove_temp_files()
        return self

    @staticmethod
    def _lock(fd: int, path: str) -> int:
        try:
            lock_fd = os.open(LOCK_NAME, os.O_RDWR | os.O_CREAT | _OPEN_FLAGS, 0o600, dir_fd=fd)
        except OSError as exc:
            raise StateDirError(f"cannot open {path}/{LOCK_NAME}: {exc.strerror}") from None
        try:
            if not stat.S_ISREG(os.fstat(lock_fd).st_mode):
                raise StateDirError(f"{path}/{LOCK_NAME} is not a regular file: remove it")
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(lock_fd)
            raise StateDirError(f"state directory {path} is in use by another mount: give each "
                                f"mount its own") from None
        except BaseException:
            os.close(lock_fd)
            raise
        return lock_fd

    def _remove_temp_files(self) -> None:
        """Temp files of a save that a crash interrupted: never a record, safe to drop."""
        for name in os.listdir(self._fd):
            if name.startswith("." + _PREFIX) and name.endswith(".tmp"):
                try:
                    os.unlink(name, dir_fd=self._fd)
                except FileNotFoundError:
                    pass

    # -- paths ------------------------------------------------------------------------------------
    def bitmap_path(self, job_id: str) -> str:
        """Where a job's bitmap goes unless ``--bitmap`` names one."""
        return os.path.join(self.path, f"{_PREFIX}{rec.check_job_id(job_id)}.bitmap")

    def journal_path(self, job_id: str) -> str:
        """Where a job's journal goes (beside its bitmap, when that is in the directory)."""
        return os.path.join(self.path, f"{_PREFIX}{rec.check_job_id(job_id)}.journal")

    # -- records ----------------------------------------------------------------------------------
    def save(self, record: JobRecord) -> None:
        """Write (or replace) the job's record atomically and durably.

        Raises:
            StateDirError: the record cannot be written; the previous one (if any) stays.
        """
        self._check_open()
        name = record_name(record.job_id)
        data = rec.encode(record)
        tmp = f".{name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _OPEN_FLAGS, 0o600,
                         dir_fd=self._fd)
            try:
                os.fchmod(fd, 0o600)
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, name, src_dir_fd=self._fd, dst_dir_fd=self._fd)
            os.fsync(self._fd)
        except OSError as exc:
            try:
                os.unlink(tmp, dir_fd=self._fd)
            except OSError:
                pass
            raise StateDirError(f"cannot save the record of job {record.job_id} in {self.path}: "
                                f"{exc.strerror}") from None

    def remove(self, job_id: str) -> bool:
        """Remove the job's record, durably. Its bitmap and journal are the caller's.

        Returns:
            whether there was a record.

        Raises:
            StateDirError: it cannot be removed.
        """
        self._check_open()
        try:
            os.unlink(record_name(job_id), dir_fd=self._fd)
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise StateDirError(f"cannot remove the record of job {job_id} from {self.path}: "
                                f"{exc.strerror}") from None
        os.fsync(self._fd)
        return True

    def load_all(self, check: Callable[[JobRecord], None] | None = None
                 ) -> tuple[list[JobRecord], list[str]]:
        """Every record of the directory, validated, in job id order.

        Args:
            check: called with each well-formed record; it raises a :class:`MirrorfsError` when
                the record does not match the images (the image is gone, its size changed).

        Returns:
            the good records, and one line per bad record saying which and why (the file is
            left as it is: the user decides).
        """
        self._check_open()
        good: list[JobRecord] = []
        errors: list[str] = []
        for name in sorted(os.listdir(self._fd)):
            if not (name.startswith(_PREFIX) and name.endswith(_SUFFIX)):
                continue
            where = os.path.join(self.path, name)
            try:
                record = rec.decode(self._read(name), name=where)
                if record_name(record.job_id) != name:
                    raise StateDirError(f"state record {where} holds job {record.job_id!r}: "
                                        f"remove the file or rename it to "
                                        f"{record_name(record.job_id)}")
                if check is not None:
                    check(record)
            except MirrorfsError as exc:
                errors.append(str(exc))
                continue
            good.append(record)
        return good, errors

    def _read(self, name: str) -> bytes:
        where = os.path.join(self.path, name)
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NONBLOCK | _OPEN_FLAGS, dir_fd=self._fd)
        except OSError as exc:
            why = "a symbolic link" if exc.errno == errno.ELOOP else exc.strerror
            raise StateDirError(f"state record {where} cannot be read: {why}") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_size > 1 << 20:
                raise StateDirError(f"state record {where} is not a regular file of at most "
                                    f"1 MiB: remove it")
            return os.read(fd, st.st_size + 1)
        finally:
            os.close(fd)

    # -- lifetime ---------------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._fd < 0:
            raise StateDirError(f"state directory {self.path} is closed")

    def close(self) -> None:
        """Release the lock. Idempotent."""
        if self._fd >= 0:
            os.close(self._lock_fd)
            os.close(self._fd)
            self._fd = self._lock_fd = -1

    def __enter__(self) -> "StateDir":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_private_dir(path: str, what: str, *, fix_mode: bool = False) -> int:
    """Open ``path`` as a directory of this user's that nobody else may write, creating it 0700
    if it is missing; never through a symbolic link (whoever could write it, or swap it for a
    link, could plant files that we then trust).

    Args:
        what: how messages name it ("state directory").
        fix_mode: make a directory of ours 0700 instead of refusing one that others may write.

    Returns:
        a descriptor of the directory (``O_DIRECTORY``), the caller's to close.

    Raises:
        StateDirError: a symbolic link, not a directory, another user's, writable by others, or
            it cannot be created or opened.
    """
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    except OSError as exc:
        raise StateDirError(f"cannot create {what} {path}: {exc.strerror}") from None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | _OPEN_FLAGS)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            kind = "a symbolic link" if os.path.islink(path) else "not a directory"
            raise StateDirError(f"{what} {path} is {kind}: give a directory of your own") from None
        raise StateDirError(f"cannot open {what} {path}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if st.st_uid != os.geteuid():
            raise StateDirError(f"{what} {path} belongs to uid {st.st_uid}, not to you: give a "
                                f"directory of your own")
        if stat.S_IMODE(st.st_mode) != 0o700 and fix_mode:
            os.fchmod(fd, 0o700)
        elif st.st_mode & 0o022:
            raise StateDirError(f"{what} {path} is writable by others (mode "
                                f"{stat.S_IMODE(st.st_mode):04o}): chmod 700 it")
    except OSError as exc:
        os.close(fd)
        raise StateDirError(f"cannot make {what} {path} private: {exc.strerror}") from None
    except BaseException:
        os.close(fd)
        raise
    return fd


def image_checker(source_dir: str | os.PathLike[str]) -> Callable[[JobRecord], None]:
    """A :meth:`StateDir.load_all` check: the record's image exists in ``source_dir`` as a regular
    file (not through a symbolic link) of the size the record holds.

    Raises (from the returned callable):
        StateDirError: the image is gone, is not a regular file, or changed size.
    """
    root = os.fspath(source_dir)

    def check(record: JobRecord) -> None:
        path = os.path.join(root, record.image)
        try:
            st: Any = os.lstat(path)
        except OSError as exc:
            raise StateDirError(f"persistent job {record.job_id}: image {record.image} is gone "
                                f"from {root} ({exc.strerror}): restore it, or remove the job's "
                                f"record to drop the job") from None
        if not stat.S_ISREG(st.st_mode):
            raise StateDirError(f"persistent job {record.job_id}: image {record.image} is not a "
                                f"regular file any more: restore it, or remove the job's record")
        if st.st_size != record.image_size:
            raise StateDirError(f"persistent job {record.job_id}: image {record.image} has "
                                f"{st.st_size} bytes, but the job was recorded with "
                                f"{record.image_size}: the replica cannot follow a resize; remove "
                                f"the record and start the job again with --sync full")
    return check
