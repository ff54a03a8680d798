"""The interfaces the engine works through, as ``typing.Protocol``s.

The engine never asks an object what it can do (no ``getattr`` probing): a memory bitmap has the
same durability methods as a persistent one (no-ops), and a node's ``job`` slot always holds an
``ImageIO`` (the job, or the forwarder that serves an image pivoted to NBD). Targets share the
abstract base ``targets.base.Target``.
"""

from __future__ import annotations

from typing import Any, Iterator, Protocol


class JobBitmap(Protocol):
    """What a job needs of its dirty bitmap (``DirtyBitmap`` or ``PersistentBitmap``)."""

    #: only memory holds it: no change is visible outside the process before the next yield
    volatile: bool
    #: the file had been closed cleanly before this open (always true in memory)
    was_clean: bool
    #: the file that holds the bits (None: memory only)
    path: str | None
    granularity: int
    clusters: int

    def mark(self, offset: int, length: int) -> int: ...
    def clear(self, offset: int, length: int) -> None: ...
    def is_dirty(self, offset: int, length: int) -> bool: ...
    def count(self) -> int: ...
    def dirty_bytes(self) -> int: ...
    def next_dirty(self, start: int = 0, *, max_length: int | None = None
                   ) -> tuple[int, int] | None: ...
    def runs(self, start: int = 0, *, max_length: int | None = None
             ) -> Iterator[tuple[int, int]]: ...
    def resize(self, new_size: int) -> None: ...
    def set_all(self) -> None: ...
    def to_bytes(self) -> bytes: ...

    def recent_cleared(self) -> tuple[int, ...]:
        """The clusters the file's last clear commits cleared, oldest first (none in memory)."""

    def begin_clear_commit(self) -> Any:
        """Snapshot the clears to commit; call before the target flush."""

    def finish_clear_commit(self, token: Any) -> None:
        """Commit the snapshot's clears; call after the target flush returned."""

    def flush(self) -> None:
        """Make the bits durable (blocking: run it in a thread)."""

    def close(self, *, clean: bool = True, pivoted: bool = False, ended: bool = False) -> None:
        """Stop recording; the flags say how the job stopped."""

    @property
    def inconsistent(self) -> bool:
        """The file says the target is a mix of older and newer clusters (False in memory)."""

    def set_inconsistent(self, inconsistent: bool) -> None:
        """Record durably whether the target is such a mix (blocking; a no-op in memory)."""

    def rebind_source(self, source_id: str) -> None:
        """Record durably that the image now lives in the file ``source_id`` (a no-op in memory)."""


class Handle(Protocol):
    """One open of an image (``fs.node.OpenHandle``)."""

    fd: int
    flags: int
    #: opened with O_DIRECT: its duplicates go to a local target with O_DIRECT too
    direct: bool
    #: the O_DIRECT twin of ``fd`` its aligned requests go through (``fileio.open_direct_twin``)
    twin: int | None

    def runs_inline(self, size: int) -> bool: ...


class ImageIO(Protocol):
    """What serves a mirrored image's requests: a running job, or the forwarder after a pivot
    to NBD. The FUSE layer calls these for every request on the image."""

    id: str

    @property
    def finished(self) -> bool: ...

    async def read(self, handle: Handle, offset: int, size: int) -> bytes: ...
    async def write(self, handle: Handle, offset: int, data: bytes) -> int: ...
    async def fsync(self, handle: Handle, datasync: bool = False) -> None: ...
    def check_modify(self, op: str) -> None: ...


class Node(Protocol):
    """The FUSE layer's file of an image (``fs.node.ImageNode``), as the engine sees it."""

    backing_path: str
    handles: dict[int, Any]
    job: ImageIO | None
    passthrough_writes: dict[int, tuple[int, int]]

    async def wait_passthrough_idle(self) -> None: ...
