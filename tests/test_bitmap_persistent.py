"""PersistentBitmap: set bits reach the file at once, clears follow only through the lazy clear
commit protocol (a re-marked cluster stays set), flush is shared, close/open keep the bits."""

from __future__ import annotations

import os
import shutil
import tempfile
import threading

import numpy as np
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from mirrorfs.bitmap import DirtyBitmap, PersistentBitmap
from mirrorfs.errors import UsageError

G = 4096


def file_bits(path: str) -> set[int]:
    """The clusters set in the file, read with plain read() (the page cache the mmap shares)."""
    with open(path, "rb") as f:
        f.seek(4096)
        bits = np.unpackbits(np.frombuffer(f.read(), np.uint8), bitorder="little")
    return set(np.flatnonzero(bits).tolist())


def touched(off: int, length: int) -> set[int]:
    return set(range(off // G, (off + length - 1) // G + 1)) if length else set()


def inside(off: int, length: int, size: int) -> set[int]:
    if not length:
        return set()
    first = -(-off // G)
    end = -(-size // G) if off + length == size else (off + length) // G
    return set(range(first, end))


def test_lazy_clear_protocol_keeps_a_remarked_cluster_set(tmp_path):
    path = str(tmp_path / "b")
    bm = PersistentBitmap.create(path, 64 * G, G, source_id="s", target_id="t", fill=True)
    assert file_bits(path) == set(range(64))

    bm.clear(0, 4 * G)  # clusters 0-3 copied to the target: clean in memory only
    assert bm.count() == 60 and file_bits(path) == set(range(64))

    token = bm.begin_clear_commit()  # before the target flush
    bm.mark(G, 10)  # a guest write to cluster 1 during the flush
    bm.finish_clear_commit(token)  # after the target flush
    assert file_bits(path) == set(range(64)) - {0, 2, 3}  # cluster 1 stays set

    # cleared again after begin: the commit leaves it (its new copy is not covered by the flush)
    bm.clear(4 * G, 2 * G)
    token = bm.begin_clear_commit()
    bm.mark(5 * G, 1)  # written again during the flush ...
    bm.clear(5 * G, G)  # ... and copied again: this copy is not covered by the target flush
    bm.clear(G, G)
    bm.finish_clear_commit(token)
    assert file_bits(path) == set(range(64)) - {0, 2, 3, 4}
    bm.finish_clear_commit(bm.begin_clear_commit())
    assert file_bits(path) == set(range(64)) - {0, 1, 2, 3, 4, 5}

    # close commits nothing implicitly
    bm.clear(6 * G, G)
    bm.close()
    assert file_bits(path) == set(range(6, 64))
    reopened = PersistentBitmap.open(path, size=64 * G)
    assert reopened.count() == 58 and reopened.next_dirty() == (6 * G, 58 * G)
    reopened.close()


def test_clear_token_rules(tmp_path):
    a = PersistentBitmap.create(str(tmp_path / "a"), 8 * G, G, source_id="", target_id="", fill=True)
    b = PersistentBitmap.create(str(tmp_path / "b"), 8 * G, G, source_id="", target_id="", fill=True)
    a.clear(0, G)
    tok = a.begin_clear_commit()
    assert len(tok) == 1 and len(a.begin_clear_commit()) == 0
    with pytest.raises(UsageError):
        b.finish_clear_commit(tok)
    a.finish_clear_commit(tok)
    a.finish_clear_commit(tok)  # twice: no-op
    assert file_bits(str(tmp_path / "a")) == set(range(1, 8))
    a.close()
    b.close()


def test_flush_is_cheap_when_unchanged_and_shared_between_threads(tmp_path):
    path = str(tmp_path / "b")
    bm = PersistentBitmap.create(path, 1 << 30, 65536, source_id="", target_id="", fill=False)
    bm.flush()
    assert bm.statistics()["flushes"] == 0  # nothing changed since the create
    bm.mark(0, 1)
    assert bm.mark(0, 1) == 0
    assert bm.statistics()["file_bits_set"] == 1
    barrier = threading.Barrier(8)

    def worker():
        barrier.wait()
        bm.flush()

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stats = bm.statistics()
    assert stats["flushes"] == 1  # one msync served all eight callers
    assert stats["flushes_shared"] + stats["flushes_skipped"] >= 2  # the create-time one + others
    assert not stats["unsynced_changes"]
    bm.close()


def test_persistent_is_a_dirty_bitmap_and_copies_to_memory(tmp_path):
    bm = PersistentBitmap.create(str(tmp_path / "b"), 10 * G + 1, G, source_id="", target_id="", fill=False)
    assert isinstance(bm, DirtyBitmap)
    other = DirtyBitmap(10 * G + 1, G)
    other.mark(10 * G, 1)
    bm.merge(other)
    bm.mark_clusters(np.array([0, 2]))
    assert file_bits(bm.path) == {0, 2, 10}
    c = bm.copy()
    assert type(c) is DirtyBitmap and list(c.runs()) == [(0, G), (2 * G, G), (10 * G, 1)]
    bm.clear_all()
    assert bm.count() == 0 and file_bits(bm.path) == {0, 2, 10}
    bm.finish_clear_commit(bm.begin_clear_commit())
    assert file_bits(bm.path) == set()
    bm.set_all()
    assert file_bits(bm.path) == set(range(11))
    bm.close(clean=False)
    with pytest.raises(TypeError):
        PersistentBitmap(10, 4096)


class PersistentMachine(RuleBasedStateMachine):
    """Model: memory bits, file bits, the pending-clear set and the outstanding tokens."""

    @initialize(clusters=st.one_of(st.integers(1, 8), st.integers(1, 200)), partial=st.sampled_from([0, 1, G - 1]),
                fill=st.booleans())
    def setup(self, clusters, partial, fill):
        self.dir = tempfile.mkdtemp(prefix="bitmap-sm-")
        self.path = os.path.join(self.dir, "b")
        self.size = (clusters - 1) * G + (partial or G)
        self.n = clusters
        self.bm = PersistentBitmap.create(self.path, self.size, G, source_id="s", target_id="t", fill=fill)
        self.mem = set(range(clusters)) if fill else set()
        self.file = set(self.mem)
        self.pending: set[int] = set()
        self.tokens: list[tuple[object, set[int]]] = []

    def teardown(self):
        if hasattr(self, "bm"):
            self.bm.close()
            shutil.rmtree(self.dir)

    def _range(self, data):
        # often cluster-aligned and small, so that the same clusters are hit again and again
        off = data.draw(st.one_of(st.integers(0, self.size),
                                  st.integers(0, self.n).map(lambda c: min(c * G, self.size))))
        room = self.size - off
        return off, data.draw(st.one_of(st.integers(0, min(room, 4 * G)),
                                        st.sampled_from([G, 2 * G]).map(lambda n: min(n, room))))

    @rule(data=st.data())
    def mark(self, data):
        off, length = self._range(data)
        new = touched(off, length)
        assert self.bm.mark(off, length) == len(new - self.mem)
        self.mem |= new
        self.file |= new
        assert file_bits(self.path) >= new  # in the file before mark returned

    @rule(data=st.data())
    def clear(self, data):
        off, length = self._range(data)
        gone = inside(off, length, self.size)
        self.bm.clear(off, length)
        self.mem -= gone
        self.pending |= gone

    @rule()
    def begin(self):
        self.tokens.append((self.bm.begin_clear_commit(), self.pending))
        self.pending = set()

    @precondition(lambda self: getattr(self, "tokens", None))
    @rule()
    def finish(self):
        token, covered = self.tokens.pop(0)
        self.bm.finish_clear_commit(token)
        for c in covered - self.pending:
            if c in self.mem:
                self.file.add(c)
            else:
                self.file.discard(c)

    @rule()
    def flush(self):
        self.bm.flush()

    @rule(clean=st.booleans())
    def reopen(self, clean):
        self.bm.close(clean=clean)
        self.bm = PersistentBitmap.open(self.path, size=self.size, granularity=G, source_id="s",
                                        target_id="t")
        assert self.bm.was_clean == clean
        self.mem = set(self.file)
        self.pending = set()
        self.tokens = []

    @invariant()
    def agree(self):
        if not hasattr(self, "bm"):
            return
        assert file_bits(self.path) == self.file
        assert self.file >= self.mem  # the durability invariant
        bits = np.unpackbits(np.frombuffer(self.bm.to_bytes(), np.uint8), bitorder="little")
        assert set(np.flatnonzero(bits).tolist()) == self.mem
        stats = self.bm.statistics()
        assert stats["dirty_clusters"] == len(self.mem) and stats["file_dirty_clusters"] == len(self.file)


PersistentMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=25, deadline=None)
TestPersistentModel = PersistentMachine.TestCase


def test_a_bitmap_in_use_cannot_be_opened_or_replaced_by_another_job(tmp_path):
    from mirrorfs.bitmap.inspect import inspect_file
    from mirrorfs.errors import BitmapFormatError

    path = str(tmp_path / "b")
    bm = PersistentBitmap.create(path, 16 * G, G, source_id="s", target_id="t", fill=True)
    assert inspect_file(path)["in-use"] is True
    with pytest.raises(BitmapFormatError, match="is in use by a running job"):
        PersistentBitmap.open(path, size=16 * G)
    with pytest.raises(BitmapFormatError, match="is in use by a running job"):
        PersistentBitmap.create(path, 16 * G, G, source_id="s", target_id="t", fill=False)
    bm.clear(0, G)
    bm.finish_clear_commit(bm.begin_clear_commit())
    assert file_bits(path) == set(range(1, 16))  # the refused calls did not detach our mapping
    bm.close()
    assert inspect_file(path)["in-use"] is False
    again = PersistentBitmap.open(path, size=16 * G)
    with pytest.raises(BitmapFormatError, match="in use"):
        PersistentBitmap.open(path, size=16 * G)
    again.close(clean=False)
    assert sorted(os.listdir(tmp_path)) == ["b"]
    assert DirtyBitmap(10, 4096).statistics() == {"size": 10, "granularity": 4096, "clusters": 1,
                                                  "dirty_clusters": 0, "dirty_bytes": 0}


def test_rebinding_the_source_keeps_the_bits_and_names_the_new_file(tmp_path):
    """After a sibling job's pivot the file names the image's new file; its bits (set and
    pending clears) are those it had, and the old identity no longer opens it."""
    path = str(tmp_path / "b.bitmap")
    bm = PersistentBitmap.create(path, 1 << 20, 4096, source_id="/old/disk", target_id="/t",
                                 fill=False)
    bm.mark(0, 8192)
    bm.mark(65536, 4096)
    bm.clear(0, 4096)  # not committed: the file keeps it set
    bm.rebind_source("/new/disk")
    assert bm.header.source_id == "/new/disk" and bm.count() == 2
    bm.mark(131072, 4096)
    bm.close(clean=True)
    from mirrorfs.errors import BitmapFormatError
    with pytest.raises(BitmapFormatError, match="/new/disk"):
        PersistentBitmap.open(path, size=1 << 20, source_id="/old/disk", target_id="/t").close()
    again = PersistentBitmap.open(path, size=1 << 20, source_id="/new/disk", target_id="/t")
    assert [again.is_dirty(o, 4096) for o in (0, 4096, 65536, 131072)] == [True, True, True, True]
    again.close()
