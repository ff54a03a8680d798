"""Transactions across images through a real mount (issue 5, "Done when" 2).

A writer process writes numbered records alternately to two images A and B in the mount, as fast
as it can: record n to A, then record n to B, then n+1 to A... Record n fills slot ``n % SLOTS``
of both images with its number. A transaction (``mirrorfs complete MOUNT A B``) closes both
images' gates, drains them, then acts on both: so the cut it takes must be a state the writer's
order allows, i.e. B's last record is A's last or A's last minus one, and each slot holds exactly
what it held at that instant (the newest record of that slot up to the cut). Two separate
completes would let the writer run on between them and break that.

- ``--no-pivot``: the targets are the copies at the cut; the sources keep receiving writes.
- pivot: the writer's open descriptors move to the targets, so the SOURCES hold the cut and the
  targets every record up to the writer's last.
- a transaction with one job not ready is refused (exit 1) and both jobs carry on unchanged;
- a pivot transaction that fails while preparing (one target vanished) switches neither image.

The writer runs twice: with plain buffered pwrite() and with O_DIRECT from a page-aligned buffer
(FUSE ``direct_io``: exactly one request per record, as QEMU with ``cache=none`` writes).
A buffered write whose buffer crosses a page the kernel must fault in may reach the daemon as two
requests, and a cut may fall between them (``docs/transactions.md``, "Limits").

Transactions and the write gate are explained in ``docs/transactions.md``.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from mounting import Mount, wait_for

REC = 4096
SLOTS = 64
SIZE = 1 << 20  # the records use the first SLOTS * REC bytes

# The writer: plain pwrite through the mount (mirrorfs has no writeback cache, so every call
# reaches the daemon in the writer's order). It prints "started" once both files are open, and
# its last record number when the stop file appears.
WRITER = r"""
import mmap, os, sys, time
a, b, stop, mode = sys.argv[1:5]
REC, SLOTS = %d, %d
flags = os.O_WRONLY | (os.O_DIRECT if mode == "direct" else 0)
fa = os.open(a, flags)
fb = os.open(b, flags)
buf = mmap.mmap(-1, REC)  # page-aligned, as O_DIRECT wants
print("started", flush=True)
n = 0
deadline = time.monotonic() + 150
while True:
    n += 1
    rec = (b"%%016d" %% n) * (REC // 16)
    off = (n %% SLOTS) * REC
    if mode == "direct":
        buf[:] = rec
        rec = buf
    if os.pwrite(fa, rec, off) != REC or os.pwrite(fb, rec, off) != REC:
        sys.exit("short write")
    if n %% 16 == 0 and (os.path.exists(stop) or time.monotonic() > deadline):
        break
os.close(fa)
os.close(fb)
print(n, flush=True)
""" % (REC, SLOTS)


def slots(path: Path) -> list[int]:
    """The record number in each slot of an image read directly (0 = never written).

    Raises:
        AssertionError: a slot holds a torn or foreign record.
    """
    data = path.read_bytes()[:SLOTS * REC]
    out = []
    for s in range(SLOTS):
        rec = data[s * REC:(s + 1) * REC]
        if rec == bytes(REC):
            out.append(0)
            continue
        head = rec[:16]
        if not (head.isdigit() and rec == head * (REC // 16)):
            pieces = [(i * 16, rec[i * 16:i * 16 + 16]) for i in range(REC // 16)
                      if i == 0 or rec[i * 16:i * 16 + 16] != rec[i * 16 - 16:i * 16]]
            raise AssertionError(f"{path}: slot {s} holds a torn record: (offset, bytes) where the "
                                 f"content changes: {pieces[:8]}")
        out.append(int(head))
    return out


def progress(path: Path) -> int:
    """The newest record number in a file that is being written right now.

    Only for watching progress: a read that races with a write may see a page half old and half
    new (reads do not wait for writes), so this looks at each slot's first 16 bytes only. The
    strict ``slots`` is for files nobody writes any more.
    """
    data = path.read_bytes()[:SLOTS * REC]
    heads = [data[s * REC:s * REC + 16] for s in range(SLOTS)]
    return max((int(h) for h in heads if h.isdigit()), default=0)


def expected_slots(last: int) -> list[int]:
    """Each slot's content right after record ``last`` was written: its newest record <= last."""
    out = []
    for s in range(SLOTS):
        m = last - ((last - s) % SLOTS)
        out.append(m if m > 0 else 0)
    return out


def status_json(mount: Mount) -> list[dict[str, Any]]:
    return json.loads((mount.control / "status.json").read_text())


def wait_jobs(mount: Mount, pred: Any, what: str, timeout: float = 90.0) -> list[dict[str, Any]]:
    seen: list[Any] = [None]

    def check() -> bool:
        seen[0] = status_json(mount)
        return pred({j["device"]: j for j in seen[0]})

    try:
        wait_for(check, timeout, what, interval=0.1)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; last status: {seen[0]}") from None
    return seen[0]


def make_zero_image(path: Path) -> None:
    with open(path, "wb") as f:
        f.truncate(SIZE)


class Writer:
    """The alternating writer process; always stopped and reaped by ``stop()``."""

    def __init__(self, a: Path, b: Path, tmp: Path, mode: str = "buffered") -> None:
        self.stop_file = tmp / "writer.stop"
        self.proc = subprocess.Popen([sys.executable, "-c", WRITER, str(a), str(b), str(self.stop_file), mode],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().strip()
        assert line == "started", f"writer did not start: {line!r} {self.proc.stderr.read() if self.proc.poll() is not None else ''}"

    def stop(self) -> int:
        """Stop the writer; returns its last record number.

        Raises:
            AssertionError: the writer failed (an I/O error through the mount).
        """
        self.stop_file.touch()
        try:
            out, err = self.proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError("the writer did not stop within 60 s") from None
        assert self.proc.returncode == 0, f"writer failed: {err}"
        return int(out.strip())

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def _start_pair(mount: Mount, tmp_path: Path) -> tuple[Path, Path]:
    make_zero_image(mount.mountpoint / "a.img")
    make_zero_image(mount.mountpoint / "b.img")
    ta, tb = tmp_path / "a-target.img", tmp_path / "b-target.img"
    mount.cli("mirror", mount.mountpoint, "a.img", ta, "--create")
    mount.cli("mirror", mount.mountpoint, "b.img", tb, "--create")
    return ta, tb


def _run_cut(mount: Mount, tmp_path: Path, mode: str, *extra: str) -> tuple[Path, Path, int]:
    """Mirror a and b, run the writer, complete both in one transaction while it writes.
    Returns the two targets and the writer's last record number."""
    ta, tb = _start_pair(mount, tmp_path)
    writer = Writer(mount.mountpoint / "a.img", mount.mountpoint / "b.img", tmp_path, mode)
    try:
        wait_for(lambda: progress(mount.source / "b.img") > 200, 60, "the writer to get going")
        wait_jobs(mount, lambda j: len(j) == 2 and all(x["ready"] for x in j.values()),
                  "both jobs ready while the writer writes")
        before = progress(mount.source / "a.img")
        r = mount.cli("complete", mount.mountpoint, "a.img", "b.img", *extra, check=False)
        assert r.returncode == 0, r.stderr
        assert "completed a.img" in r.stdout and "completed b.img" in r.stdout
        assert status_json(mount) == []
        # Let the writer run on after the cut (on the sources without a pivot, on the targets
        # after one), so a cut taken at two instants would show.
        live = mount.source / "a.img" if "--no-pivot" in extra else ta
        mid = progress(live)
        wait_for(lambda: progress(live) > mid + 500, 60, "the writer to go on after the transaction")
        last = writer.stop()
    finally:
        writer.kill()
    assert last > before
    return ta, tb, last


def _assert_cut(a: Path, b: Path, writer_last: int) -> int:
    """``a`` and ``b`` hold one point in time of the writer's sequence; returns A's last record."""
    sa, sb = slots(a), slots(b)
    last_a, last_b = max(sa), max(sb)
    assert 0 < last_a < writer_last, (last_a, writer_last)
    assert last_b in (last_a, last_a - 1), f"not one point in time: A's last {last_a}, B's last {last_b}"
    assert sa == expected_slots(last_a), "A is not the state right after its last record"
    assert sb == expected_slots(last_b), "B is not the state right after its last record"
    return last_a


WRITE_MODES = pytest.mark.parametrize("mode", ["buffered", "direct"])


@WRITE_MODES
def test_complete_no_pivot_cuts_both_targets_at_one_point(mounted: Mount, tmp_path: Path, mode: str) -> None:
    ta, tb, last = _run_cut(mounted, tmp_path, mode, "--no-pivot")
    cut = _assert_cut(ta, tb, last)
    # The sources stayed live: they hold the writer's every record, well past the cut.
    assert slots(mounted.source / "a.img") == expected_slots(last)
    assert slots(mounted.source / "b.img") == expected_slots(last)
    assert last > cut + 500


@WRITE_MODES
def test_complete_with_pivot_leaves_the_cut_on_the_sources(mounted: Mount, tmp_path: Path, mode: str) -> None:
    ta, tb, last = _run_cut(mounted, tmp_path, mode)
    # After the switch the writer's open descriptors wrote to the targets: the sources are the
    # images at the switch, the targets hold everything.
    cut = _assert_cut(mounted.source / "a.img", mounted.source / "b.img", last)
    assert slots(ta) == expected_slots(last)
    assert slots(tb) == expected_slots(last)
    assert last > cut + 500
    # The mount serves the targets now.
    with open(mounted.mountpoint / "b.img", "rb") as f:
        assert f.read(SLOTS * REC) == tb.read_bytes()[:SLOTS * REC]


def test_transaction_with_a_job_not_ready_is_refused_and_changes_nothing(mounted: Mount, tmp_path: Path) -> None:
    make_zero_image(mounted.mountpoint / "a.img")
    with open(mounted.mountpoint / "slow.img", "wb") as f:
        f.write(os.urandom(8 << 20))
    ta, ts = tmp_path / "a-target.img", tmp_path / "slow-target.img"
    mounted.cli("mirror", mounted.mountpoint, "a.img", ta, "--create")
    mounted.cli("mirror", mounted.mountpoint, "slow.img", ts, "--create", "--speed", "128K",
                "--buf-size", "256K")
    wait_jobs(mounted, lambda j: j["a.img"]["ready"] and j["slow.img"]["offset"] > 0,
              "a ready, slow copying")
    before = {j["device"]: j for j in status_json(mounted)}
    assert not before["slow.img"]["ready"]
    for argv in (("complete", mounted.mountpoint, "a.img", "slow.img"),
                 ("complete", mounted.mountpoint, "slow.img", "a.img", "--no-pivot")):
        r = mounted.cli(*argv, check=False)
        assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
        assert r.stderr.count("\n") == 1 and r.stderr.startswith("mirrorfs complete: ")
        assert "'slow.img' cannot be completed: it is not ready yet" in r.stderr
        assert "Traceback" not in r.stderr
    # The same transaction through the control file: EBUSY, and the reason in its history.
    fd = os.open(mounted.control / "control", os.O_WRONLY)
    try:
        with pytest.raises(OSError) as refused:
            os.write(fd, b"complete a.img slow.img pivot=false\n")
    finally:
        os.close(fd)
    assert refused.value.errno == errno.EBUSY
    last = (mounted.control / "control").read_text().splitlines()[-1]
    assert ("complete a.img slow.img pivot=false -> error: job 'slow.img' cannot be completed: "
            "it is not ready yet") in last
    after = {j["device"]: j for j in status_json(mounted)}
    keys = ("status", "ready", "paused", "target", "io-status", "speed", "len", "copy-mode")
    for device in ("a.img", "slow.img"):
        assert {k: after[device][k] for k in keys} == {k: before[device][k] for k in keys}
    # Nothing was switched: the mount still serves the source; writes go on, the slow job copies on.
    data = os.urandom(REC)
    with open(mounted.mountpoint / "a.img", "r+b") as f:
        f.write(data)
    assert (mounted.source / "a.img").read_bytes()[:REC] == data
    wait_for(lambda: ta.read_bytes()[:REC] == data, 30, "the write to be mirrored to a's target")
    offset = after["slow.img"]["offset"]
    wait_jobs(mounted, lambda j: j["slow.img"]["offset"] > offset and j["a.img"]["ready"],
              "the slow job to copy on")
    r = mounted.cli("cancel", mounted.mountpoint, "a.img", "slow.img", "--force", check=False)
    assert r.returncode == 0, r.stderr
    assert status_json(mounted) == []
    assert (mounted.source / "slow.img").exists()


def _fds_on(pid: int, path: Path) -> int:
    """How many descriptors of process ``pid`` are open on ``path``."""
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") == str(path):
                count += 1
        except OSError:
            pass
    return count


def test_a_pivot_that_fails_for_one_image_switches_none(mounted: Mount, tmp_path: Path) -> None:
    """All or nothing when an action fails late (while preparing, after the gates closed): b's
    target has vanished, so b cannot pivot; a, prepared first, must not switch either, and must
    not keep the descriptors it had opened on its target for the switch."""
    make_zero_image(mounted.mountpoint / "a.img")
    make_zero_image(mounted.mountpoint / "b.img")
    ta, tb = tmp_path / "a-target.img", tmp_path / "b-target.img"
    mounted.cli("mirror", mounted.mountpoint, "a.img", ta, "--create")
    mounted.cli("mirror", mounted.mountpoint, "b.img", tb, "--create")
    wait_jobs(mounted, lambda j: len(j) == 2 and all(x["ready"] for x in j.values()), "both ready")
    with open(mounted.mountpoint / "a.img", "r+b", buffering=0) as fa, \
            open(mounted.mountpoint / "a.img", "rb", buffering=0) as fa2, \
            open(mounted.mountpoint / "b.img", "r+b", buffering=0) as fb:
        held = _fds_on(mounted.pid, ta)
        tb.unlink()  # b's job keeps its open target; a pivot to the path cannot open it
        r = mounted.cli("complete", mounted.mountpoint, "a.img", "b.img", check=False)
        assert r.returncode == 1, (r.returncode, r.stderr)
        assert "cannot pivot 'b.img'" in r.stderr and r.stderr.count("\n") == 1, r.stderr
        after = {j["device"]: j for j in status_json(mounted)}
        assert {d: (j["status"], j["target"]) for d, j in after.items()} == \
            {"a.img": ("ready", str(ta)), "b.img": ("ready", str(tb))}
        # a still runs on its source, mirrored, through the handles that were open all along.
        fa.write(b"still the source")
        assert (mounted.source / "a.img").read_bytes()[:16] == b"still the source"
        assert fa2.read(16) == b"still the source"
        wait_for(lambda: ta.read_bytes()[:16] == b"still the source", 30, "the write mirrored to a's target")
        assert _fds_on(mounted.pid, ta) == held, "a's pivot descriptors leaked"
        fb.write(b"b too")
        assert (mounted.source / "b.img").read_bytes()[:5] == b"b too"
    r = mounted.cli("cancel", mounted.mountpoint, "a.img", "b.img", check=False)
    assert r.returncode == 0, r.stderr
