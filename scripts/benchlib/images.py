"""Test images and their page-cache state.

A fully written image has distinct non-zero data in every 4 KiB block, so no copy can take
a shortcut over zeroes or repeated blocks.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from benchlib.procs import BenchError, run

MIB = 1 << 20
GIB = 1 << 30


def write_image(path: Path, size: int, seed: int, *, sync: bool = False) -> None:
    """Write ``size`` bytes to ``path``; with ``sync``, fsync before returning."""
    chunk = 16 * MIB
    rng = np.random.default_rng(seed)
    block = rng.integers(1, 2**63, size=chunk // 8, dtype=np.uint64)
    with open(path, "wb") as f:
        for off in range(0, size, chunk):
            # Stamp each 4 KiB block with its offset so no two blocks are equal.
            block[:: 4096 // 8] = np.arange(off, off + chunk, 4096, dtype=np.uint64) | (1 << 63)
            f.write(block.tobytes()[: min(chunk, size - off)])
        if sync:
            os.fsync(f.fileno())


def write_sparse_image(path: Path, size: int, data: int, seed: int) -> None:
    """A sparse image of ``size`` with ``data`` bytes written in 1 MiB pieces spread evenly."""
    rng = np.random.default_rng(seed)
    n = data // MIB
    stride = size // n
    with open(path, "wb") as f:
        f.truncate(size)
        for i in range(n):
            f.seek(i * stride)
            f.write(rng.integers(1, 2**63, size=MIB // 8, dtype=np.uint64).tobytes())


def same_content(a: Path, b: Path) -> bool:
    return run(["cmp", "-s", str(a), str(b)], check=False, timeout=600).returncode == 0


def allocated(path: Path) -> int:
    """Bytes allocated to ``path`` (``st_blocks``, as du counts them)."""
    return os.stat(path).st_blocks * 512


def drop_cache(path: Path) -> None:
    """Write back ``path`` and drop its pages from the page cache (whoever wrote them)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def resident(path: Path) -> int:
    """Bytes of ``path`` in the page cache (``fincore``)."""
    out = run(["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)], check=False)
    try:
        return int(out.stdout.split()[0])
    except (IndexError, ValueError):
        raise BenchError(f"fincore {path}: {out.stderr.strip() or out.stdout.strip()}") from None
