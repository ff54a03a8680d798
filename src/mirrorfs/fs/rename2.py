"""``renameat2(2)``: rename with ``RENAME_NOREPLACE`` or ``RENAME_EXCHANGE`` in one atomic call.

Python's ``os.rename`` has no flags, and "check that the new name is free, then rename" lets a
file created in between be replaced. The kernel does the check and the rename under the
directory locks, so the FUSE layer passes the caller's flags straight through. A filesystem that
cannot honour a flag answers EINVAL, as it would to a local caller; no emulation is attempted
(``link`` + ``unlink`` is not atomic for files and impossible for directories).
"""

from __future__ import annotations

import ctypes
import errno
import os

RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2

_AT_FDCWD = -100

try:
    _renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    _renameat2.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint)
    _renameat2.restype = ctypes.c_int
except (OSError, AttributeError):  # a libc older than glibc 2.28
    _renameat2 = None


def rename2(old: str | bytes, new: str | bytes, flags: int = 0) -> None:
    """Rename ``old`` to ``new`` as ``renameat2(AT_FDCWD, old, AT_FDCWD, new, flags)`` does.

    Raises:
        OSError: as renameat2 does: EEXIST (``RENAME_NOREPLACE`` and ``new`` exists), ENOENT
            (``RENAME_EXCHANGE`` and ``new`` does not exist), EINVAL (flags this filesystem or
            libc cannot honour), and every error of rename(2).
    """
    if not flags:
        os.rename(old, new)
        return
    if _renameat2 is None:
        raise OSError(errno.EINVAL, "renameat2 is not available", old)
    if _renameat2(_AT_FDCWD, os.fsencode(old), _AT_FDCWD, os.fsencode(new), flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), old, None, new)
