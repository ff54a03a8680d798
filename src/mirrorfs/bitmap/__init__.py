"""mirrorfs.bitmap: dirty bitmaps, in memory and persistent.

* :class:`DirtyBitmap` (``memory.py``): numpy words, vectorised range ops, no I/O.
* ``format.py``: the codec of ``docs/bitmap-format.md`` (pure).
* :class:`PersistentBitmap` (``persistent.py``): the same API with set bits in an mmap'ed file
  before ``mark`` returns, lazy clears committed after target flushes.
* ``clears.py``: the clear commit's bookkeeping and the ring of recently cleared clusters.
* ``inspect.py``: ``mirrorfs bitmap inspect``.
"""

from .memory import DEFAULT_GRANULARITY, DirtyBitmap
from .persistent import ClearToken, PersistentBitmap

__all__ = ["DEFAULT_GRANULARITY", "ClearToken", "DirtyBitmap", "PersistentBitmap"]
