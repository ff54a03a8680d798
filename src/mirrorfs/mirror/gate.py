"""The I/O gate of a mirrored image: how a pivot or a transaction gets one point in time.

Every read, write and fsync of a mirrored image passes through ``hold()``. ``close()`` makes new
requests wait; ``wait_drained()`` returns once the requests already inside have finished. Between
the two, nothing moves on the image, so a pivot can swap descriptors and a transaction can act on
several images at one instant: it closes every gate first, then drains them all (s3ql's
``inhibit_writes()`` plays the same role for its database snapshot).
"""

from __future__ import annotations

from contextlib import asynccontextmanager
from typing import AsyncIterator

import trio


class IOGate:
    def __init__(self) -> None:
        self._inside = 0
        self._closed = False
        self._opened = trio.Event()
        self._opened.set()
        self._drained = trio.Event()
        self._drained.set()

    @asynccontextmanager
    async def hold(self) -> AsyncIterator[None]:
        """Pass one request through the gate, waiting while it is closed."""
        while self._closed:
            await self._opened.wait()
        self._inside += 1
        if self._drained.is_set():
            self._drained = trio.Event()
        try:
            yield
        finally:
            self._inside -= 1
            if self._inside == 0:
                self._drained.set()

    def close(self) -> None:
        """Stop admitting requests (idempotent)."""
        if not self._closed:
            self._closed = True
            self._opened = trio.Event()

    async def wait_drained(self) -> None:
        """Wait until every request admitted before ``close()`` has left."""
        while self._inside:
            await self._drained.wait()

    def open(self) -> None:
        """Admit requests again and wake the waiters."""
        self._closed = False
        self._opened.set()

    @property
    def closed(self) -> bool:
        return self._closed


class ActivityCounter:
    """Counts activities in flight and lets a task wait until there are none."""

    def __init__(self) -> None:
        self.count = 0
        self._idle = trio.Event()
        self._idle.set()

    def enter(self) -> None:
        self.count += 1
        if self.count == 1:
            self._idle = trio.Event()

    def leave(self) -> None:
        self.count -= 1
        if self.count == 0:
            self._idle.set()

    async def wait_idle(self) -> None:
        while self.count:
            await self._idle.wait()
