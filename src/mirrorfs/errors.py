"""The one exception hierarchy of mirrorfs.

Every error a user can meet is a ``MirrorfsError`` whose message says what was wrong and what to
do about it. Errors are translated only at the edges: the FUSE layer turns them into
``FUSEError(errno)``, the QMP server into ``{"error": {"class", "desc"}}``, the CLI into one line on
stderr and an exit code. Anything else that escapes is a bug and is allowed to crash.

::

    MirrorfsError
    ├── UsageError              bad input: malformed value, unknown image (CLI exit 2, EINVAL)
    │   ├── ImageNotFoundError      no such image in the mount (QMP DeviceNotFound)
    │   └── JobNotFoundError        no job with that id (QMP DeviceNotActive)
    ├── StateError              valid command the current state forbids (CLI exit 1, EBUSY)
    ├── AccessDeniedError       the caller may not do this (EACCES)
    ├── MountError              mount / unmount could not be done (CLI exit 2)
    ├── FileFormatError         a job's file beside its image is unusable (CLI exit 2, EINVAL)
    │   ├── BitmapFormatError       a bitmap file that is truncated, corrupt or mismatched
    │   └── JournalFormatError      a write journal whose header is corrupt or mismatched
    ├── JournalFullError        the write journal reached its bound: resync from the bitmap
    ├── StateDirError           a --state-dir that is unsafe, in use, or holds a bad record
    ├── VerifyNotFinishedError  an online verify ended early (CLI exit 3)
    ├── SourceError             the job's read of the source image failed (carries the errno)
    ├── TargetError             the target failed an operation
    │   ├── TargetRetryableError    connection lost, timeout: reconnect and go on
    │   ├── TargetNoSpaceError      ENOSPC from the target (io-status "nospace")
    │   └── TargetFatalError        wrong size, read-only, refused: do not write to it
    ├── ProtocolError           a wire protocol (QMP, NBD) was broken
    │   ├── LocalProtocolError      ... by us
    │   └── RemoteProtocolError     ... by the peer
    └── ControlError            a control command failed; carries a QMP error class
"""

from __future__ import annotations

import errno as _errno


class MirrorfsError(Exception):
    """Base of every error mirrorfs reports to a user."""

    #: CLI exit code when this error ends a command.
    exit_code: int = 2
    #: errno when this error answers a FUSE request (e.g. a write to ``.mirrorfs/control``).
    errno: int = _errno.EIO
    #: QMP error class when this error answers a QMP command.
    qmp_class: str = "GenericError"


class UsageError(MirrorfsError):
    """The input is malformed: a bad value, an unknown image, an unreadable file."""

    exit_code = 2
    errno = _errno.EINVAL


class ImageNotFoundError(UsageError):
    """The named image does not exist in the mount (or is not a regular file)."""

    qmp_class = "DeviceNotFound"


class JobNotFoundError(UsageError):
    """No mirror job has the given id."""

    qmp_class = "DeviceNotActive"


class StateError(MirrorfsError):
    """The command is valid but the current state forbids it (e.g. complete before ready)."""

    exit_code = 1
    errno = _errno.EBUSY


class AccessDeniedError(MirrorfsError):
    """The caller is not allowed to do this (another user writing ``.mirrorfs/control``)."""

    exit_code = 2
    errno = _errno.EACCES


class MountError(MirrorfsError):
    """A mount or unmount could not be done."""

    exit_code = 2


class FileFormatError(MirrorfsError):
    """A file a job keeps beside its image cannot be used as it is: the subclass says which."""

    exit_code = 2
    errno = _errno.EINVAL


class BitmapFormatError(FileFormatError):
    """A bitmap file is truncated, corrupt, of an unknown version or does not match its image."""


class JournalFormatError(FileFormatError):
    """A write journal file is not one, is corrupt in its header or belongs to another job."""


class JournalFullError(MirrorfsError):
    """The write journal cannot take another record (its bound, or the disk, is full).

    Not a failure of the job: the journal is marked overflowed (durably) and the job falls back to
    a resync driven by its bitmap, which holds every write the journal missed.
    """

    errno = _errno.ENOSPC


class StateDirError(MirrorfsError):
    """A state directory is unsafe or in use, or one of its job records cannot be used."""

    exit_code = 2


class VerifyNotFinishedError(MirrorfsError):
    """An online verify ended before it had compared the whole image (the job ended, its target
    was lost, a read failed): nothing can be said about the clusters it did not reach."""

    exit_code = 3


class SourceError(MirrorfsError):
    """A mirror job could not read its source image (a bad sector, a lost NFS server).

    The job's ``on-source-error`` policy decides what happens; guest requests that hit the same
    error get its errno, as from the source itself.
    """

    def __init__(self, message: str, *, errno: int | None = None) -> None:
        super().__init__(message)
        if errno is not None:
            self.errno = errno


class TargetError(MirrorfsError):
    """A target failed an operation. Carries the errno of the failure where there is one."""

    def __init__(self, message: str, *, errno: int | None = None) -> None:
        super().__init__(message)
        if errno is not None:
            self.errno = errno


class TargetRetryableError(TargetError):
    """The target went away (reset, EOF, timeout); the same request may succeed after reconnecting."""


class TargetNoSpaceError(TargetError):
    """The target is out of space (ENOSPC)."""

    errno = _errno.ENOSPC


class TargetFatalError(TargetError):
    """The target cannot be used at all (read-only, wrong size, wrong export)."""


class ProtocolError(MirrorfsError):
    """A wire protocol was broken; the connection must be closed."""


class LocalProtocolError(ProtocolError):
    """We tried to do something the protocol forbids in the current state."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something the protocol forbids."""


class ControlError(MirrorfsError):
    """A control command failed. ``qmp_class`` is the QMP error class to report."""

    def __init__(self, message: str, *, qmp_class: str = "GenericError", exit_code: int = 1,
                 errno: int = _errno.EBUSY) -> None:
        super().__init__(message)
        self.qmp_class = qmp_class
        self.exit_code = exit_code
        self.errno = errno


class QMPCommandError(ControlError):
    """A QMP server answered a command with an error (seen by the CLI's client).

    The message is the server's ``desc``; ``DeviceNotFound``, ``DeviceNotActive`` (no such job)
    and ``CommandNotFound`` name something that does not exist (bad input, exit 2), every other
    class is a refusal (exit 1).
    """

    def __init__(self, qmp_class: str, desc: str, *, exit_code: int | None = None) -> None:
        # A mirrorfs server says which exit code it means; other servers (or old replies) fall
        # back to the class.
        if exit_code in (1, 2):
            bad_input = exit_code == 2
        else:
            bad_input = qmp_class in ("DeviceNotFound", "DeviceNotActive", "CommandNotFound")
        super().__init__(desc, qmp_class=qmp_class, exit_code=2 if bad_input else 1,
                         errno=_errno.EINVAL if bad_input else _errno.EBUSY)
        self.desc = desc


class QMPConnectError(ControlError):
    """The CLI could not reach a mount's QMP socket (no mount there, or it stopped)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, qmp_class="GenericError", exit_code=2, errno=_errno.ENOTCONN)


def reason_of(exc: BaseException) -> str:
    """What went wrong, for a message: an ``OSError``'s ``strerror`` (no errno number, no
    repeated path), anything else's own text."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc)
