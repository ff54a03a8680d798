"""A byte-rate limiter for the background copy (``speed``; 0 = unlimited), as QEMU's ratelimit."""

from __future__ import annotations

import trio


class RateLimiter:
    def __init__(self, rate: int = 0) -> None:
        self.rate = rate
        self._next = 0.0

    def set_rate(self, rate: int) -> None:
        self.rate = rate
        self._next = 0.0

    async def take(self, nbytes: int) -> None:
        """Wait until ``nbytes`` more may be sent without exceeding the rate."""
        if self.rate <= 0:
            return
        now = trio.current_time()
        start = max(self._next, now)
        self._next = start + nbytes / self.rate
        if start > now:
            await trio.sleep_until(start)


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
