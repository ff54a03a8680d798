"""``mirrorfs bitmap inspect FILE [--json]``: describe a bitmap file and give a verdict.

Read-only: unlike :meth:`PersistentBitmap.open` it never rewrites the file, so a management tool
may run it while a job holds the bitmap (it then sees a "not clean" file, which is still a valid
over-approximation).

Exit codes (docs/reference.md): 0 clean (target identical to source) or pivoted (target is the live image),
1 dirty, or not to be trusted as it stands (its job ended, so later writes are missing; a version 1
file that cannot tell), 2 invalid or unreadable (a :class:`BitmapFormatError`, printed by
``cli.py``).
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

import numpy as np

from ..units import format_size
from .format import format_time
from .memory import _WORD_DTYPE, DirtyBitmap
from .persistent import is_in_use, read_bitmap_file

#: how many dirty ranges to list.
MAX_RANGES = 10

VERDICT_CLEAN = "clean: the target is identical to the source"
VERDICT_PIVOTED = "pivoted: the target is the live image and holds every write; restart from the target"
UNCLEAN_NOTE = "not shut down cleanly: set bits are still trustworthy (they over-approximate)"
IN_USE_NOTE = "a running job holds this bitmap: the verdict is a snapshot and will change"
ENDED_NOTE = "writes after this time are not recorded"
INCONSISTENT_NOTE = ("a copy driven by the bitmap was under way: the target mixes older and newer "
                     "clusters and is not a usable disk until the job is ready again")


def _verdict(header: Any, bm: DirtyBitmap, path: str) -> tuple[str, int]:
    if header.pivoted:
        return VERDICT_PIVOTED, 0
    if header.ended:
        return (f"ended: its job ended at {format_time(header.ended_at)} ({bm.dirty_bytes()} bytes "
                f"differed then) and writes since are not recorded, so the target may differ "
                f"anywhere; resync with --sync dirty --bitmap {path} --verify-resync (compares every "
                f"cluster)", 1)
    if header.legacy_clean:
        return (f"unknown: a version 1 file cannot tell whether its job ended; resync with --sync "
                f"dirty --bitmap {path} --verify-resync (compares every cluster)", 1)
    if bm.count() == 0:
        return VERDICT_CLEAN, 0
    return f"dirty: {bm.dirty_bytes()} bytes differ; restart with --sync dirty --bitmap {path}", 1


def inspect_file(path: str) -> dict[str, Any]:
    """Read and describe a bitmap file.

    Returns:
        a dict with every field ``--json`` prints, including ``verdict`` and ``exit_code``.

    Raises:
        BitmapFormatError: unreadable, truncated, corrupt.
    """
    path = os.fspath(path)
    header, data = read_bitmap_file(path)
    words = np.frombuffer(data, _WORD_DTYPE, count=header.words, offset=header.bits_offset)
    bm = DirtyBitmap.from_words(header.image_size, header.granularity, words)
    ranges = []
    for off, length in bm.runs():
        if len(ranges) == MAX_RANGES:
            break
        ranges.append({"offset": off, "length": length})
    dirty_bytes = bm.dirty_bytes()
    verdict, code = _verdict(header, bm, path)
    return {
        "file": path,
        "version": header.version,
        "size": header.image_size,
        "granularity": header.granularity,
        "clusters": header.clusters,
        "dirty-clusters": bm.count(),
        "dirty-bytes": dirty_bytes,
        "dirty-ranges": ranges,
        "more-dirty-ranges": bm.count() > 0 and len(ranges) == MAX_RANGES
        and next(bm.runs(ranges[-1]["offset"] + ranges[-1]["length"]), None) is not None,
        "clean-shutdown": header.clean,
        "in-use": is_in_use(path),
        "pivoted": header.pivoted,
        "ended": header.ended,
        "ended-at": format_time(header.ended_at) if header.ended else None,
        "ended-at-ns": header.ended_at if header.ended else None,
        "replica-consistent": not header.inconsistent,
        "source": header.source_id,
        "target": header.target_id,
        "generation": header.generation,
        "recently-cleared": list(header.recent_cleared),
        "verdict": verdict,
        "exit-code": code,
    }


def format_report(info: dict[str, Any]) -> str:
    """The human-readable report of :func:`inspect_file`'s dict."""
    lines = [
        f"file:           {info['file']}",
        f"image size:     {info['size']} bytes ({format_size(info['size'])})",
        f"granularity:    {info['granularity']} bytes ({format_size(info['granularity'])})",
        f"clusters:       {info['clusters']}",
        f"dirty clusters: {info['dirty-clusters']}",
        f"dirty bytes:    {info['dirty-bytes']} ({format_size(info['dirty-bytes'])})",
    ]
    if info["dirty-ranges"]:
        lines.append("dirty ranges:")
        for r in info["dirty-ranges"]:
            lines.append(f"  offset {r['offset']} length {r['length']} "
                         f"({format_size(r['offset'])} +{format_size(r['length'])})")
        if info["more-dirty-ranges"]:
            lines.append("  ...")
    lines.append("clean shutdown: " + ("yes" if info["clean-shutdown"] else f"no ({UNCLEAN_NOTE})"))
    lines.append("pivoted:        " + ("yes" if info["pivoted"] else "no"))
    lines.append("ended:          " + (f"yes, at {info['ended-at']} ({ENDED_NOTE})" if info["ended"]
                                       else "no"))
    lines.append("replica consistent: " + ("yes" if info["replica-consistent"]
                                           else f"no ({INCONSISTENT_NOTE})"))
    lines.append("in use:         " + (f"yes ({IN_USE_NOTE})" if info["in-use"] else "no"))
    lines.append(f"source:         {info['source']}")
    lines.append(f"target:         {info['target']}")
    lines.append(f"generation:     {info['generation']}")
    recent = info["recently-cleared"]
    if recent:
        lines.append(f"recently cleared: {len(recent)} clusters (a resume compares them), "
                     f"last {recent[-1]}")
    lines.append(info["verdict"])
    return "\n".join(lines)


def cli_inspect(args: argparse.Namespace) -> int:
    """Handler of ``mirrorfs bitmap inspect``.

    Args:
        args: ``file`` and ``json`` from the parser.

    Returns:
        0 clean or pivoted, 1 dirty or ended.

    Raises:
        BitmapFormatError: the file is unreadable or invalid (the CLI exits 2).
    """
    info = inspect_file(args.file)
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        print(format_report(info))
    return int(info["exit-code"])
