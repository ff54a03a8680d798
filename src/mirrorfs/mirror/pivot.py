"""What serves an image after a pivot to a target that is not a local file (NBD).

A local pivot swaps every open handle's descriptor to the target file and the node's backing path,
after which the FUSE layer needs nothing from the engine. An NBD target has no descriptor, so the
node keeps this forwarder in its ``job`` slot for the rest of the mount: reads, writes and fsyncs of
every handle go to the target, and the image cannot be truncated, unlinked or renamed.
"""

from __future__ import annotations

from typing import Any

from ..errors import StateError, TargetError
from ..targets.base import Target


class TargetForwarder:
    finished = False

    def __init__(self, target: Target, image: str) -> None:
        self.target = target
        self.image = image
        self.id = f"{image} (pivoted)"

    async def read(self, handle: Any, offset: int, size: int) -> bytes:
        size = max(0, min(size, self.target.size - offset))
        if size == 0:
            return b""
        try:
            return await self.target.pread(offset, size)
        except TargetError as exc:
            raise OSError(exc.errno, f"target {self.target.description}: {exc}") from None

    async def write(self, handle: Any, offset: int, data: bytes) -> int:
        if offset + len(data) > self.target.size:
            raise OSError(28, "write beyond the end of the NBD target")  # ENOSPC, as a full disk
        try:
            await self.target.pwrite(offset, data)
        except TargetError as exc:
            raise OSError(exc.errno, f"target {self.target.description}: {exc}") from None
        return len(data)

    async def fsync(self, handle: Any, datasync: bool = False) -> None:
        try:
            await self.target.flush()
        except TargetError as exc:
            raise OSError(exc.errno, f"target {self.target.description}: {exc}") from None

    def check_modify(self, op: str) -> None:
        raise StateError(f"cannot {op} {self.image!r}: it lives on the NBD target "
                         f"{self.target.description} since its pivot")
