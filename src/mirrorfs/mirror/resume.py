"""Safe resume: before a ``--sync dirty`` job trusts its bitmap, compare clusters it calls clean.

A bitmap only promises that clean clusters are equal while nothing but the job writes the target.
A target restored from an older snapshot, written by another program or rolled back by its server
breaks that silently. So a resume compares some clean clusters of image and target first:

- ``pick_samples`` (pure) chooses them: every cluster the bitmap file says its last clear commits
  cleared (``format.RECENT_*``; what a lost or rolled-back target write gets wrong first, so
  these are compared every time, not left to chance), plus random clean ones, seedable through
  ``MIRRORFS_RESUME_SEED``.
- ``mismatch_message``: the one line of a refusal.

Pure: the reads and ``on-mismatch`` are the job's (``resume_check.py``).
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from typing import Iterable

import numpy as np

from .seams import JobBitmap

#: Random clean clusters a resume compares, besides the recently cleared ones.
RANDOM_SAMPLES = 64


@dataclass(frozen=True)
class Mismatch:
    """A sampled clean cluster whose bytes differ between image and target."""

    cluster: int
    offset: int
    length: int
    #: how many sampled clusters were compared up to this one, and how many were chosen
    compared: int
    sampled: int


def seeded_rng() -> random.Random:
    """The random source of the samples: seeded from ``MIRRORFS_RESUME_SEED`` when that is an
    integer."""
    seed = os.environ.get("MIRRORFS_RESUME_SEED", "").strip()
    try:
        return random.Random(int(seed)) if seed else random.Random()
    except ValueError:
        return random.Random()


def _clean(bitmap: JobBitmap, cluster: int) -> bool:
    return not bitmap.is_dirty(cluster * bitmap.granularity, 1)


def pick_samples(bitmap: JobBitmap, recent: Iterable[int], count: int,
                 rng: random.Random) -> list[int]:
    """The clean clusters to compare: the recently cleared ones still clean (newest first), then
    up to ``count`` other clean clusters at random (all of them when there are few)."""
    clusters = bitmap.clusters
    chosen = [c for c in dict.fromkeys(reversed(list(recent)))
              if 0 <= c < clusters and _clean(bitmap, c)]
    taken = set(chosen)
    clean = clusters - bitmap.count() - len(taken)
    if count <= 0 or clean <= 0:
        return chosen
    if clean <= 4 * count:
        # Few clean clusters: list them (rejection sampling would mostly draw dirty ones).
        words = np.frombuffer(bitmap.to_bytes(), dtype=np.uint8)
        bits = np.unpackbits(words, bitorder="little")[:clusters]
        candidates = [c for c in np.flatnonzero(bits == 0).tolist() if c not in taken]
        return chosen + sorted(rng.sample(candidates, min(count, len(candidates))))
    extra: set[int] = set()
    for _ in range(64 * count):
        cluster = rng.randrange(clusters)
        if cluster not in taken and cluster not in extra and _clean(bitmap, cluster):
            extra.add(cluster)
            if len(extra) == count:
                break
    return chosen + sorted(extra)


def mismatch_message(job_id: str, image: str, target: str, bitmap: str | None,
                     found: Mismatch) -> str:
    """The one line that refuses a resume."""
    return (f"job {job_id!r}: cannot resume from bitmap {bitmap}: cluster {found.cluster} "
            f"(offset {found.offset}, {found.length} bytes) of image {image!r} differs on target "
            f"{target}, but the bitmap calls it clean (sampled cluster {found.compared} of "
            f"{found.sampled}): the target was changed behind mirrorfs; resume with "
            f"--on-mismatch full (copies everything) or --verify-resync (copies what differs)")
