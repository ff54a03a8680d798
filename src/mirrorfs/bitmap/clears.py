"""The clear commit protocol of a persistent bitmap, and the ring of clusters it cleared last.

A :class:`~mirrorfs.bitmap.persistent.PersistentBitmap` clears a cluster in memory at once and in
its file only after the target flushed the data the clear stands for (the protocol is in the
docstring of ``persistent.py``). The bookkeeping between the two lives here:

* :class:`PendingClears`: the clusters cleared in memory since the last ``begin_clear_commit``,
  and the arithmetic of a commit (which file bits a finished token may clear);
* :class:`ClearToken`: what ``begin_clear_commit`` hands out;
* :class:`RecentRing`: the version 3 header's ring of recently cleared clusters (``format.py``),
  updated in place in the mapped file, which a resume compares first (``mirror/resume.py``).

Pure numpy on arrays the bitmap owns: no I/O, no locks (the bitmap's thread calls all of it).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from . import format as fmt
from .memory import _WORD_DTYPE, _grown, _popcount, _set_range


class ClearToken:
    """What :meth:`PersistentBitmap.begin_clear_commit` hands out: the clusters cleared before it."""

    __slots__ = ("_owner", "_mask")

    def __init__(self, owner: Any, mask: np.ndarray | None) -> None:
        self._owner = owner
        self._mask = mask

    def __len__(self) -> int:
        """Number of clusters the token covers."""
        return 0 if self._mask is None else _popcount(self._mask)


class PendingClears:
    """The clusters cleared in memory whose file bits no commit has begun to clear yet."""

    def __init__(self, words: int) -> None:
        self._mask = np.zeros(words, dtype=_WORD_DTYPE)
        self._any = False

    def add(self, first: int, end: int) -> None:
        """Clusters [first, end) were cleared in memory."""
        _set_range(self._mask, first, end)
        self._any = True

    def take(self, owner: Any) -> ClearToken:
        """A token of every cluster added so far; from now on none is pending."""
        if not self._any:
            return ClearToken(owner, None)
        token = ClearToken(owner, self._mask)
        self._mask = np.zeros(len(self._mask), dtype=_WORD_DTYPE)
        self._any = False
        return token

    def settle(self, token: ClearToken, words: np.ndarray, file: np.ndarray
               ) -> tuple[np.ndarray, np.ndarray]:
        """Store into ``file`` the memory bits (``words``) of the token's clusters that were not
        cleared again since it was taken (their newest copy is not covered by the target flush
        this commit follows). Finishing a token twice is a no-op.

        Returns:
            the indexes of the file words that changed, and the bits each lost.
        """
        mask = token._mask
        token._mask = None
        none = np.zeros(0, dtype=np.intp), np.zeros(0, dtype=_WORD_DTYPE)
        if mask is None:
            return none
        idx = np.flatnonzero(mask)  # a token from before a resize is shorter: same indices
        if not len(idx):
            return none
        m = mask[idx] & ~self._mask[idx]
        old = file[idx]
        new = (old & ~m) | (words[idx] & m)
        changed = np.flatnonzero(new != old)
        if len(changed):
            file[idx[changed]] = new[changed]
        return idx[changed], old[changed] & ~new[changed]

    def grow(self, words: int) -> None:
        self._mask = _grown(self._mask, words)

    @property
    def nbytes(self) -> int:
        """Memory the mask takes (for the benchmark's report)."""
        return self._mask.nbytes

    def count(self) -> int:
        """Clusters pending (for statistics)."""
        return _popcount(self._mask) if self._any else 0


class RecentRing:
    """The file's ring of the clusters the last clear commits cleared: a position word, then
    ``format.RECENT_SLOTS`` slots of cluster + 1 (0: empty), stored through ``view``."""

    def __init__(self, view: np.ndarray) -> None:
        self.view = view

    @classmethod
    def mapped(cls, buffer: Any) -> "RecentRing":
        """The ring inside a mapped bitmap file."""
        return cls(np.frombuffer(buffer, dtype=_WORD_DTYPE, count=1 + fmt.RECENT_SLOTS,
                                 offset=fmt.RECENT_OFFSET))

    def detached(self) -> "RecentRing":
        """A copy that no longer refers to the mapping (which may then be closed)."""
        return RecentRing(self.view.copy())

    def record(self, word_index: np.ndarray, cleared: np.ndarray) -> None:
        """Put up to RECENT_SLOTS of the clusters one commit cleared into the ring, spread over
        the whole commit, so that a resume compares them whatever its random samples."""
        if not len(word_index):
            return
        slots = fmt.RECENT_SLOTS
        spread = np.linspace(0, len(word_index) - 1, min(slots, len(word_index))).astype(np.intp)
        word_index, cleared = word_index[spread], np.ascontiguousarray(cleared[spread])
        bits = np.unpackbits(cleared.view(np.uint8), bitorder="little").reshape(-1, 64)
        rows, cols = np.nonzero(bits)
        clusters = word_index[rows] * 64 + cols
        if len(clusters) > slots:
            clusters = clusters[np.linspace(0, len(clusters) - 1, slots).astype(np.intp)]
        ring = self.view
        position = int(ring[0])
        for cluster in clusters.tolist():
            ring[1 + position % slots] = cluster + 1
            position += 1
        ring[0] = position

    def clusters(self, count: int) -> tuple[int, ...]:
        """The recorded clusters below ``count``, oldest first."""
        return fmt.decode_recent(self.view.tobytes(), count)
