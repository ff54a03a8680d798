"""Byte comparisons for the tests: equal or not, and where not, where they first differ.

Failures raise ``AssertionError`` themselves rather than ``assert a == b``: pytest rewrites the
asserts of test modules, and its diff of two large byte strings ran for minutes. Files are
read here, not by ``qemu-img compare`` or ``cmp``: a running job's target is locked (QEMU's
tools would need ``-U``), and a mirror must match in size too, where ``qemu-img compare``
accepts a longer file whose tail reads as zeros.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from mirrorfs.mirror.extents import next_data

#: what a message calls a cluster: the default granularity of a mirror job
CLUSTER = 64 * 1024
#: how much of each file is read and compared at a time
CHUNK = 4 * 1024 * 1024


def _differences(a: bytes, b: bytes) -> tuple[int, int] | None:
    """The first differing offset and the count of differing bytes over the common length,
    or None when that part is equal."""
    if a == b:
        return None
    length = min(len(a), len(b))
    differ = np.frombuffer(a, np.uint8, length) != np.frombuffer(b, np.uint8, length)
    count = int(np.count_nonzero(differ))
    return (int(np.argmax(differ)), count) if count else None


def _describe(first: int | None, count: int, size_a: int, size_b: int, cluster: int) -> str:
    parts = []
    if size_a != size_b:
        parts.append(f"sizes {size_a} and {size_b}")
    if first is not None:
        parts.append(f"{count} bytes differ, the first at offset {first} "
                     f"(the cluster of {cluster} bytes at {first // cluster * cluster})")
    return "; ".join(parts)


def assert_same_bytes(a: bytes, b: bytes, what: str, *, cluster: int = CLUSTER) -> None:
    """Fail with ``what`` and where ``a`` and ``b`` differ, unless they are equal."""
    if a == b:
        return
    found = _differences(a, b)
    first, count = found if found is not None else (None, 0)
    raise AssertionError(f"{what}: {_describe(first, count, len(a), len(b), cluster)}")


def assert_identical(a: Path, b: Path, *, cluster: int = CLUSTER) -> None:
    """Fail unless files ``a`` and ``b`` hold the same bytes (and size), naming both and
    where they differ. Only what either file holds as data is read: a hole reads as zeros
    in both, and a 16 GiB sparse image holds 64 MiB."""
    size_a, size_b = a.stat().st_size, b.stat().st_size
    first: int | None = None
    count = 0
    fd_a = os.open(a, os.O_RDONLY)
    try:
        fd_b = os.open(b, os.O_RDONLY)
        try:
            offset = 0
            while True:
                starts = [start for start in (next_data(fd_a, offset), next_data(fd_b, offset))
                          if start is not None]
                offset = min(starts, default=size_a)
                if offset >= min(size_a, size_b):
                    break
                found = _differences(os.pread(fd_a, CHUNK, offset), os.pread(fd_b, CHUNK, offset))
                if found is not None:
                    first = offset + found[0] if first is None else first
                    count += found[1]
                offset += CHUNK
        finally:
            os.close(fd_b)
    finally:
        os.close(fd_a)
    if first is not None or size_a != size_b:
        raise AssertionError(f"{a} and {b} differ: "
                             f"{_describe(first, count, size_a, size_b, cluster)}")


def assert_differ(a: Path, b: Path) -> None:
    """Fail if files ``a`` and ``b`` hold the same bytes."""
    try:
        assert_identical(a, b)
    except AssertionError:
        return
    raise AssertionError(f"expected {a} and {b} to differ; they hold the same bytes")
