"""The guest's record writer on the host, for where no guest can be built.

It writes the very records the guest writes (``guestrec.c``, :func:`guest.records.make_record`):
record ``seq`` into slot ``seq - 1``, in order, each one acknowledged before the next is sent.
The I/O is done by one long-lived ``qemu-io`` (QEMU's own block layer, ``cache=none`` by
default) that keeps the image open the whole time, as a VM would, fed one ``write -s`` command
at a time on its stdin. Its report lines are the guest console's (``WRITER started``,
``WRITER progress seq=N``, ``WRITER stopped records=N first=1 last=N run=R by=stop``), so the
same tools read either.

Run as ``python -m guest.hostwriter IMAGE --stop FILE`` (with ``tests/`` on ``sys.path``): it
writes until FILE exists, then flushes and reports.
"""

from __future__ import annotations

import argparse
import re
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO

from . import GuestError
from .records import RECORD_SIZE, make_record

#: Seconds between progress lines (the guest prints one every 0.5 s).
PROGRESS_EVERY = 0.2


def _write(qemu_io: subprocess.Popen[str], command: str, offset: int | None) -> None:
    """Send ``command`` to qemu-io; with ``offset``, wait for its report of that write.

    Raises:
        GuestError: qemu-io reported a failure or exited.
    """
    assert qemu_io.stdin is not None and qemu_io.stdout is not None
    try:
        qemu_io.stdin.write(command + "\n")
        qemu_io.stdin.flush()
    except BrokenPipeError:
        raise GuestError(f"qemu-io exited: {qemu_io.stdout.read().strip()[-300:]}") from None
    if offset is None:
        return
    want = re.compile(rf"wrote {RECORD_SIZE}/{RECORD_SIZE} bytes at offset {offset}\b")
    while line := qemu_io.stdout.readline():
        if want.search(line):
            return
        if "fail" in line or "error" in line.lower() or "can't" in line:
            raise GuestError(f"qemu-io: {line.removeprefix('qemu-io> ').strip()}")
    raise GuestError(f"qemu-io exited before writing offset {offset}")


def write_records(image: Path, stop: Path, *, run_id: int, interval: float, cache: str,
                  log: IO[str]) -> int:
    """Write records ``1, 2, ...`` to ``image`` until ``stop`` exists; return the last one.

    Raises:
        GuestError: qemu-io failed to start, to write or to flush.
    """
    slots = image.stat().st_size // RECORD_SIZE
    print(f"WRITER started run={run_id} first=1 slots={slots}", file=log, flush=True)
    with tempfile.TemporaryDirectory(prefix="mirrorfs-hostwriter.") as tmp:
        pattern = Path(tmp) / "record"
        qemu_io = subprocess.Popen(["qemu-io", "-f", "raw", "-t", cache, str(image)],
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True, bufsize=1)
        assert qemu_io.stdin is not None and qemu_io.stdout is not None
        seq, last_print, full = 0, time.monotonic(), False
        try:
            while not stop.exists():
                if seq >= slots:
                    if not full:
                        print(f"WRITER full last={seq}", file=log, flush=True)
                        full = True
                    time.sleep(0.1)
                    continue
                # qemu-io reads the pattern file when it runs the command; it has answered
                # before the file is rewritten, since each write waits for its ack.
                pattern.write_bytes(make_record(run_id, seq + 1))
                _write(qemu_io, f"write -s {pattern} {seq * RECORD_SIZE} {RECORD_SIZE}",
                       seq * RECORD_SIZE)
                seq += 1
                if time.monotonic() - last_print >= PROGRESS_EVERY:
                    print(f"WRITER progress seq={seq}", file=log, flush=True)
                    last_print = time.monotonic()
                time.sleep(interval)
            _write(qemu_io, "flush", None)
            qemu_io.stdin.close()
            rest = qemu_io.stdout.read()
            if qemu_io.wait(timeout=60) != 0 or "fail" in rest:
                raise GuestError(f"qemu-io failed at the end: {rest.strip()[-300:]}")
        finally:
            if qemu_io.poll() is None:
                qemu_io.kill()
                qemu_io.wait()
    print(f"WRITER stopped records={seq} first=1 last={seq} run={run_id} by=stop",
          file=log, flush=True)
    return seq


def main(argv: list[str] | None = None) -> int:
    """Run the writer; 0 when it stopped as asked, 2 (with a ``WRITER error`` line) if not."""
    parser = argparse.ArgumentParser(prog="python -m guest.hostwriter", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("image", type=Path, help="the raw image to write records to")
    parser.add_argument("--stop", type=Path, required=True,
                        help="stop once this file exists")
    parser.add_argument("--run", type=int, default=0, help="the run id (default: random)")
    parser.add_argument("--interval-us", type=int, default=2000,
                        help="pause after each record, as the guest's interval_us")
    parser.add_argument("--cache", default="none", help="qemu-io's -t (default: none)")
    args = parser.parse_args(argv)
    # So that `kill` ends qemu-io too and removes the pattern file.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        write_records(args.image, args.stop, run_id=args.run or secrets.randbits(63) | 1,
                      interval=args.interval_us / 1e6, cache=args.cache, log=sys.stdout)
    except (GuestError, OSError) as exc:
        print(f"WRITER error {exc}", flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
