"""A writer through a mount with O_DIRECT: random aligned writes, optionally each timed and synced.

O_DIRECT keeps the kernel from merging or caching the writes, so each ``pwrite`` is one
request of exactly the block size at the file system under the mount.
"""

from __future__ import annotations

import mmap
import os
import time
from pathlib import Path

import numpy as np


def random_offsets(size: int, block: int, count: int, seed: int) -> list[int]:
    """``count`` block-aligned offsets spread at random over a file of ``size`` bytes."""
    rng = np.random.default_rng(seed)
    return [int(x) * block for x in rng.integers(0, size // block, size=count)]


def _aligned(block: int, seed: int) -> mmap.mmap:
    # An anonymous mapping is page-aligned, as O_DIRECT needs.
    buf = mmap.mmap(-1, block)
    buf[:] = np.random.default_rng(seed).integers(1, 2**63, size=block // 8, dtype=np.uint64).tobytes()
    return buf


def write_blocks(path: Path, offsets: list[int], block: int, seed: int) -> None:
    """Write one block at each offset with O_DIRECT, then ``fdatasync`` once (a guest flush)."""
    buf = _aligned(block, seed)
    fd = os.open(path, os.O_WRONLY | os.O_DIRECT)
    try:
        for off in offsets:
            if os.pwrite(fd, buf, off) != block:
                raise OSError(f"short write to {path} at {off}")
        os.fdatasync(fd)
    finally:
        os.close(fd)
        buf.close()


def timed_writes(path: Path, offsets: list[int], block: int, seed: int) -> tuple[list[float], list[float]]:
    """Each ``pwrite`` (O_DIRECT), then its ``fdatasync``, timed: (write, write+sync) in seconds."""
    buf = _aligned(block, seed)
    writes, synced = [], []
    fd = os.open(path, os.O_WRONLY | os.O_DIRECT)
    try:
        for off in offsets:
            t0 = time.perf_counter()
            if os.pwrite(fd, buf, off) != block:
                raise OSError(f"short write to {path} at {off}")
            t1 = time.perf_counter()
            os.fdatasync(fd)
            t2 = time.perf_counter()
            writes.append(t1 - t0)
            synced.append(t2 - t0)
    finally:
        os.close(fd)
        buf.close()
    return writes, synced
