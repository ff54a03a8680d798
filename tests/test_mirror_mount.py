"""Issue 4 through a real mount: mirror jobs driven by the real CLI, written by real programs.

Every test mounts mirrorfs (``mounted`` / ``mount_factory``), starts jobs with ``mirrorfs
mirror``, watches them with ``mirrorfs status --json`` and ends them with ``mirrorfs
complete|cancel``; the writers are real processes (``qemu-io``, ``dd``, Python writer
subprocesses writing through the mount). Results are checked by comparing the files' bytes and by
reading bytes back from the source and target files directly (not through the mount).

"Done when" map: 1 ``test_sync_mode_*``; 2 ``test_stress_*`` and
``test_write_blocking_*``; 3 ``test_pivot_with_a_process_keeping_the_image_open`` (a Python
writer and ``qemu-io`` interactive) and ``test_pivot_under_concurrent_writers_*``; 4
``test_top_on_a_16g_sparse_image_*``; 5 ``test_pause_*``; 6 ``test_on_target_error_*``,
``test_duplicates_meeting_a_full_target_*``, ``test_unmount_while_stopped_*``; 7
``test_resume_after_unmount_*``, ``test_resume_after_the_daemon_is_killed_mid_copy``. Also: op
blockers (EBUSY) and the pivoted bitmap flag. The benchmark (8) is ``scripts/bench`` (the job's
cost against the bare mount: ``test_mirror_bench.py``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from compare import assert_differ, assert_identical
from mounting import Mount, process_alive, wait_for

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30

# ---------------------------------------------------------------------------- helpers


def make_image(path: Path, size: int, seed: int, *, holes: bool = True) -> bytes:
    """Write a raw image of known content: random 64 KiB blocks, some zero, some holes."""
    rng = random.Random(seed)
    block = 64 * KiB
    content = bytearray(size)
    with open(path, "wb") as f:
        f.truncate(size)
        for off in range(0, size, block):
            kind = rng.random()
            n = min(block, size - off)
            if holes and kind < 0.2:
                continue  # a hole
            data = bytes(n) if holes and kind < 0.3 else rng.randbytes(n)
            content[off:off + n] = data
            f.seek(off)
            f.write(data)
    return bytes(content)


def jobs(mount: Mount) -> list[dict[str, Any]]:
    """``mirrorfs status --json``."""
    return json.loads(mount.cli("status", mount.mountpoint, "--json").stdout)


def job(mount: Mount, device: str) -> dict[str, Any] | None:
    return next((j for j in jobs(mount) if j["device"] == device), None)


def wait_job(mount: Mount, device: str, pred: Callable[[dict[str, Any]], bool], what: str,
             timeout: float = 60.0) -> dict[str, Any]:
    """Poll ``status --json`` until the job satisfies ``pred``; returns that entry."""
    seen: list[dict[str, Any] | None] = [None]

    def check() -> bool:
        seen[0] = job(mount, device)
        return seen[0] is not None and pred(seen[0])

    try:
        wait_for(check, timeout, f"{device}: {what}", interval=0.1)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; last status: {seen[0]}\nlog tail:\n{mount.read_log()[-3000:]}") from None
    assert seen[0] is not None
    return seen[0]


def wait_ready(mount: Mount, device: str, timeout: float = 60.0, *, writes_idle: bool = True) -> dict[str, Any]:
    """Wait for the job to be ready. With ``writes_idle`` (no writer running) also wait until
    nothing is dirty (offset == len): a ready job stays ready while the copy task cleans what
    writes dirtied (clusters a split write left dirty, or all written while it was paused in
    standby), as QEMU's ready is sticky; a writer's write in flight dirties its clusters for a
    moment."""
    def done(j: dict[str, Any]) -> bool:
        return j["ready"] and (not writes_idle or (j["offset"] == j["len"] and j["dirty-bytes"] == 0))

    entry = wait_job(mount, device, done, "ready" + (" and clean" if writes_idle else ""), timeout)
    assert entry["status"] == "ready", entry
    return entry


def read_at(path: Path, offset: int, length: int) -> bytes:
    with open(path, "rb") as f:
        return os.pread(f.fileno(), length, offset)


def sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 * MiB):
            h.update(chunk)
    return h.hexdigest()


def qemu_io(path: Path, *commands: str) -> str:
    """Run ``qemu-io`` one-shot on a file through the mount; it must succeed."""
    argv = ["qemu-io", "-f", "raw"]
    for c in commands:
        argv += ["-c", c]
    proc = subprocess.run([*argv, str(path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "error" not in proc.stdout.lower() + proc.stderr.lower(), \
        f"{' '.join(argv)}: exit {proc.returncode}\n{proc.stdout}{proc.stderr}"
    return proc.stdout


#: A writer process: random unaligned writes of random bytes (within [LO, HI) if given) until
#: COUNT writes are done or the STOP file exists; ``replay_writes`` computes the same writes. Prints "bytes SECONDS" at the end; any error makes it exit non-zero.
RANDOM_WRITER = r"""
import os, random, sys, time
path, seed, count, maxlen, stop = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
rng = random.Random(seed)
fd = os.open(path, os.O_RDWR | (os.O_DIRECT if os.environ.get("WRITER_O_DIRECT") else 0))
lo, hi = (int(sys.argv[6]), int(sys.argv[7])) if len(sys.argv) > 7 else (0, os.fstat(fd).st_size)
total, start, i = 0, time.monotonic(), 0
while (count <= 0 or i < count) and not os.path.exists(stop):
    n = rng.randint(1, maxlen)
    off = rng.randrange(lo, hi - n)
    data = rng.randbytes(n)
    assert os.pwrite(fd, data, off) == n
    total += n
    i += 1
os.fsync(fd)
os.close(fd)
print(total, time.monotonic() - start, i)
"""

#: A writer driven over stdin, one command a line: "w OFFSET LENGTH BYTE" (pwrite LENGTH copies of
#: BYTE), "f" (fsync), "q" (close, exit). Answers "ok" or "error ..." to each.
INTERACTIVE_WRITER = r"""
import os, sys
fd = os.open(sys.argv[1], os.O_RDWR)
print("ready", flush=True)
for line in sys.stdin:
    words = line.split()
    try:
        if words[0] == "w":
            off, n, byte = int(words[1]), int(words[2]), int(words[3])
            assert os.pwrite(fd, bytes([byte]) * n, off) == n
        elif words[0] == "f":
            os.fsync(fd)
        elif words[0] == "q":
            os.close(fd)
            print("ok", flush=True)
            break
        print("ok", flush=True)
    except Exception as exc:
        print("error", type(exc).__name__, exc, flush=True)
"""


def replay_writes(seed: int, count: int, maxlen: int, lo: int, hi: int) -> Iterator[tuple[int, bytes]]:
    """The (offset, data) writes RANDOM_WRITER does with these arguments, in order."""
    rng = random.Random(seed)
    for _ in range(count):
        n = rng.randint(1, maxlen)
        off = rng.randrange(lo, hi - n)
        yield off, rng.randbytes(n)


@contextlib.contextmanager
def writers(image: Path, seeds: list[int], tmp_path: Path, *, count: int = 0, maxlen: int = 20000,
            regions: list[tuple[int, int]] | None = None,
            direct: bool = False) -> Iterator[Callable[[], list[tuple[int, float, int]]]]:
    """Run one RANDOM_WRITER per seed on ``image`` (writer i within ``regions[i]`` if given,
    opening it with O_DIRECT if ``direct``);
    yields ``finish()`` which stops them (when ``count`` is 0) and returns each writer's
    (bytes, seconds, writes). Always killed on exit."""
    stop = tmp_path / f"stop-{image.name}"
    stop.unlink(missing_ok=True)
    procs = [subprocess.Popen([sys.executable, "-c", RANDOM_WRITER, str(image), str(seed), str(count),
                               str(maxlen), str(stop), *(map(str, regions[i]) if regions else ())],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "WRITER_O_DIRECT": "1" if direct else ""})
             for i, seed in enumerate(seeds)]

    def finish() -> list[tuple[int, float, int]]:
        if count <= 0:
            stop.touch()
        results = []
        for p in procs:
            out, err = p.communicate(timeout=120)
            assert p.returncode == 0, f"writer failed ({p.returncode}): {err}"
            total, secs, n = out.split()
            results.append((int(total), float(secs), int(n)))
        return results

    try:
        yield finish
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


# ---------------------------------------------------------------------------- 1: sync modes

ENDINGS = ("pivot", "no-pivot", "cancel")


def _end_and_check(mount: Mount, name: str, ending: str, source: Path, target: Path) -> None:
    """End a ready job one of three ways and check the images (item 1)."""
    image = mount.mountpoint / name
    if ending == "pivot":
        out = mount.cli("complete", mount.mountpoint, name).stdout
        assert "now serves the target" in out
        assert_identical(source, target)  # identical at the switch
        qemu_io(image, "write -P 0xa7 12345 70000")
        assert read_at(target, 12345, 70000) == b"\xa7" * 70000
        assert read_at(source, 12345, 70000) != b"\xa7" * 70000
        assert_differ(source, target)
    else:
        if ending == "no-pivot":
            out = mount.cli("complete", mount.mountpoint, name, "--no-pivot").stdout
            assert "exact copy" in out
        else:
            out = mount.cli("cancel", mount.mountpoint, name).stdout
            assert "cancelled" in out and "exact copy" in out
        assert_identical(source, target)
        # The mount stays on the source, and the job is gone: later writes reach the source only.
        qemu_io(image, "write -P 0xa8 777 5000")
        assert read_at(source, 777, 5000) == b"\xa8" * 5000
        assert read_at(target, 777, 5000) != b"\xa8" * 5000
    assert job(mount, name) is None


def _images(mount: Mount, size: int, seed: int) -> list[tuple[str, Path]]:
    out = []
    for i, ending in enumerate(ENDINGS):
        name = f"{ending}.raw"
        make_image(mount.source / name, size, seed + i)
        out.append((name, mount.source / name))
    return out


def test_sync_mode_full_reaches_ready_and_every_ending_leaves_identical_images(mounted: Mount, tmp_path: Path) -> None:
    size = 6 * MiB
    images = _images(mounted, size, 10)
    for name, _ in images:
        mounted.cli("mirror", mounted.mountpoint, name, tmp_path / f"t-{name}", "--create")
        # Writes while the job runs: duplicated or copied, never lost.
        qemu_io(mounted.mountpoint / name, "write -P 0x11 4096 65536", "write -P 0x22 1000000 333")
    for (name, source), ending in zip(images, ENDINGS):
        entry = wait_ready(mounted, name)
        assert entry["len"] == size and entry["type"] == "mirror" and entry["io-status"] == "ok"
        assert read_at(source, 4096, 65536) == b"\x11" * 65536
        _end_and_check(mounted, name, ending, source, tmp_path / f"t-{name}")


def test_sync_mode_top_copies_allocated_extents_only(mounted: Mount, tmp_path: Path) -> None:
    size = 6 * MiB
    images = _images(mounted, size, 20)
    for (name, _), ending in zip(images, ENDINGS):
        target = tmp_path / f"t-{name}"
        mounted.cli("mirror", mounted.mountpoint, name, target, "--create", "--sync", "top")
    for (name, source), ending in zip(images, ENDINGS):
        entry = wait_ready(mounted, name)
        # Only the allocated extents were read: fewer than all bytes went over as data.
        assert 0 < entry["__org.mirrorfs_copied-bytes"] < size
        _end_and_check(mounted, name, ending, source, tmp_path / f"t-{name}")


def test_sync_mode_none_mirrors_new_writes_only(mounted: Mount, tmp_path: Path) -> None:
    size = 6 * MiB
    images = _images(mounted, size, 30)
    for (name, source), ending in zip(images, ENDINGS):
        target = tmp_path / f"t-{name}"
        subprocess.run(["cp", "--sparse=always", str(source), str(target)], check=True)
        mounted.cli("mirror", mounted.mountpoint, name, target, "--sync", "none")
    for (name, source), ending in zip(images, ENDINGS):
        target = tmp_path / f"t-{name}"
        wait_ready(mounted, name)
        qemu_io(mounted.mountpoint / name, "write -P 0x33 99999 123456")
        assert read_at(target, 99999, 123456) == b"\x33" * 123456  # the duplicate reached the target
        entry = wait_ready(mounted, name)
        # Nothing of the image was copied; at most the clusters of that write (its pieces may
        # arrive split and overlapping, leaving a cluster dirty for the copy task to redo).
        assert entry["__org.mirrorfs_copied-bytes"] <= 4 * 64 * KiB, entry
        _end_and_check(mounted, name, ending, source, target)


def test_sync_mode_dirty_finishes_interrupted_jobs(mounted: Mount, tmp_path: Path) -> None:
    """Jobs with --bitmap are interrupted (cancel --force mid-copy, after which the bitmap records
    that it stopped recording), then restarted with ``--sync dirty --bitmap FILE
    --verify-resync``: they copy only the clusters that differ and end identical."""
    size = 8 * MiB
    images = _images(mounted, size, 40)
    for name, _ in images:
        mounted.cli("mirror", mounted.mountpoint, name, tmp_path / f"t-{name}", "--create",
                    "--bitmap", tmp_path / f"{name}.bitmap", "--speed", "1M", "--buf-size", "256K")
    for name, _ in images:
        wait_job(mounted, name, lambda j: 0 < j["offset"] < j["len"], "mid-copy")
        qemu_io(mounted.mountpoint / name, "write -P 0x44 5000000 70000")
        mounted.cli("cancel", mounted.mountpoint, name, "--force")
        assert job(mounted, name) is None
        # The interrupted job's work is in its bitmap.
        proc = mounted.cli("bitmap", "inspect", tmp_path / f"{name}.bitmap", check=False)
        assert proc.returncode == 1, proc.stdout + proc.stderr
    for name, source in images:
        refused = mounted.cli("mirror", mounted.mountpoint, name, tmp_path / f"t-{name}", "--sync",
                              "dirty", "--bitmap", tmp_path / f"{name}.bitmap", check=False)
        assert refused.returncode == 2 and "stopped recording when its job ended" in refused.stderr
        mounted.cli("mirror", mounted.mountpoint, name, tmp_path / f"t-{name}", "--sync", "dirty",
                    "--bitmap", tmp_path / f"{name}.bitmap", "--verify-resync")
    for (name, source), ending in zip(images, ENDINGS):
        entry = wait_ready(mounted, name)
        copied = entry["__org.mirrorfs_copied-bytes"]
        assert 0 < copied < size and entry["__org.mirrorfs_verified-equal-bytes"] > 0, entry
        _end_and_check(mounted, name, ending, source, tmp_path / f"t-{name}")


# ---------------------------------------------------------------------------- 2: stress

STRESS_CONFIGS = {
    # id: (copy mode, extra mirror arguments, images and targets on tmpfs)
    "background": ("background", ["--buf-size", "256K"], False),
    "write-blocking": ("write-blocking", ["--buf-size", "256K"], False),
    "background-4K": ("background", ["--granularity", "4K", "--buf-size", "16K"], False),
    "write-blocking-4K": ("write-blocking", ["--granularity", "4K", "--buf-size", "16K"], False),
    # On tmpfs, writes are served inline (source, target and bitmap without a yield) and meet
    # copies that run in worker threads.
    "background-4K-tmpfs": ("background", ["--granularity", "4K", "--buf-size", "16K"], True),
    "write-blocking-4K-tmpfs": ("write-blocking", ["--granularity", "4K", "--buf-size", "16K"], True),
}


@pytest.mark.parametrize("config", list(STRESS_CONFIGS))
def test_stress_concurrent_unaligned_writers_during_the_copy(mount_factory: Callable[..., Mount],
                                                            tmp_path: Path, shm_path: Path,
                                                            config: str) -> None:
    """Three writer processes do random unaligned writes through the mount while the background
    copy runs (rate-limited so that it lasts as long as the writers); after ready and ``complete
    --no-pivot`` the images are identical. Three rounds of three seeds per configuration (the
    second with O_DIRECT writers, as QEMU with cache=none, the third on an image ending in a
    partial cluster); the 4K rounds (granularity 4K, buf-size 16K) maximise collisions between
    copies and writes.

    That this kind of test catches a race is shown at the engine level:
    ``tests/test_mirror_engine.py::test_stress_detects_race_when_serialisation_is_disabled``
    disables the copy/write serialisation (``InflightOps.register`` without conflicts) and the
    same stress then ends with a target that differs from the source.
    """
    copy_mode, extra, on_tmpfs = STRESS_CONFIGS[config]
    if on_tmpfs:
        (shm_path / "source").mkdir()
        mount = mount_factory(source=shm_path / "source")
        tmp_path = shm_path  # the targets
    else:
        mount = mount_factory()
    overlap = []
    for rnd in range(3):
        # The last round's image ends in a partial cluster (the tail's edge rule).
        size = 4 * MiB + (12345 if rnd == 2 else 0)
        name = f"stress{rnd}.raw"
        source = mount.source / name
        target = tmp_path / f"t-{name}"
        make_image(source, size, 100 + rnd)
        seeds = [1000 * rnd + i for i in range(3)]
        mount.cli("mirror", mount.mountpoint, name, target, "--create", "--copy-mode", copy_mode,
                  "--speed", "1M", *extra)
        before = job(mount, name)
        assert before is not None and not before["ready"]
        # A fixed number of writes each: unbounded writers in background mode could keep every
        # cluster dirty forever (QEMU's background mode does not promise convergence either).
        with writers(mount.mountpoint / name, seeds, tmp_path, count=800, direct=rnd == 1) as finish:
            results = finish()
        during = job(mount, name)
        # (A write-blocking job may be ready by now: the writers' duplicates clean what they cover.)
        assert during is not None
        assert all(n == 800 for _, _, n in results), results
        overlap.append(during["__org.mirrorfs_duplicated-bytes"] + during["__org.mirrorfs_skipped-duplicates"])
        mount.cli("set-speed", mount.mountpoint, name, "0")
        wait_ready(mount, name)
        mount.cli("complete", mount.mountpoint, name, "--no-pivot")
        assert_identical(source, target)
    assert all(overlap), f"the writes did not meet the running job: {overlap}"


def test_write_blocking_converges_under_a_writer_faster_than_the_copy(mounted: Mount, tmp_path: Path) -> None:
    """With the copy limited to 1 MiB/s and a writer writing faster than that all the time,
    a write-blocking job still reaches ready (while the writer is still writing)."""
    size = 4 * MiB
    name = "busy.raw"
    source = mounted.source / name
    target = tmp_path / "busy-target.raw"
    make_image(source, size, 7)
    speed = 1 * MiB
    mounted.cli("mirror", mounted.mountpoint, name, target, "--create", "--copy-mode", "write-blocking",
                "--speed", str(speed), "--buf-size", "256K")
    t0 = time.monotonic()
    with writers(mounted.mountpoint / name, [5], tmp_path, maxlen=64 * KiB) as finish:
        wait_ready(mounted, name, timeout=60, writes_idle=False)
        ready_after = time.monotonic() - t0
        [(written, secs, _)] = finish()
    assert written / secs > speed, f"the writer ({written / secs / MiB:.2f} MiB/s) was not faster than the copy"
    assert secs >= ready_after * 0.9, "the writer stopped before the job became ready"
    mounted.cli("complete", mounted.mountpoint, name, "--no-pivot")
    assert_identical(source, target)


# ---------------------------------------------------------------------------- 3: pivot, open handle


class InteractiveWriter:
    """A Python process holding the image open, driven one command at a time over stdin:
    ``write(offset, length, byte)``, ``command("f")`` (fsync), ``close()`` (its exit code)."""

    def __init__(self, path: Path) -> None:
        self.proc = subprocess.Popen([sys.executable, "-u", "-c", INTERACTIVE_WRITER, str(path)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, bufsize=1)
        assert self._reply() == "ready"

    def _reply(self) -> str:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().strip()
        if not line:
            raise AssertionError(f"writer died: {self.proc.stderr.read() if self.proc.stderr else ''}")
        return line

    def command(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        reply = self._reply()
        assert reply == "ok", f"writer: {line!r} -> {reply!r}"

    def write(self, offset: int, length: int, byte: int) -> None:
        self.command(f"w {offset} {length} {byte}")

    def close(self) -> int:
        if self.proc.poll() is None:
            try:
                self.command("q")
                return self.proc.wait(timeout=30)
            finally:
                if self.proc.poll() is None:
                    self.proc.kill()
                    self.proc.wait()
        return self.proc.returncode


class QemuIOWriter:
    """``qemu-io`` in interactive mode holding the image open, driven over stdin (a real QEMU
    block layer on the image), with the same interface as ``InteractiveWriter``."""

    def __init__(self, path: Path) -> None:
        self.proc = subprocess.Popen(["qemu-io", "-f", "raw", str(path)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
        self.transcript: list[str] = []

    def _send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def _line(self) -> str:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        self.transcript.append(line)
        if not line:
            raise AssertionError("qemu-io died: " + "".join(self.transcript))
        return line

    def write(self, offset: int, length: int, byte: int) -> None:
        self._send(f"write -P {byte} {offset} {length}")
        reply = self._line()  # "qemu-io> [qemu-io> ...]wrote N/N bytes at offset X"
        assert f"wrote {length}/{length} bytes at offset {offset}" in reply, "".join(self.transcript)
        assert "ops;" in self._line(), "".join(self.transcript)  # the statistics line

    def command(self, line: str) -> None:
        # "f" = flush: qemu-io prints only its prompt; a failure would show up in the next reply.
        self._send({"f": "flush"}.get(line, line))

    def close(self) -> int:
        if self.proc.poll() is None:
            try:
                self._send("quit")
                rest, _ = self.proc.communicate(timeout=30)
                self.transcript.append(rest)
            finally:
                if self.proc.poll() is None:
                    self.proc.kill()
                    self.proc.wait()
        text = "".join(self.transcript).lower()
        assert "failed" not in text and "error" not in text, text
        return self.proc.returncode


@pytest.mark.parametrize("writer_kind", ["python", "qemu-io"])
def test_pivot_with_a_process_keeping_the_image_open(mounted: Mount, tmp_path: Path, writer_kind: str) -> None:
    """A writer keeps its file open across ``complete``: writes before the switch land in both
    images, writes after it in the target only, and the writer never sees an error."""
    size = 4 * MiB
    name = "live.raw"
    source = mounted.source / name
    target = tmp_path / "live-target.raw"
    content = make_image(source, size, 3)
    cls = InteractiveWriter if writer_kind == "python" else QemuIOWriter
    writer = cls(mounted.mountpoint / name)
    try:
        writer.write(10, 5000, 0x01)  # before the job
        mounted.cli("mirror", mounted.mountpoint, name, target, "--create")
        writer.write(70000, 3000, 0x02)  # during the job
        wait_ready(mounted, name)
        writer.write(200001, 100000, 0x03)  # ready, duplicated
        writer.command("f")
        mounted.cli("complete", mounted.mountpoint, name)
        assert job(mounted, name) is None
        before_switch = sha(source)
        writer.write(1 * MiB + 7, 50000, 0x04)  # after the switch: the target only
        writer.write(10, 100, 0x05)  # overwrite a pre-switch write
        writer.command("f")
        assert writer.close() == 0
    finally:
        writer.close()
    expected_source = bytearray(content)
    for off, n, b in ((10, 5000, 1), (70000, 3000, 2), (200001, 100000, 3)):
        expected_source[off:off + n] = bytes([b]) * n
    expected_target = bytearray(expected_source)
    for off, n, b in ((1 * MiB + 7, 50000, 4), (10, 100, 5)):
        expected_target[off:off + n] = bytes([b]) * n
    assert source.read_bytes() == bytes(expected_source), "the source changed after the switch"
    assert sha(source) == before_switch
    assert target.read_bytes() == bytes(expected_target), "the target lacks some of the writer's writes"
    # The mount now serves the target: a new reader sees the post-switch bytes.
    assert read_at(mounted.mountpoint / name, 1 * MiB + 7, 50000) == b"\x04" * 50000


# ---------------------------------------------------------------------------- 4: top on a sparse image


def allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def test_top_on_a_16g_sparse_image_copies_its_64m_and_keeps_the_target_sparse(mounted: Mount, tmp_path: Path) -> None:
    size = 16 * GiB
    name = "big.raw"
    source = mounted.source / name
    target = tmp_path / "big-target.raw"
    data_bytes = 64 * MiB
    rng = random.Random(16)
    # 16 extents of 4 MiB spread over the image (aligned, so the file system keeps them exact).
    slots = sorted(rng.sample(range(size // (4 * MiB)), 16))
    with open(source, "wb") as f:
        f.truncate(size)
        for slot in slots:
            f.seek(slot * 4 * MiB)
            f.write(rng.randbytes(4 * MiB))
    src_alloc = allocated(source)
    assert data_bytes <= src_alloc < 2 * data_bytes
    mounted.cli("mirror", mounted.mountpoint, name, target, "--create", "--sync", "top")
    entry = wait_ready(mounted, name, timeout=120)
    copied = entry["__org.mirrorfs_copied-bytes"]
    assert data_bytes <= copied <= data_bytes + 4 * MiB, f"copied {copied} bytes for {data_bytes} of data"
    assert entry["__org.mirrorfs_zeroed-bytes"] <= 4 * MiB, entry
    mounted.cli("complete", mounted.mountpoint, name, "--no-pivot")
    assert os.path.getsize(target) == size
    tgt_alloc = allocated(target)
    assert tgt_alloc <= 2 * src_alloc, f"target allocates {tgt_alloc} bytes, source {src_alloc}"
    # du agrees with st_blocks
    du = subprocess.run(["du", "-B1", str(source), str(target)], capture_output=True, text=True, check=True)
    du_src, du_tgt = (int(line.split()[0]) for line in du.stdout.splitlines())
    assert du_tgt <= 2 * du_src
    assert_identical(source, target)


# ---------------------------------------------------------------------------- 5: pause / resume


def _target_stays(target: Path, digest: str, seconds: float) -> None:
    """Poll the target's hash for ``seconds``: it must never change."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert sha(target) == digest, "the target changed while the job was paused"
        time.sleep(0.1)


def test_pause_leaves_the_target_unchanged_and_resume_converges(mounted: Mount, tmp_path: Path) -> None:
    size = 8 * MiB
    name = "paused.raw"
    source = mounted.source / name
    target = tmp_path / "paused-target.raw"
    make_image(source, size, 5)
    image = mounted.mountpoint / name
    mounted.cli("mirror", mounted.mountpoint, name, target, "--create", "--speed", "1M", "--buf-size", "256K")
    wait_job(mounted, name, lambda j: 0 < j["offset"] < j["len"], "mid-copy")
    mounted.cli("pause", mounted.mountpoint, name)
    entry = job(mounted, name)
    assert entry is not None and entry["paused"] and entry["status"] == "paused" and not entry["ready"]
    digest = sha(target)
    # Writes keep going to the source while paused; the target's bytes do not move.
    qemu_io(image, "write -P 0x61 0 200000", "write -P 0x62 7000000 4097")
    subprocess.run(["dd", "if=/dev/urandom", f"of={image}", "bs=4096", "count=64", "seek=300",
                    "conv=notrunc,fsync", "status=none"], check=True, timeout=60)
    assert read_at(source, 0, 200000) == b"\x61" * 200000
    _target_stays(target, digest, 1.5)
    paused = job(mounted, name)
    assert paused is not None and paused["paused"] and paused["offset"] <= entry["offset"]
    mounted.cli("resume", mounted.mountpoint, name)
    mounted.cli("set-speed", mounted.mountpoint, name, "0")
    wait_ready(mounted, name)
    assert_identical(source, target)

    # Paused while ready (standby): the same holds.
    mounted.cli("pause", mounted.mountpoint, name)
    entry = job(mounted, name)
    assert entry is not None and entry["paused"] and entry["status"] == "standby"
    digest = sha(target)
    qemu_io(image, "write -P 0x63 123 456789")
    assert read_at(source, 123, 456789) == b"\x63" * 456789
    _target_stays(target, digest, 1.0)
    refused = mounted.cli("complete", mounted.mountpoint, name, "--no-pivot", check=False)
    assert refused.returncode == 1 and "paused" in refused.stderr
    mounted.cli("resume", mounted.mountpoint, name)
    wait_ready(mounted, name)
    mounted.cli("complete", mounted.mountpoint, name, "--no-pivot")
    assert_identical(source, target)


# ---------------------------------------------------------------------------- 6: target errors


@contextlib.contextmanager
def tiny_tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` mounted at ``path`` for the test; always unmounted."""
    path.mkdir(exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "mirrorfs-test-tmpfs", str(path)],
                   check=True, timeout=30)
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)], capture_output=True, timeout=30).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=30)


@pytest.mark.parametrize("policy,copy_mode", [("enospc", "background"), ("stop", "background"),
                                              ("report", "background"), ("stop", "write-blocking"),
                                              ("report", "write-blocking")])
def test_on_target_error_with_a_target_on_a_full_tmpfs(mount_factory: Callable[..., Mount], tmp_path: Path,
                                                     policy: str, copy_mode: str) -> None:
    """A target on a 2 MiB tmpfs for an 8 MiB image runs out of space. ``enospc``/``stop``: the
    job stops with io-status ``nospace``, and after the tmpfs grows ``resume`` reaches ready with
    identical images. ``report``: the job fails, ``status`` shows the error. The writer's I/O to
    the source succeeds throughout."""
    mount = mount_factory()
    mount.allow_log(r"target error")
    size = 8 * MiB
    name = "vm.raw"
    source = mount.source / name
    make_image(source, size, 6, holes=False)
    image = mount.mountpoint / name
    problems: list[str] = []
    with contextlib.ExitStack() as stack:
        small = stack.enter_context(tiny_tmpfs(tmp_path / "tiny", "2M"))
        # Unmount mirrorfs (it holds the target open) before the tmpfs goes away.
        stack.callback(lambda: problems.extend(mount.close()))
        target = small / "target.raw"
        # Writer processes run while the job starts and meets the full target: none may fail.
        with writers(image, [61, 62], tmp_path, count=300) as finish:
            mount.cli("mirror", mount.mountpoint, name, target, "--create", "--buf-size", "256K",
                      "--on-target-error", policy, "--copy-mode", copy_mode)
            assert all(n == 300 for _, _, n in finish())
        if policy == "report":
            entry = wait_job(mount, name, lambda j: j["status"] == "concluded", "failed")
            assert entry["error"] and "space" in entry["error"].lower(), entry
            assert entry["io-status"] == "nospace" and not entry["ready"]
            table = mount.cli("status", mount.mountpoint).stdout
            assert "concluded: " in table and "nospace" in table, table
            qemu_io(image, "write -P 0x71 4096 300000")
            assert read_at(source, 4096, 300000) == b"\x71" * 300000
            # A failed job cannot be completed; the user sees it in one line.
            refused = mount.cli("complete", mount.mountpoint, name, "--no-pivot", check=False)
            assert refused.returncode == 1 and len(refused.stderr.strip().splitlines()) == 1, refused.stderr
        else:
            entry = wait_job(mount, name, lambda j: j["io-status"] == "nospace", "io-status nospace")
            assert entry["paused"] and entry["status"] == "paused" and not entry["ready"], entry
            table = mount.cli("status", mount.mountpoint).stdout
            assert "nospace" in table and "paused" in table, table
            # The writer is not affected, and the job stays stopped.
            qemu_io(image, "write -P 0x72 4096 300000", "write -P 0x73 6000000 1000")
            assert read_at(source, 4096, 300000) == b"\x72" * 300000
            still = job(mount, name)
            assert still is not None and still["paused"] and still["io-status"] == "nospace"
            subprocess.run(["mount", "-o", "remount,size=16M", str(small)], check=True, timeout=30)
            mount.cli("resume", mount.mountpoint, name)
            entry = wait_ready(mount, name)
            assert entry["io-status"] == "ok"
            mount.cli("complete", mount.mountpoint, name, "--no-pivot")
            assert_identical(source, target)
    assert not problems, problems
    assert read_at(source, 4096, 4) in (b"\x71" * 4, b"\x72" * 4)


# ---------------------------------------------------------------------------- 7: resume after unmount


def test_resume_after_unmount_with_sync_dirty_and_bitmap_clean_after_complete(mounted: Mount, tmp_path: Path) -> None:
    size = 8 * MiB
    name = "resume.raw"
    source = mounted.source / name
    target = tmp_path / "resume-target.raw"
    bitmap = tmp_path / "resume.bitmap"
    make_image(source, size, 8)
    image = mounted.mountpoint / name
    mounted.cli("mirror", mounted.mountpoint, name, target, "--create", "--bitmap", bitmap,
                "--speed", "1M", "--buf-size", "256K")
    qemu_io(image, "write -P 0x81 3000 100000")
    wait_job(mounted, name, lambda j: 0 < j["offset"] < j["len"], "mid-copy")
    with writers(image, [71, 72], tmp_path, count=200) as finish:
        finish()
    qemu_io(image, "write -P 0x82 7654321 22222")
    mounted.unmount()  # mid-copy
    report = mounted.cli("bitmap", "inspect", bitmap, "--json", check=False)
    assert report.returncode == 1, report.stdout + report.stderr  # dirty: work left
    info = json.loads(report.stdout)
    assert info["clean-shutdown"] is True, info
    assert_differ(source, target)
    # (No write reaches the source while unmounted: the bitmap could not know of it.)
    mounted.start()
    mounted.cli("mirror", mounted.mountpoint, name, target, "--sync", "dirty", "--bitmap", bitmap)
    entry = wait_ready(mounted, name)
    assert 0 < entry["__org.mirrorfs_copied-bytes"] < size, entry  # only the remaining work
    mounted.cli("complete", mounted.mountpoint, name, "--no-pivot")
    assert_identical(source, target)
    assert read_at(target, 7654321, 22222) == b"\x82" * 22222
    assert_ended_with_no_dirty_bit(mounted, bitmap)


def assert_ended_with_no_dirty_bit(mount: Mount, bitmap: Path) -> None:
    """After ``complete --no-pivot`` the target was identical, but the job no longer records
    writes: ``inspect`` says the bitmap ended (exit 1), not clean."""
    report = mount.cli("bitmap", "inspect", bitmap, check=False)
    assert report.returncode == 1, report.stdout + report.stderr
    assert "dirty clusters: 0" in report.stdout and "ended: its job ended at" in report.stdout, report.stdout


def test_resume_after_the_daemon_is_killed_mid_copy(mounted: Mount, tmp_path: Path) -> None:
    """SIGKILL the mount daemon mid-copy, after concurrent writes: the bitmap (not cleanly shut
    down) still holds every cluster that differs, so ``--sync dirty`` ends with identical images."""
    size = 8 * MiB
    name = "killed.raw"
    source = mounted.source / name
    target = tmp_path / "killed-target.raw"
    bitmap = tmp_path / "killed.bitmap"
    make_image(source, size, 9)
    image = mounted.mountpoint / name
    mounted.cli("mirror", mounted.mountpoint, name, target, "--create", "--bitmap", bitmap,
                "--speed", "1M", "--buf-size", "256K")
    wait_job(mounted, name, lambda j: 0 < j["offset"] < j["len"], "mid-copy")
    with writers(image, [81, 82, 83], tmp_path, count=300) as finish:
        finish()
    qemu_io(image, "write -P 0x91 5555555 77777")
    pid = mounted.pid
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not process_alive(pid), 10, "the killed daemon to exit")
    problems = mounted.close()  # the dead mount: lazy unmount, nothing left behind
    assert not any("still alive" in p for p in problems), problems
    report = mounted.cli("bitmap", "inspect", bitmap, "--json", check=False)
    assert report.returncode == 1, report.stdout + report.stderr
    assert json.loads(report.stdout)["clean-shutdown"] is False
    mounted.start()
    mounted.cli("mirror", mounted.mountpoint, name, target, "--sync", "dirty", "--bitmap", bitmap)
    wait_ready(mounted, name)
    mounted.cli("complete", mounted.mountpoint, name, "--no-pivot")
    assert_identical(source, target)
    assert read_at(target, 5555555, 77777) == b"\x91" * 77777
    assert_ended_with_no_dirty_bit(mounted, bitmap)


def _switch_points(src: bytes, initial: bytes, writes: list[tuple[int, bytes]], torn_ok: bool) -> list[int]:
    """The k for which ``src`` is ``initial`` after the first k ``writes`` (offsets relative to
    the region); with ``torn_ok``, write k+1 may also be partly there, page by page."""
    page = 4 * KiB
    model = bytearray(initial)
    points = []
    for k in range(len(writes) + 1):
        if src == model:
            points.append(k)
        elif torn_ok and k < len(writes):
            off, data = writes[k]
            first, end = off - off % page, off + len(data)
            after = bytearray(model)
            after[off:end] = data
            if src[:first] == model[:first] and src[end:] == model[end:] and all(
                    src[p:min(p + page, end)] in (model[p:min(p + page, end)], after[p:min(p + page, end)])
                    for p in range(first, end, page)):
                points.append(k)
        if k < len(writes):
            off, data = writes[k]
            model[off:off + len(data)] = data
    return points


@pytest.mark.parametrize("copy_mode,io", [("background", "o_direct"), ("write-blocking", "o_direct"),
                                          ("background", "buffered")])
def test_pivot_under_concurrent_writers_splits_their_writes_at_one_point(mounted: Mount, tmp_path: Path,
                                                                       copy_mode: str, io: str) -> None:
    """Four writer processes (each in its own 1 MiB region) keep writing while ``complete``
    switches the image. None sees an error; the target holds every write of every writer; the
    source holds, for each writer, exactly the writes before the switch (a prefix of its
    sequence), nothing later.

    With O_DIRECT (as QEMU with cache=none) each write() is one FUSE request, so the prefix is
    exact. A buffered write() is split by the kernel into one FUSE request per page run, so a
    buffered write in flight at the switch may be torn at a page boundary (part in the source);
    no layer below the kernel can see that the requests belong to one syscall.
    """
    size, region, count, maxlen = 4 * MiB, 1 * MiB, 1500, 8000
    name = "busy-pivot.raw"
    source = mounted.source / name
    target = tmp_path / "busy-pivot-target.raw"
    initial = make_image(source, size, 12)
    mounted.cli("mirror", mounted.mountpoint, name, target, "--create", "--copy-mode", copy_mode)
    wait_ready(mounted, name)
    seeds = [501, 502, 503, 504]
    regions = [(i * region, (i + 1) * region) for i in range(4)]
    with writers(mounted.mountpoint / name, seeds, tmp_path, count=count, maxlen=maxlen,
                 regions=regions, direct=io == "o_direct") as finish:
        mounted.cli("complete", mounted.mountpoint, name)
        results = finish()
    assert all(n == count for _, _, n in results), results
    src, tgt = source.read_bytes(), target.read_bytes()
    points = []
    for seed, (lo, hi) in zip(seeds, regions):
        writes = [(off - lo, data) for off, data in replay_writes(seed, count, maxlen, lo, hi)]
        model = bytearray(initial[lo:hi])
        for off, data in writes:
            model[off:off + len(data)] = data
        assert tgt[lo:hi] == model, f"writer {seed}: the target lacks some of its writes"
        found = _switch_points(src[lo:hi], initial[lo:hi], writes, torn_ok=io == "buffered")
        assert found, f"writer {seed}: the source is not the image as it was at one point of its writes"
        points.append(found[-1])
    assert any(0 < k < count for k in points), f"the switch did not happen during the writes: {points}"


def test_pivot_with_a_bitmap_marks_it_pivoted(mounted: Mount, tmp_path: Path) -> None:
    """After ``complete`` (pivot) of a job with ``--bitmap``, ``bitmap inspect`` says the target
    is the live image (exit 0), and writes after the switch reach the target only."""
    size = 2 * MiB
    name = "pv.raw"
    source = mounted.source / name
    target = tmp_path / "pv-target.raw"
    bitmap = tmp_path / "pv.bitmap"
    make_image(source, size, 13)
    mounted.cli("mirror", mounted.mountpoint, name, target, "--create", "--bitmap", bitmap)
    wait_ready(mounted, name)
    running = mounted.cli("bitmap", "inspect", bitmap, check=False)
    assert running.returncode == 0 and "pivoted: the target" not in running.stdout
    mounted.cli("complete", mounted.mountpoint, name)
    qemu_io(mounted.mountpoint / name, "write -P 0x99 0 4096")
    assert read_at(target, 0, 4096) == b"\x99" * 4096 and read_at(source, 0, 4096) != b"\x99" * 4096
    report = mounted.cli("bitmap", "inspect", bitmap, "--json", check=False)
    assert report.returncode == 0, report.stdout + report.stderr
    assert json.loads(report.stdout)["pivoted"] is True


# ---------------------------------------------------------------------------- op blockers


def test_a_mirrored_image_cannot_be_truncated_unlinked_or_replaced_while_its_job_runs(
        mounted: Mount, tmp_path: Path) -> None:
    """EBUSY (with a log line saying why) for truncate, O_TRUNC, unlink, rename of the image or
    of its directory, and rename of another file over it; nothing changes; allowed again once
    the job has ended."""
    size = 4 * MiB
    (mounted.source / "d").mkdir()
    name = "d/img.raw"
    source = mounted.source / name
    make_image(source, size, 14)
    (mounted.source / "other.raw").write_bytes(b"x" * 4096)
    digest = sha(source)
    mnt = mounted.mountpoint
    mounted.cli("mirror", mnt, name, tmp_path / "blk-target.raw", "--create", "--speed", "256K",
                "--buf-size", "64K")
    wait_job(mounted, name, lambda j: j["status"] == "running", "running")
    attempts = {
        "truncate": ["truncate", "-s", "1M", str(mnt / name)],
        "O_TRUNC": [sys.executable, "-c", f"open({str(mnt / name)!r}, 'wb')"],
        "unlink": ["rm", "-f", str(mnt / name)],
        "rename away": ["mv", "-T", str(mnt / name), str(mnt / "moved.raw")],
        "rename over": ["mv", "-T", str(mnt / "other.raw"), str(mnt / name)],
        "rename dir": ["mv", "-T", str(mnt / "d"), str(mnt / "e")],
    }
    for what, argv in attempts.items():
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=30)
        assert proc.returncode != 0 and "busy" in proc.stderr.lower(), (what, proc.returncode, proc.stderr)
    assert source.exists() and os.path.getsize(source) == size and sha(source) == digest
    assert (mounted.source / "other.raw").read_bytes() == b"x" * 4096
    assert not (mounted.source / "moved.raw").exists() and not (mounted.source / "e").exists()
    assert "running on it" in mounted.read_log()
    entry = job(mounted, name)
    assert entry is not None and entry["status"] == "running"
    mounted.cli("cancel", mnt, name)
    subprocess.run(["truncate", "-s", "1M", str(mnt / name)], check=True, timeout=30)
    assert os.path.getsize(source) == 1 * MiB
    subprocess.run(["mv", "-T", str(mnt / "other.raw"), str(mnt / name)], check=True, timeout=30)
    assert source.read_bytes() == b"x" * 4096


def test_unmount_while_stopped_on_a_full_target_then_resume_with_the_bitmap(mount_factory: Callable[..., Mount],
                                                                           tmp_path: Path) -> None:
    """A job stopped by ENOSPC (``stop``) is unmounted; once the target file system has room,
    ``--sync dirty --bitmap FILE`` on a new mount finishes it: identical, bitmap clean."""
    mount = mount_factory()
    mount.allow_log(r"target error")
    size = 8 * MiB
    name = "vm.raw"
    source = mount.source / name
    bitmap = tmp_path / "stopped.bitmap"
    make_image(source, size, 15, holes=False)
    problems: list[str] = []
    with contextlib.ExitStack() as stack:
        small = stack.enter_context(tiny_tmpfs(tmp_path / "tiny", "2M"))
        stack.callback(lambda: problems.extend(mount.close()))
        target = small / "target.raw"
        mount.cli("mirror", mount.mountpoint, name, target, "--create", "--buf-size", "256K",
                  "--on-target-error", "stop", "--bitmap", bitmap)
        wait_job(mount, name, lambda j: j["io-status"] == "nospace" and j["paused"], "stopped on ENOSPC")
        qemu_io(mount.mountpoint / name, "write -P 0x5c 1234567 89012")
        mount.unmount()
        report = mount.cli("bitmap", "inspect", bitmap, "--json", check=False)
        assert report.returncode == 1 and json.loads(report.stdout)["clean-shutdown"] is True, report.stdout
        subprocess.run(["mount", "-o", "remount,size=16M", str(small)], check=True, timeout=30)
        mount.start()
        mount.cli("mirror", mount.mountpoint, name, target, "--sync", "dirty", "--bitmap", bitmap,
                  "--on-target-error", "stop")
        wait_ready(mount, name)
        mount.cli("complete", mount.mountpoint, name, "--no-pivot")
        assert_identical(source, target)
        assert read_at(target, 1234567, 89012) == b"\x5c" * 89012
        assert_ended_with_no_dirty_bit(mount, bitmap)
    assert not problems, problems


@pytest.mark.parametrize("copy_mode", ["background", "write-blocking"])
def test_duplicates_meeting_a_full_target_after_ready_stop_the_job_not_the_writers(
        mount_factory: Callable[..., Mount], tmp_path: Path, copy_mode: str) -> None:
    """A ready job whose target fills up under the writers' duplicates (``stop``): every write
    succeeds, the job goes to standby with io-status nospace, and once there is room ``resume``
    brings it back to ready with identical images."""
    mount = mount_factory()
    mount.allow_log(r"target error")
    size = 8 * MiB
    name = "sparse.raw"
    source = mount.source / name
    with open(source, "wb") as f:  # 1 MiB of data, the rest holes
        f.truncate(size)
        f.write(random.Random(17).randbytes(1 * MiB))
    problems: list[str] = []
    with contextlib.ExitStack() as stack:
        small = stack.enter_context(tiny_tmpfs(tmp_path / "tiny", "2M"))
        stack.callback(lambda: problems.extend(mount.close()))
        target = small / "target.raw"
        mount.cli("mirror", mount.mountpoint, name, target, "--create", "--on-target-error", "stop",
                  "--copy-mode", copy_mode)
        wait_ready(mount, name)
        with writers(mount.mountpoint / name, [91, 92], tmp_path, count=300) as finish:
            assert all(n == 300 for _, _, n in finish())
        entry = wait_job(mount, name, lambda j: j["io-status"] == "nospace", "io-status nospace")
        # standby: stopped after ready (QEMU keeps ``ready`` true while a ready job stands by)
        assert entry["paused"] and entry["status"] == "standby" and entry["ready"] is True, entry
        subprocess.run(["mount", "-o", "remount,size=16M", str(small)], check=True, timeout=30)
        mount.cli("resume", mount.mountpoint, name)
        # Complete at once: the writes of the stop are still dirty, and complete must copy them
        # while the image is quiesced (or refuse because the job is not ready yet).
        done = mount.cli("complete", mount.mountpoint, name, "--no-pivot", check=False)
        if done.returncode != 0:
            assert done.returncode == 1 and "not ready" in done.stderr, done.stderr
            wait_ready(mount, name)
            mount.cli("complete", mount.mountpoint, name, "--no-pivot")
        assert_identical(source, target)
    assert not problems, problems
