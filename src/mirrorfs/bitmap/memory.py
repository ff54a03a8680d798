"""The in-memory dirty bitmap: one bit per cluster of an image, held in numpy ``uint64`` words.

Role: the mirror engine's record of which clusters of an image may differ between source and
target. Pure computation, no I/O; :class:`~mirrorfs.bitmap.persistent.PersistentBitmap` reuses
the same word-level helpers on an mmap of the bitmap file.

Invariants:
    * cluster ``c`` is bit ``c % 64`` of word ``c // 64`` (so, in little-endian memory, bit ``i``
      of byte ``j`` is cluster ``8j + i``: the order of ``docs/bitmap-format.md``);
    * the bits past the last cluster (the "tail" of the last word) are always zero;
    * ``_count`` always equals the number of set bits (kept incrementally so ``count()`` and
      ``dirty_bytes()``, which status polling calls often, are O(1)).

Range semantics (the engine relies on these):
    * ``mark`` sets every cluster the byte range touches (a partial cluster may differ);
    * ``clear`` clears only clusters wholly inside the range, except that the partial last cluster
      of an image counts as whole when the range reaches the image end (it has no more bytes);
    * a range outside ``[0, size]`` is a caller bug and raises :class:`UsageError` rather than
      being clipped: a silently dropped mark would break the bitmap invariant.

No Python loop runs per cluster: ranges are edited word-wise (Python ints for the edge words,
numpy slices for the middle), runs are found from word-level bit transitions.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

from ..errors import UsageError

#: smallest and largest cluster size (a power of two from 4 KiB to 64 MiB).
MIN_GRANULARITY = 4096
MAX_GRANULARITY = 64 << 20
DEFAULT_GRANULARITY = 65536

_ALL = (1 << 64) - 1
_WORD_DTYPE = np.dtype("<u8")
#: words examined per step when listing runs: bounds the temporary arrays (1 Mi clusters,
#: 16 MiB of booleans at most) while keeping the numpy calls per step few.
_RUN_CHUNK_WORDS = 16384

if hasattr(np, "bitwise_count"):  # numpy >= 2.0

    def _popcount(words: np.ndarray) -> int:
        return int(np.bitwise_count(words).sum(dtype=np.int64))

else:  # pragma: no cover - numpy 1.26 fallback
    _POP8 = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)

    def _popcount(words: np.ndarray) -> int:
        return int(_POP8[np.ascontiguousarray(words).view(np.uint8)].sum(dtype=np.int64))


def check_granularity(granularity: int) -> int:
    """Validate a cluster size.

    Args:
        granularity: bytes per cluster.

    Returns:
        the granularity, unchanged.

    Raises:
        UsageError: not a power of two between 4 KiB and 64 MiB.
    """
    if (not isinstance(granularity, int) or isinstance(granularity, bool)
            or granularity < MIN_GRANULARITY or granularity > MAX_GRANULARITY
            or granularity & (granularity - 1)):
        raise UsageError(f"invalid granularity {granularity!r}: must be a power of two from 4K to 64M "
                         f"(e.g. 64K)")
    return granularity


def words_for(clusters: int) -> int:
    """Number of 64-bit words that hold ``clusters`` bits."""
    return (clusters + 63) >> 6


# --- word-level helpers shared by the in-memory and the persistent bitmap ------------------------
# They take [first, end) cluster ranges that the caller has validated.

def _edge_words(first: int, end: int) -> tuple[int, int, int, int]:
    """``(wf, wl, fmask, lmask)``: the words holding clusters ``first`` and ``end - 1``, and the
    masks of the range's bits in each (both the same mask when the range is within one word)."""
    wf = first >> 6
    wl = (end - 1) >> 6
    if wf == wl:
        mask = ((1 << (end - first)) - 1) << (first & 63)
        return wf, wl, mask, mask
    return wf, wl, (_ALL << (first & 63)) & _ALL, _ALL >> (63 - ((end - 1) & 63))


def _set_range(words: np.ndarray, first: int, end: int) -> int:
    """Set clusters [first, end); return how many were 0 before. Writes only words that change,
    so that on an mmap an already-set range dirties no page."""
    if end <= first:
        return 0
    wf, wl, fmask, lmask = _edge_words(first, end)
    old_f = int(words[wf])
    if wf == wl:
        if old_f & fmask == fmask:
            return 0
        words[wf] = old_f | fmask
        return (fmask & ~old_f).bit_count()
    old_l = int(words[wl])
    newly = (fmask & ~old_f).bit_count() + (lmask & ~old_l).bit_count()
    if wl - wf > 1:
        mid = words[wf + 1:wl]
        already = _popcount(mid)
        if already != 64 * len(mid):
            newly += 64 * len(mid) - already
            mid[:] = _ALL
    if old_f & fmask != fmask:
        words[wf] = old_f | fmask
    if old_l & lmask != lmask:
        words[wl] = old_l | lmask
    return newly


def _clear_range(words: np.ndarray, first: int, end: int) -> int:
    """Clear clusters [first, end); return how many were 1 before."""
    if end <= first:
        return 0
    wf, wl, fmask, lmask = _edge_words(first, end)
    old_f = int(words[wf])
    if wf == wl:
        if old_f & fmask:
            words[wf] = old_f & ~fmask
        return (old_f & fmask).bit_count()
    old_l = int(words[wl])
    cleared = (old_f & fmask).bit_count() + (old_l & lmask).bit_count()
    if wl - wf > 1:
        mid = words[wf + 1:wl]
        was = _popcount(mid)
        if was:
            cleared += was
            mid[:] = 0
    if old_f & fmask:
        words[wf] = old_f & ~fmask
    if old_l & lmask:
        words[wl] = old_l & ~lmask
    return cleared


def _any_in_range(words: np.ndarray, first: int, end: int) -> bool:
    if end <= first:
        return False
    wf, wl, fmask, lmask = _edge_words(first, end)
    if wf == wl:
        return bool(int(words[wf]) & fmask)
    if int(words[wf]) & fmask or int(words[wl]) & lmask:
        return True
    return bool(wl - wf > 1 and words[wf + 1:wl].any())


def _find(words: np.ndarray, start: int, limit: int, want: bool) -> int:
    """First cluster >= start whose bit is ``want``; ``limit`` (the cluster count) if none.

    Looks at the first word with Python ints, then scans whole words with numpy in windows that
    double in size, so a nearby hit costs a few microseconds and a far one stays O(words).
    """
    if start >= limit:
        return limit
    nwords = len(words)
    w, b = divmod(start, 64)
    word = int(words[w])
    if not want:
        word = ~word & _ALL
    word &= (_ALL << b) & _ALL
    if word:
        return min(limit, w * 64 + ((word & -word).bit_length() - 1))
    lo = w + 1
    window = 64
    while lo < nwords:
        hi = min(nwords, lo + window)
        seg = words[lo:hi]
        hits = np.flatnonzero(seg != 0) if want else np.flatnonzero(seg != _ALL)
        if len(hits):
            i = lo + int(hits[0])
            word = int(words[i])
            if not want:
                word = ~word & _ALL
            return min(limit, i * 64 + ((word & -word).bit_length() - 1))
        lo = hi
        window = min(window * 4, 1 << 16)
    return limit


def _iter_run_batches(words: np.ndarray, clusters: int, start: int
                      ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield the runs of set bits as batches of [first, end) cluster index arrays, from ``start``.

    A run that began before ``start`` is reported from ``start``. Transitions are found word-wise:
    ``t = w ^ (w << 1 | carry)`` has a bit where a cluster differs from the one before it; only the
    words with a transition are unpacked to find the positions. Processed in chunks so a caller
    that stops early does not pay for the whole bitmap.
    """
    nwords = len(words)
    if start >= clusters:
        return
    w0, b0 = divmod(start, 64)
    carry = 0  # value of the bit before the chunk (taken as 0 before ``start``)
    open_start = -1  # start of a run that continues into the next chunk, or -1
    shift63 = np.uint64(63)
    one = np.uint64(1)
    for base in range(w0, nwords, _RUN_CHUNK_WORDS):
        chunk = words[base:base + _RUN_CHUNK_WORDS]
        if base == w0 and b0:
            chunk = chunk.copy()
            chunk[0] &= np.uint64((_ALL << b0) & _ALL)
        prev = chunk << one
        prev[0] |= np.uint64(carry)
        if len(chunk) > 1:
            prev[1:] |= chunk[:-1] >> shift63
        trans = chunk ^ prev
        carry = int(chunk[-1]) >> 63
        idx = np.flatnonzero(trans)
        if len(idx) == 0:
            continue
        bits = np.unpackbits(trans[idx].view(np.uint8), bitorder="little").reshape(-1, 64)
        row, col = np.nonzero(bits)
        pos = ((idx[row].astype(np.int64) + base) << 6) + col
        if open_start >= 0:
            pos = np.concatenate(([open_start], pos))
            open_start = -1
        if len(pos) & 1:
            open_start = int(pos[-1])
            pos = pos[:-1]
        if len(pos):
            yield pos[0::2], pos[1::2]
    if open_start >= 0:
        yield (np.array([open_start], dtype=np.int64),
               np.array([min(clusters, nwords * 64)], dtype=np.int64))


def _iter_cluster_runs(words: np.ndarray, clusters: int, start: int) -> Iterator[tuple[int, int]]:
    """The runs of :func:`_iter_run_batches` one by one, as Python ints."""
    for firsts, ends in _iter_run_batches(words, clusters, start):
        yield from zip(firsts.tolist(), ends.tolist())


def _grown(words: np.ndarray, count: int) -> np.ndarray:
    """``words`` extended with zero words to ``count`` words (a new array when it grows)."""
    if count == len(words):
        return words
    grown = np.zeros(count, dtype=words.dtype)
    grown[:len(words)] = words
    return grown


class _BitmapCore:
    """Queries and edits shared by :class:`DirtyBitmap` and ``PersistentBitmap``.

    Subclasses provide ``_words`` (the authoritative in-memory bits), ``size``, ``granularity``,
    ``clusters`` and ``_count``; mutating methods go through the ``_set``/``_clear`` hooks so the
    persistent bitmap can mirror sets into its file.
    """

    size: int
    granularity: int
    clusters: int
    _words: np.ndarray
    _count: int
    _shift: int

    # -- range conversion -------------------------------------------------------------------------
    def _check_range(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise UsageError(f"byte range offset={offset} length={length} is outside the image "
                             f"(size {self.size})")

    def _touched(self, offset: int, length: int) -> tuple[int, int]:
        """[first, end) of the clusters a byte range touches (empty for length 0)."""
        self._check_range(offset, length)
        if length == 0:
            return 0, 0
        return offset >> self._shift, ((offset + length - 1) >> self._shift) + 1

    def _inside(self, offset: int, length: int) -> tuple[int, int]:
        """[first, end) of the clusters wholly inside a byte range (the image's partial last
        cluster counts as whole when the range reaches the image end)."""
        self._check_range(offset, length)
        if length == 0:
            return 0, 0
        g = self.granularity
        first = (offset + g - 1) >> self._shift
        stop = offset + length
        end = self.clusters if stop == self.size else stop >> self._shift
        return first, max(first, end)

    # -- queries --------------------------------------------------------------------------------
    def is_dirty(self, offset: int, length: int) -> bool:
        """Whether any cluster the byte range touches is dirty (False for length 0).

        Raises:
            UsageError: the range is outside the image.
        """
        first, end = self._touched(offset, length)
        return _any_in_range(self._words, first, end)

    def count(self) -> int:
        """Number of dirty clusters."""
        return self._count

    def dirty_bytes(self) -> int:
        """Bytes covered by dirty clusters; the partial last cluster counts its real size."""
        n = self._count * self.granularity
        partial = self.size & (self.granularity - 1)
        if partial and n and (int(self._words[-1]) >> ((self.clusters - 1) & 63)) & 1:
            n -= self.granularity - partial
        return n

    def cluster_runs(self, start: int = 0) -> Iterator[tuple[int, int]]:
        """Runs of dirty clusters as [first, end) cluster indices, from cluster ``start``."""
        return _iter_cluster_runs(self._words, self.clusters, max(0, start))

    def _to_bytes(self, first: int, end: int, max_length: int | None) -> Iterator[tuple[int, int]]:
        g = self.granularity
        off = first * g
        stop = min(end * g, self.size)
        if max_length is None:
            yield off, stop - off
            return
        while off < stop:
            n = min(max_length, stop - off)
            yield off, n
            off += n

    def _check_max_length(self, max_length: int | None) -> int | None:
        if max_length is None:
            return None
        if max_length < self.granularity:
            raise UsageError(f"max_length {max_length} is smaller than the granularity "
                             f"{self.granularity}")
        # split only at cluster boundaries, so each piece can be cleared once copied
        return max_length - (max_length % self.granularity)

    def runs(self, start: int = 0, *, max_length: int | None = None) -> Iterator[tuple[int, int]]:
        """Iterate the dirty runs as (offset, length) in bytes.

        Args:
            start: byte offset; listing starts at the cluster containing it (a run that began
                earlier is reported from that cluster's start); nothing at or past the image end.
            max_length: split longer runs into pieces of at most this many bytes, rounded down
                to a multiple of the granularity (so every piece is whole clusters).

        Arguments are checked at the call, not at the first ``next()``. The listing reads the
        words as it goes (in chunks of 1 Mi clusters), so changes made while iterating may or may
        not be seen; take a :meth:`copy` for a snapshot.

        Raises:
            UsageError: ``start`` is negative or ``max_length`` below the granularity.
        """
        if start < 0:
            raise UsageError(f"negative start offset {start}")
        ml = self._check_max_length(max_length)
        return self._runs(start, ml)

    def _runs(self, start: int, ml: int | None) -> Iterator[tuple[int, int]]:
        if start >= self.size:
            return
        if ml is not None:
            for first, end in self.cluster_runs(start >> self._shift):
                yield from self._to_bytes(first, end, ml)
            return
        # whole batches to bytes at once: the Python work left is one tuple per run
        for firsts, ends in _iter_run_batches(self._words, self.clusters, start >> self._shift):
            offs = firsts << self._shift
            lens = np.minimum(ends << self._shift, self.size) - offs
            yield from zip(offs.tolist(), lens.tolist())

    def next_dirty(self, start: int = 0, *, max_length: int | None = None) -> tuple[int, int] | None:
        """The first dirty run at or after the cluster containing byte ``start`` (no wrap).

        Args:
            start: byte offset to search from (None at or past the image end).
            max_length: cap the returned length (rounded down to whole clusters).

        Returns:
            (offset, length) in bytes, or None when no cluster at/after ``start`` is dirty.
        """
        if start < 0:
            raise UsageError(f"negative start offset {start}")
        ml = self._check_max_length(max_length)
        if start >= self.size:
            return None
        first = _find(self._words, start >> self._shift, self.clusters, True)
        if first >= self.clusters:
            return None
        end = _find(self._words, first + 1, self.clusters, False)
        if ml is not None:
            end = min(end, first + ml // self.granularity)
        return next(self._to_bytes(first, end, None))

    def to_bytes(self) -> bytes:
        """The bits in file order (bit i of byte j is cluster 8j+i), ``ceil(clusters/64)*8`` bytes."""
        return self._words.astype(_WORD_DTYPE, copy=False).tobytes()

    def __repr__(self) -> str:
        return (f"<{type(self).__name__} size={self.size} granularity={self.granularity} "
                f"dirty={self._count}/{self.clusters}>")


class DirtyBitmap(_BitmapCore):
    """An in-memory dirty bitmap of an image.

    Args:
        size: image size in bytes.
        granularity: bytes per cluster, a power of two from 4 KiB to 64 MiB.

    Raises:
        UsageError: bad granularity or negative size.
    """

    #: Only memory holds it: nothing outside the process can see a change before the next yield
    #: (a persistent bitmap's marks reach its file at once, for a crash to find).
    volatile: bool = True

    def __init__(self, size: int, granularity: int = DEFAULT_GRANULARITY) -> None:
        check_granularity(granularity)
        if size < 0:
            raise UsageError(f"invalid image size {size}: must not be negative")
        self.size = size
        self.granularity = granularity
        self._shift = granularity.bit_length() - 1
        self.clusters = (size + granularity - 1) >> self._shift
        self._words = np.zeros(words_for(self.clusters), dtype=_WORD_DTYPE)
        self._count = 0

    def resize(self, new_size: int) -> None:
        """Grow the bitmap to cover an image that grew to ``new_size`` bytes; new clusters are
        clean (the caller marks what it writes there).

        Raises:
            UsageError: ``new_size`` is smaller than the current size (images only grow while
                a job runs: truncation is refused).
        """
        if new_size < self.size:
            raise UsageError(f"cannot shrink a bitmap from {self.size} to {new_size} bytes")
        clusters = (new_size + self.granularity - 1) >> self._shift
        self._words = _grown(self._words, words_for(clusters))
        self.size = new_size
        self.clusters = clusters

    @classmethod
    def from_words(cls, size: int, granularity: int, words: np.ndarray) -> "DirtyBitmap":
        """A bitmap holding a copy of ``words`` (tail bits must already be zero)."""
        bm = cls(size, granularity)
        if len(words) != len(bm._words):
            raise UsageError(f"expected {len(bm._words)} words, got {len(words)}")
        bm._words[:] = words
        bm._count = _popcount(bm._words)
        return bm

    def mark(self, offset: int, length: int) -> int:
        """Mark every cluster the byte range touches dirty.

        Returns:
            the number of clusters that were clean before.

        Raises:
            UsageError: the range is outside the image.
        """
        first, end = self._touched(offset, length)
        n = _set_range(self._words, first, end)
        self._count += n
        return n

    def clear(self, offset: int, length: int) -> None:
        """Clear the clusters wholly inside the byte range (see the module docstring).

        Raises:
            UsageError: the range is outside the image.
        """
        first, end = self._inside(offset, length)
        self._count -= _clear_range(self._words, first, end)

    def mark_clusters(self, indices: np.ndarray) -> None:
        """Mark the given cluster indices dirty (vectorised; duplicates are fine).

        Raises:
            UsageError: an index is outside the image.
        """
        idx = np.asarray(indices, dtype=np.int64).ravel()
        if len(idx) == 0:
            return
        if idx.min() < 0 or idx.max() >= self.clusters:
            raise UsageError(f"cluster index outside the image ({self.clusters} clusters)")
        np.bitwise_or.at(self._words, idx >> 6, np.left_shift(np.uint64(1), (idx & 63).astype(np.uint64)))
        self._count = _popcount(self._words)

    def mark_cluster_range(self, first: int, end: int) -> int:
        """Mark clusters [first, end); returns how many were clean."""
        if not 0 <= first <= end <= self.clusters:
            raise UsageError(f"cluster range [{first}, {end}) outside the image ({self.clusters} clusters)")
        n = _set_range(self._words, first, end)
        self._count += n
        return n

    def set_all(self) -> None:
        """Mark every cluster dirty."""
        self._count += _set_range(self._words, 0, self.clusters)

    def clear_all(self) -> None:
        """Mark every cluster clean."""
        self._words[:] = 0
        self._count = 0

    def _check_same(self, other: _BitmapCore) -> None:
        if other.size != self.size or other.granularity != self.granularity:
            raise UsageError(f"cannot merge a bitmap of {other.size} bytes at granularity "
                             f"{other.granularity} into one of {self.size} bytes at {self.granularity}")

    def merge(self, other: _BitmapCore) -> None:
        """OR ``other``'s dirty clusters into this bitmap.

        Raises:
            UsageError: sizes or granularities differ.
        """
        self._check_same(other)
        np.bitwise_or(self._words, other._words, out=self._words)
        self._count = _popcount(self._words)

    def copy(self) -> "DirtyBitmap":
        """An independent copy."""
        return DirtyBitmap.from_words(self.size, self.granularity, self._words)

    def statistics(self) -> dict[str, int]:
        """Size, granularity and dirty counts (the persistent bitmap adds file counters)."""
        return {"size": self.size, "granularity": self.granularity, "clusters": self.clusters,
                "dirty_clusters": self._count, "dirty_bytes": self.dirty_bytes()}

    # The durability half of the engine's bitmap seam: memory has nothing to make durable.
    was_clean = True
    #: the file that holds the bits (None: memory only)
    path: str | None = None

    def recent_cleared(self) -> tuple[int, ...]:
        """The clusters the last clear commits cleared in a file: none, in memory only."""
        return ()

    def begin_clear_commit(self) -> None:
        return None

    def finish_clear_commit(self, token: None) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self, *, clean: bool = True, pivoted: bool = False, ended: bool = False) -> None:
        pass

    #: nothing outlives the process: a resume never reads this flag
    inconsistent = False

    def set_inconsistent(self, inconsistent: bool) -> None:
        pass

    def rebind_source(self, source_id: str) -> None:
        """Nothing records the image's file in memory (see ``PersistentBitmap``)."""
