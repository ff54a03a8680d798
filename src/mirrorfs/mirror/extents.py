"""Where a file has data: SEEK_DATA / SEEK_HOLE, with the end-of-file case spelled out once.

The copy task uses these to copy holes as zero writes (the target stays as sparse as the
source) and ``sync=top`` to mark only the allocated extents dirty.
"""

from __future__ import annotations

import errno
import os


def next_data(fd: int, offset: int) -> int | None:
    """The first data offset at or after ``offset``; None when only a hole follows (ENXIO).

    Raises:
        OSError: any other lseek failure (the caller decides whether to assume data).
    """
    try:
        return os.lseek(fd, offset, os.SEEK_DATA)
    except OSError as exc:
        if exc.errno == errno.ENXIO:
            return None
        raise


def allocated_extents(path: str, size: int) -> list[tuple[int, int]]:
    """The data extents ``(offset, length)`` of the file at ``path`` below ``size``."""
    extents = []
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        offset = 0
        while offset < size:
            start = next_data(fd, offset)
            if start is None:
                break
            end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
            if end > start:
                extents.append((start, end - start))
            offset = end
    finally:
        os.close(fd)
    return extents
