"""The one interface every mirror target implements (local file, NBD export).

A target is a byte-addressable device of a fixed size. The job engine is its only user. All
methods are async and may be called concurrently from several tasks; an implementation that
needs ordering (one socket) serialises internally.

Errors: every failure is a ``TargetError``:
- ``TargetRetryableError``: the connection dropped or timed out; nothing is known about requests
  in flight. The engine marks their ranges dirty, and calls ``connect()`` again later.
- ``TargetNoSpaceError``: ENOSPC.
- ``TargetFatalError``: the target cannot be used (read-only, wrong size, other export).
- plain ``TargetError`` with ``errno``: an I/O error for that request; the connection is fine.
"""

from __future__ import annotations

import abc
import os


class Target(abc.ABC):
    """A mirror destination."""

    #: human-readable name for status output and events (path or URI; never credentials)
    description: str

    @property
    @abc.abstractmethod
    def connected(self) -> bool:
        """True between a successful ``connect()`` and a loss of the connection or ``close()``."""

    @property
    @abc.abstractmethod
    def size(self) -> int:
        """Size in bytes, known after the first ``connect()``."""

    @abc.abstractmethod
    async def connect(self) -> None:
        """Open (or reopen) the target. Checks the size against what it was before, if known.

        Raises:
            TargetError: cannot be reached / opened (retryable) or must not be used (fatal).
        """

    @abc.abstractmethod
    async def pread(self, offset: int, length: int) -> bytes:
        """Read ``length`` bytes at ``offset`` (short only at end of device)."""

    @abc.abstractmethod
    async def pwrite(self, offset: int, data: bytes | bytearray | memoryview, *,
                     direct: bool = False) -> None:
        """Write all of ``data`` at ``offset``; ``direct``: keep it out of the host's page
        cache where the target can (an O_DIRECT client's write, the copy task's chunks)."""

    def can_write_now(self, length: int) -> bool:
        """Whether ``pwrite_now`` can write ``length`` bytes without waiting (a local file on
        tmpfs); most targets cannot, and the engine then uses ``pwrite``."""
        return False

    def pwrite_now(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Write all of ``data`` at ``offset`` without yielding; only after ``can_write_now``
        said yes for this length, with no await in between.

        Raises:
            TargetError: as ``pwrite``.
        """
        raise NotImplementedError(f"target {self.description} cannot write without waiting")

    @abc.abstractmethod
    async def write_zeroes(self, offset: int, length: int) -> None:
        """Make ``length`` bytes at ``offset`` read as zero, deallocating them where possible."""

    @abc.abstractmethod
    async def flush(self) -> None:
        """Make every completed write durable."""

    async def resize(self, size: int) -> None:
        """Grow the target to ``size`` bytes (the source image grew, e.g. a qcow2 file allocating).

        Raises:
            TargetFatalError: this kind of target cannot grow (an NBD export has a fixed size).
        """
        from ..errors import TargetFatalError

        raise TargetFatalError(f"target {self.description} cannot grow to {size} bytes; "
                               f"mirror images that grow (qcow2) to a local file")

    def identity(self) -> str:
        """The canonical name a persistent bitmap records: another spelling of the same target
        matches and nothing else does. Blocking (it may resolve paths)."""
        return os.path.realpath(self.description)

    @abc.abstractmethod
    async def close(self) -> None:
        """Release the target. Idempotent."""
