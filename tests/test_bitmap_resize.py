"""Growing a bitmap with its image (qcow2 files grow while mirrored)."""

import pytest

from mirrorfs.bitmap.memory import DirtyBitmap
from mirrorfs.bitmap.persistent import PersistentBitmap
from mirrorfs.errors import UsageError

G = 4096


def test_memory_resize_keeps_bits_and_adds_clean_clusters():
    bm = DirtyBitmap(10 * G + 100, G)
    bm.mark(0, 1)
    bm.mark(10 * G, 1)  # the partial last cluster
    bm.resize(200 * G + 1)
    assert bm.size == 200 * G + 1 and bm.clusters == 201
    assert list(bm.runs()) == [(0, G), (10 * G, G)]
    bm.mark(200 * G, 1)
    assert bm.count() == 3 and bm.dirty_bytes() == 2 * G + 1
    with pytest.raises(UsageError):
        bm.resize(5)


def test_persistent_resize_rewrites_the_file_with_every_set_bit(tmp_path):
    path = str(tmp_path / "b.bitmap")
    bm = PersistentBitmap.create(path, 64 * G, G, source_id="s", target_id="t", fill=False)
    bm.mark(3 * G, 2 * G)
    bm.clear(3 * G, G)  # cleared in memory only: the file keeps it until a commit
    bm.resize(1000 * G)
    bm.mark(999 * G, 1)
    token = bm.begin_clear_commit()
    bm.finish_clear_commit(token)
    bm.close()
    again = PersistentBitmap.open(path, size=1000 * G)
    try:
        assert list(again.runs()) == [(4 * G, G), (999 * G, G)]
    finally:
        again.close()
