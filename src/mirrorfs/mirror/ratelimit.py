"""A byte-rate limiter for the background copy (``speed``; 0 = unlimited), as QEMU's ratelimit."""

from __future__ import annotations

import trio


class RateLimiter:
    def __init__(self, rate: int = 0) -> None:
        self.rate = rate
        self._next = 0.0
        self._changed = trio.Event()

    def set_rate(self, rate: int) -> None:
        """Change the rate; a task waiting in ``take`` re-plans at once (``set-speed 0`` frees it)."""
        self.rate = rate
        self._next = 0.0
        self._changed.set()
        self._changed = trio.Event()

    def chunk_size(self, granularity: int, largest: int) -> int:
        """A request size that keeps progress smooth: about a quarter second's worth at the
        current rate, a whole number of clusters, at most ``largest``."""
        if self.rate <= 0:
            return largest
        quarter = (self.rate // 4) // granularity * granularity
        return max(granularity, min(largest, quarter))

    async def take(self, nbytes: int) -> None:
        """Wait until ``nbytes`` more may be sent without exceeding the rate."""
        while self.rate > 0:
            now = trio.current_time()
            start = max(self._next, now)
            if start <= now:
                self._next = now + nbytes / self.rate
                return
            changed = self._changed
            with trio.move_on_at(start):
                await changed.wait()
            # Woken by a change, or at the slot with a change in the same instant (the deadline
            # may win then): plan again; with the rate now 0 the loop ends.
            if changed.is_set():
                continue
            self._next = start + nbytes / self.rate
            return


class RateMeter:
    """Throughput over a sliding window of about ``window`` seconds, for the status ``rate``."""

    def __init__(self, window: float = 3.0) -> None:
        self._window = window
        self._samples: list[tuple[float, int]] = []

    def add(self, nbytes: int) -> None:
        now = trio.current_time()
        self._samples.append((now, nbytes))
        if len(self._samples) > 64 and self._samples[0][0] < now - self._window:
            self._trim(now)

    def _trim(self, now: float) -> None:
        cutoff = now - self._window
        self._samples = [s for s in self._samples if s[0] >= cutoff]

    @property
    def rate(self) -> float:
        now = trio.current_time()
        self._trim(now)
        return sum(n for _, n in self._samples) / self._window
