"""SIGKILL at a random moment never loses an acknowledged mark.

A forked child opens a persistent bitmap and marks, clears and commits random ranges, reporting
each completed operation over a pipe; the parent SIGKILLs it at a random moment, reads the file
and checks that every cluster whose last acknowledged operation was a mark is set in the file
(a clear only ever clears memory until a commit, and a commit never clears a re-marked cluster).
Repeated for 60 seeds; some kills land while the child is still opening the file (its atomic
header rewrite), and the file must then still be valid.
"""

from __future__ import annotations

import os
import random
import select
import signal
import struct
import time

import numpy as np
import pytest

from mirrorfs.bitmap import PersistentBitmap
from mirrorfs.bitmap.persistent import read_bitmap_file

ACK = struct.Struct("<cQQ")  # op, offset, length: 17 bytes, atomic in a pipe
SEEDS = range(60)


def _child(path: str, size: int, seed: int, wfd: int) -> None:
    """Runs in the forked child; never returns."""
    try:
        rng = random.Random(seed ^ 0x5EED)
        bm = PersistentBitmap.open(path, size=size)
        g = bm.granularity
        os.write(wfd, ACK.pack(b"R", 0, 0))
        token = None
        while True:
            r = rng.random()
            off = rng.randrange(size)
            length = min(size - off, rng.choice([1, 512, 4096, g, 3 * g + 7, 40 * g]))
            if r < 0.6:
                bm.mark(off, length)
                os.write(wfd, ACK.pack(b"M", off, length))
            elif r < 0.85:
                bm.clear(off, length)
                os.write(wfd, ACK.pack(b"C", off, length))
            elif r < 0.92:
                token = bm.begin_clear_commit()
            elif r < 0.98:
                if token is not None:
                    bm.finish_clear_commit(token)
                    token = None
            else:
                bm.flush()
    finally:
        os._exit(0)


def _read_acks(rfd: int, buf: bytearray, deadline: float | None, *, until_len: int | None = None) -> bool:
    """Read what arrives until the deadline (None: until EOF) or until ``buf`` holds
    ``until_len`` bytes. Returns False at EOF."""
    while until_len is None or len(buf) < until_len:
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        ready, _, _ = select.select([rfd], [], [], timeout)
        if not ready:
            return True
        chunk = os.read(rfd, 65536)
        if not chunk:
            return False
        buf += chunk
        if deadline is not None and time.monotonic() >= deadline:
            return True
    return True


@pytest.mark.timeout(60)
def test_sigkill_never_loses_an_acknowledged_mark(tmp_path):
    started = time.monotonic()
    total_marks = 0
    early_kills = 0
    for seed in SEEDS:
        rng = random.Random(seed)
        g = rng.choice([4096, 65536])
        size = rng.randrange(1, 3000) * g - rng.choice([0, 0, 1, g // 2])
        path = str(tmp_path / f"job{seed}.bitmap")
        PersistentBitmap.create(path, size, g, source_id="s", target_id="t",
                                fill=rng.random() < 0.2).close()
        rfd, wfd = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - child
            os.close(rfd)
            _child(path, size, seed, wfd)
        os.close(wfd)
        buf = bytearray()
        try:
            if rng.random() < 0.15:
                # kill while it is still opening (imports are done: fork), i.e. around the atomic
                # rewrite of the header
                time.sleep(rng.uniform(0, 0.004))
                early_kills += 1
            else:
                _read_acks(rfd, buf, time.monotonic() + 10, until_len=ACK.size)
                assert len(buf) >= ACK.size, "the child did not open the bitmap within 10 s"
                _read_acks(rfd, buf, time.monotonic() + rng.uniform(0, 0.08))
            os.kill(pid, signal.SIGKILL)
            _, status = os.waitpid(pid, 0)
            assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
            _read_acks(rfd, buf, None)  # acks written before the kill count too
        finally:
            os.close(rfd)
            try:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass

        header, data = read_bitmap_file(path)  # still a valid file, whatever the moment
        assert header.image_size == size and header.granularity == g
        bits = np.unpackbits(np.frombuffer(data, np.uint8, offset=4096), bitorder="little")
        acks = [ACK.unpack_from(buf, i) for i in range(0, len(buf) - len(buf) % ACK.size, ACK.size)]
        if acks:
            assert acks[0][0] == b"R"
            assert header.generation == 2 and not header.clean
        # last acknowledged operation per cluster: 1 = mark (must be set), 0 = clear / none
        must = np.zeros(len(bits), dtype=bool)
        clusters = -(-size // g)
        for op, off, length in acks[1:]:
            if op == b"M":
                must[off // g:(off + length - 1) // g + 1] = True
                total_marks += 1
            else:
                first = -(-off // g)
                end = clusters if off + length == size else (off + length) // g
                must[first:max(first, end)] = False
        missing = np.flatnonzero(must & ~bits.astype(bool))
        assert len(missing) == 0, f"seed {seed}: acknowledged marks lost for clusters {missing[:10]}"
    assert total_marks > 1000  # the kills did land in the middle of real work
    assert early_kills >= 3
    assert time.monotonic() - started < 30
