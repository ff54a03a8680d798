"""Property tests of DirtyBitmap against a reference model: a Python set of cluster indices.

Unaligned and zero-length ranges, the partial last cluster (image sizes that are not a multiple of
the granularity), runs from arbitrary starts (with the run finder's chunking shrunk so chunk
boundaries are crossed), merge, copy, counts.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from mirrorfs.bitmap import DirtyBitmap
from mirrorfs.bitmap import memory
from mirrorfs.errors import UsageError

GRANULARITIES = [4096, 8192, 65536]


# ---- the model ----------------------------------------------------------------------------------
def touched(off: int, length: int, g: int) -> range:
    return range(off // g, (off + length - 1) // g + 1) if length else range(0)


def inside(off: int, length: int, g: int, size: int) -> range:
    if not length:
        return range(0)
    first = -(-off // g)
    end = -(-size // g) if off + length == size else (off + length) // g
    return range(first, max(first, end))


def cluster_bytes(c: int, g: int, size: int) -> int:
    return min((c + 1) * g, size) - c * g


def model_runs(dirty: set[int], g: int, size: int, start: int = 0, max_length: int | None = None):
    if start >= size:
        return []
    first_cluster = start // g
    runs, cur = [], None
    for c in sorted(x for x in dirty if x >= first_cluster):
        if cur and cur[1] == c:
            cur[1] = c + 1
        else:
            if cur:
                runs.append(cur)
            cur = [c, c + 1]
    if cur:
        runs.append(cur)
    out = []
    piece = None if max_length is None else max_length - max_length % g
    for a, b in runs:
        off, stop = a * g, min(b * g, size)
        while off < stop:
            n = stop - off if piece is None else min(piece, stop - off)
            out.append((off, n))
            off += n
    return out


# ---- strategies ---------------------------------------------------------------------------------
@st.composite
def image(draw, max_clusters: int = 300):
    g = draw(st.sampled_from(GRANULARITIES))
    clusters = draw(st.integers(1, max_clusters))
    partial = draw(st.sampled_from([0, 0, 1, g // 2, g - 1]))
    size = (clusters - 1) * g + (partial or g)
    return size, g


def ranges(size: int):
    return st.integers(0, size).flatmap(
        lambda off: st.tuples(st.just(off), st.one_of(st.just(0), st.integers(0, size - off),
                                                      st.integers(0, min(size - off, 3)))))


# ---- stateful machine ---------------------------------------------------------------------------
class BitmapMachine(RuleBasedStateMachine):
    @initialize(img=image())
    def setup(self, img):
        self.size, self.g = img
        self.bm = DirtyBitmap(self.size, self.g)
        self.model: set[int] = set()
        self.clusters = -(-self.size // self.g)

    @rule(data=st.data())
    def mark(self, data):
        off, length = data.draw(ranges(self.size))
        want = set(touched(off, length, self.g))
        assert self.bm.mark(off, length) == len(want - self.model)
        self.model |= want

    @rule(data=st.data())
    def clear(self, data):
        off, length = data.draw(ranges(self.size))
        self.bm.clear(off, length)
        self.model -= set(inside(off, length, self.g, self.size))

    @rule(data=st.data())
    def is_dirty(self, data):
        off, length = data.draw(ranges(self.size))
        assert self.bm.is_dirty(off, length) == bool(set(touched(off, length, self.g)) & self.model)

    @rule(data=st.data())
    def mark_clusters(self, data):
        idx = data.draw(st.lists(st.integers(0, self.clusters - 1), max_size=20))
        self.bm.mark_clusters(np.array(idx, dtype=np.int64))
        self.model |= set(idx)

    @rule(data=st.data())
    def merge(self, data):
        other = DirtyBitmap(self.size, self.g)
        extra: set[int] = set()
        for off, length in data.draw(st.lists(ranges(self.size), max_size=4)):
            other.mark(off, length)
            extra |= set(touched(off, length, self.g))
        before = other.to_bytes()
        self.bm.merge(other)
        self.model |= extra
        assert other.to_bytes() == before  # the argument is untouched

    @rule(fill=st.booleans())
    def all_(self, fill):
        if fill:
            self.bm.set_all()
            self.model = set(range(self.clusters))
        else:
            self.bm.clear_all()
            self.model = set()

    @rule(data=st.data())
    def copy_is_independent(self, data):
        c = self.bm.copy()
        off, length = data.draw(ranges(self.size))
        c.mark(off, length)
        c.clear(0, self.size)
        assert c.count() == 0
        assert self.bm.count() == len(self.model)

    @rule(data=st.data(), chunk=st.sampled_from([1, 2, 3, memory._RUN_CHUNK_WORDS]))
    def runs_from(self, data, chunk):
        start = data.draw(st.integers(0, self.size + self.g))
        max_length = data.draw(st.one_of(st.none(), st.integers(self.g, 5 * self.g)))
        saved = memory._RUN_CHUNK_WORDS
        memory._RUN_CHUNK_WORDS = chunk  # cross chunk boundaries with small bitmaps
        try:
            got = list(self.bm.runs(start, max_length=max_length))
        finally:
            memory._RUN_CHUNK_WORDS = saved
        assert got == model_runs(self.model, self.g, self.size, start, max_length)
        nd = self.bm.next_dirty(start)
        want = model_runs(self.model, self.g, self.size, start)
        assert nd == (want[0] if want else None)

    @invariant()
    def counts(self):
        if not hasattr(self, "bm"):
            return
        assert self.bm.count() == len(self.model)
        assert self.bm.dirty_bytes() == sum(cluster_bytes(c, self.g, self.size) for c in self.model)
        bits = np.unpackbits(np.frombuffer(self.bm.to_bytes(), np.uint8), bitorder="little")
        assert set(np.flatnonzero(bits).tolist()) == self.model  # also: tail bits stay zero

    @invariant()
    def all_runs(self):
        if hasattr(self, "bm"):
            assert list(self.bm.runs()) == model_runs(self.model, self.g, self.size)


BitmapMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=30, deadline=None)
TestBitmapModel = BitmapMachine.TestCase


# ---- focused properties -------------------------------------------------------------------------
@settings(max_examples=200, deadline=None)
@given(img=image(max_clusters=20000), data=st.data())
def test_sparse_large_bitmaps_runs_and_next_dirty(img, data):
    """Bitmaps of up to 20000 clusters (300+ words): next_dirty's widening scan and the runs
    listing agree with the model from arbitrary positions."""
    size, g = img
    bm = DirtyBitmap(size, g)
    model: set[int] = set()
    for off, length in data.draw(st.lists(ranges(size), max_size=6)):
        bm.mark(off, length)
        model |= set(touched(off, length, g))
    for off, length in data.draw(st.lists(ranges(size), max_size=3)):
        bm.clear(off, length)
        model -= set(inside(off, length, g, size))
    assert list(bm.runs()) == model_runs(model, g, size)
    pos, walked = 0, []
    while (nd := bm.next_dirty(pos)) is not None:
        walked.append(nd)
        pos = nd[0] + nd[1]
    assert walked == model_runs(model, g, size)
    start = data.draw(st.integers(0, size))
    assert list(bm.runs(start)) == model_runs(model, g, size, start)
    assert bm.dirty_bytes() == sum(cluster_bytes(c, g, size) for c in model)


@settings(deadline=None)
@given(img=image(), data=st.data())
def test_clear_of_a_run_leaves_it_clean_only_when_whole(img, data):
    """The engine's copy loop: copy (offset, length) from runs(max_length=...), clear it: the
    bitmap ends empty, whatever the size's remainder."""
    size, g = img
    bm = DirtyBitmap(size, g)
    for off, length in data.draw(st.lists(ranges(size), max_size=5)):
        bm.mark(off, length)
    ml = data.draw(st.one_of(st.none(), st.integers(g, 4 * g)))
    for off, length in list(bm.runs(max_length=ml)):
        bm.clear(off, length)
    assert bm.count() == 0 and bm.dirty_bytes() == 0 and bm.next_dirty() is None


def test_partial_last_cluster_examples():
    g = 65536
    bm = DirtyBitmap(2 * g + 100, g)
    assert bm.clusters == 3
    assert bm.mark(2 * g + 99, 1) == 1
    assert bm.dirty_bytes() == 100
    assert list(bm.runs()) == [(2 * g, 100)]
    bm.clear(2 * g, 99)  # does not reach the end: the cluster is not wholly covered
    assert bm.count() == 1
    bm.clear(2 * g, 100)  # reaches the image end: the partial cluster counts as whole
    assert bm.count() == 0
    bm.mark(g - 1, 2)  # unaligned 2 bytes touch two clusters
    assert list(bm.runs()) == [(0, 2 * g)]
    bm.clear(1, 2 * g - 1)  # only cluster 1 is wholly inside
    assert list(bm.runs()) == [(0, g)]
    assert bm.mark(5, 0) == 0 and not bm.is_dirty(5, 0)


@pytest.mark.parametrize("g", [0, 1000, 2048, 3 * 4096, 128 << 20, True])
def test_bad_granularity(g):
    with pytest.raises(UsageError, match="granularity"):
        DirtyBitmap(1 << 20, g)


def test_out_of_range_and_mismatch_are_usage_errors():
    bm = DirtyBitmap(1 << 20)
    for call in (lambda: bm.mark(-1, 1), lambda: bm.mark(1 << 20, 1), lambda: bm.clear(0, (1 << 20) + 1),
                 lambda: bm.is_dirty(-5, 1), lambda: bm.mark_clusters(np.array([16])),
                 lambda: bm.runs(0, max_length=4095), lambda: bm.runs(-1), lambda: bm.next_dirty(-1),
                 lambda: bm.merge(DirtyBitmap(1 << 21))):
        with pytest.raises(UsageError):
            call()
    assert bm.count() == 0


def test_half_dirty_1tib_is_listed_quickly():
    """16 Mi clusters, every other 1 MiB dirty: 524288 runs; the whole listing is vectorised."""
    import time

    bm = DirtyBitmap.from_words(1 << 40, 65536,
                                np.full(1 << 18, 0x0000FFFF0000FFFF, dtype=np.uint64))
    assert bm._words.nbytes == 2 << 20
    t = time.perf_counter()
    runs = list(bm.runs())
    elapsed = time.perf_counter() - t
    assert len(runs) == 1 << 19 and runs[1] == (2 << 20, 1 << 20) and runs[-1][1] == 1 << 20
    assert bm.dirty_bytes() == 1 << 39
    assert elapsed < 5  # generous on a shared machine; about 0.1 s normally
