"""Check the disks after a pivot under a writer that kept writing through it.

A record writer (the guest's, or :mod:`guest.hostwriter`) wrote records ``1 .. last`` in order,
one acknowledged write at a time, to an image while ``mirrorfs complete`` pivoted it from the
source to the target. Then, and only then:

- the target holds the whole unbroken run ``1 .. last`` (then zeroes);
- the source holds an unbroken prefix ``1 .. k`` of the same run (none missing, then zeroes),
  with ``k < last``: the records after the switch never reached it;
- records ``1 .. k`` are byte for byte the same on both disks.

``k`` is where the switch fell. Run as a program (``python -m guest.pivotcheck``, with
``tests/`` on ``sys.path``) it prints the result as the demo's summary lines and exits 1 with
the reason when a disk does not check out.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

from . import RecordError
from .records import RecordRun, assert_same_records, verify_file


@dataclass(frozen=True)
class PivotCheck:
    """The record runs found on both disks after a pivot that :func:`check_pivot` accepted."""

    source: RecordRun
    target: RecordRun

    @property
    def switch(self) -> int:
        """``k``: the last record written before the switch (the source's last)."""
        return self.source.last

    @property
    def after(self) -> int:
        """How many records were written after the switch (on the target only)."""
        return self.target.last - self.source.last


def _verify(path: Path) -> RecordRun:
    """:func:`verify_file`, its error naming the disk."""
    try:
        return verify_file(path)
    except RecordError as exc:
        raise RecordError(f"{path}: {exc}") from None


def check_pivot(source: Path, target: Path, *, last: int, run_id: int,
                within: tuple[int, int] | None = None) -> PivotCheck:
    """Check raw images ``source`` and ``target`` after a pivot under a record writer.

    Args:
        source: the image the mount served before the switch.
        target: the image it served after it.
        last: the writer's last sequence number (from its ``stopped`` report).
        run_id: the writer's run id.
        within: ``(low, high)`` bounds for ``k`` when known, e.g. the writer's progress seen
            before ``complete`` started and the first progress seen after it returned.

    Raises:
        RecordError: says which disk or which record does not check out.
    """
    on_target = _verify(target)
    if (on_target.first, on_target.last, on_target.run_id) != (1, last, run_id):
        raise RecordError(f"{target}: holds records {on_target.first}..{on_target.last} of run"
                          f" {on_target.run_id}, the writer wrote 1..{last} of run {run_id}")
    on_source = _verify(source)
    k = on_source.last
    if k == 0 or on_source.run_id != run_id:
        raise RecordError(f"{source}: holds {k} records of run {on_source.run_id}, expected"
                          f" a prefix of run {run_id}")
    if k >= last:
        raise RecordError(f"{source}: holds all {last} records, so none was written after"
                          " the switch or the source still received writes after it")
    if within is not None and not within[0] <= k <= within[1]:
        raise RecordError(f"{source}: the switch fell after record {k}, outside the writer's"
                          f" progress {within[0]}..{within[1]} around `complete`")
    assert_same_records(source, target, k)
    return PivotCheck(source=on_source, target=on_target)


def summary(check: PivotCheck) -> list[str]:
    """The demo's summary lines for an accepted pivot."""
    k, last = check.switch, check.target.last
    return [
        f"  before the switch: records 1..{k} on both disks, byte for byte identical",
        f"  after the switch:  records {k + 1}..{last} ({check.after}) on the target only",
        f"  source:            records 1..{k}, an unbroken prefix (none missing), then zeroes",
        f"  target:            records 1..{last}, unbroken, then zeroes",
    ]


def main(argv: list[str] | None = None) -> int:
    """Check a pivot's disks; print the summary lines, or the reason on stderr and return 1."""
    parser = argparse.ArgumentParser(prog="python -m guest.pivotcheck", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", type=Path, help="the source image (raw)")
    parser.add_argument("target", type=Path, help="the target image (raw)")
    parser.add_argument("--last", type=int, required=True, help="the writer's last record")
    parser.add_argument("--run", type=int, required=True, help="the writer's run id")
    parser.add_argument("--within", type=int, nargs=2, metavar=("LOW", "HIGH"),
                        help="bounds for the switch: the writer's progress around `complete`")
    parser.add_argument("--mount", type=Path,
                        help="the image's path in the mount, which must now read as the target")
    args = parser.parse_args(argv)
    try:
        check = check_pivot(args.source, args.target, last=args.last, run_id=args.run,
                            within=tuple(args.within) if args.within else None)
        if args.mount is not None and _verify(args.mount).last != args.last:
            raise RecordError(f"{args.mount}: does not read as the target")
    except (RecordError, OSError) as exc:
        print(f"  verification:      FAILED: {exc}", file=sys.stderr)
        return 1
    print("\n".join(summary(check)))
    print("  verification:      ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
