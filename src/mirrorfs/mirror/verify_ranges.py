"""The pure part of a verify: byte ranges, and which clusters of two buffers differ.

A range is ``(offset, length)`` in bytes with ``length > 0``. Every function returns its ranges
sorted and merged (adjacent or overlapping ranges become one), so what a verify reports is the
same whatever order its pieces were found in. No I/O here (``verify.py`` does it).
"""

from __future__ import annotations

from typing import Iterable

Range = tuple[int, int]


def merge(ranges: Iterable[Range]) -> list[Range]:
    """Sort ``ranges`` and join those that touch or overlap; empty ones are dropped."""
    merged: list[Range] = []
    for offset, length in sorted(r for r in ranges if r[1] > 0):
        if merged and offset <= merged[-1][0] + merged[-1][1]:
            last_offset, last_length = merged[-1]
            merged[-1] = (last_offset, max(last_length, offset + length - last_offset))
        else:
            merged.append((offset, length))
    return merged


def subtract(ranges: Iterable[Range], removed: Iterable[Range]) -> list[Range]:
    """The parts of ``ranges`` outside every range of ``removed``."""
    cuts = merge(removed)
    result: list[Range] = []
    for offset, length in merge(ranges):
        pos, end = offset, offset + length
        for cut_offset, cut_length in cuts:
            cut_end = cut_offset + cut_length
            if cut_end <= pos or cut_offset >= end:
                continue
            if cut_offset > pos:
                result.append((pos, cut_offset - pos))
            pos = max(pos, cut_end)
        if pos < end:
            result.append((pos, end - pos))
    return result


def intersect(ranges: Iterable[Range], keep: Iterable[Range]) -> list[Range]:
    """The parts of ``ranges`` inside some range of ``keep``."""
    kept = merge(ranges)
    return subtract(kept, subtract(kept, keep))


def total(ranges: Iterable[Range]) -> int:
    """Bytes covered (ranges as returned here: no overlaps)."""
    return sum(length for _, length in ranges)


def cluster_spans(spans: Iterable[tuple[int, int]], granularity: int) -> list[Range]:
    """Inclusive cluster index spans ``[first, last]`` as byte ranges."""
    return merge((first * granularity, (last - first + 1) * granularity) for first, last in spans)


def differing(source: bytes, target: bytes, offset: int, granularity: int) -> list[Range]:
    """The clusters where ``target`` differs from ``source``, both read at ``offset``.

    Clusters are aligned to ``granularity`` from byte 0 of the image, so a buffer that starts or
    ends inside one gives a partial first or last range. Bytes ``target`` lacks (a short read)
    differ.
    """
    if source == target:  # one memcmp: the common case costs no slicing
        return []
    found: list[Range] = []
    pos = 0
    size = len(source)
    while pos < size:
        step = min(granularity - (offset + pos) % granularity, size - pos)
        if source[pos:pos + step] != target[pos:pos + step]:
            found.append((offset + pos, step))
        pos += step
    return merge(found)
