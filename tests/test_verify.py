"""Online verify (issue 13, item 5 and Done when "Verify").

- the pure part: range arithmetic and which clusters of two buffers differ;
- the in-flight watcher the verify relies on for "no false positives";
- real mounts, a job to a local file and one to qemu-nbd, a writer process busy on the image:
  three verifies report nothing; one cluster of the target corrupted behind mirrorfs's back is
  reported as exactly that range (exit 1); ``--repair`` has the job copy it, and after
  ``complete --no-pivot`` the target is identical;
- bad input and refusals exit 2 with one line and start nothing; a second verify is refused; a
  cancel of the job ends a running verify as not finished (exit 3); the control file's
  ``verify`` line and the QMP event.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import subprocess
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
import trio

from compare import assert_identical
from mirrorfs import fileio
from mirrorfs.control.cli_verify import render_outcome
from mirrorfs.errors import VerifyNotFinishedError
from mirrorfs.mirror import verify_ranges as vr
from mirrorfs.mirror.inflight import InflightOps
from mounting import Mount, mirrorfs_argv, wait_for
from nbdservers import qemu_nbd
from test_mirror_engine import SlowTarget, engine, random_content
from test_replication_support import Writer, make_blank, make_image, qmp, wait_job, wait_ready

KiB, MiB = 1 << 10, 1 << 20
G = 64 * KiB
SIZE = 8 * MiB
#: The cluster corrupted behind mirrorfs's back: outside the writer's span, so the writer cannot
#: happen to overwrite (and so repair) it.
CORRUPT_AT = 6 * MiB
WRITER_SPAN = 4 * MiB


# ---------------------------------------------------------------------------- the pure part

def test_merge_joins_touching_and_overlapping_ranges_and_drops_empty_ones() -> None:
    assert vr.merge([(10, 5), (0, 10), (30, 1), (14, 6), (40, 0)]) == [(0, 20), (30, 1)]
    assert vr.merge([]) == []


def test_subtract_and_intersect() -> None:
    assert vr.subtract([(0, 100)], [(10, 10), (50, 60)]) == [(0, 10), (20, 30)]
    assert vr.subtract([(0, 10), (20, 10)], [(5, 20)]) == [(0, 5), (25, 5)]
    assert vr.subtract([(0, 10)], []) == [(0, 10)]
    assert vr.intersect([(0, 100)], [(10, 10), (90, 30)]) == [(10, 10), (90, 10)]
    assert vr.intersect([(0, 10)], [(10, 5)]) == []
    assert vr.total([(0, 10), (20, 5)]) == 15


def test_cluster_spans_become_byte_ranges() -> None:
    assert vr.cluster_spans([(2, 3), (4, 4), (9, 9)], G) == [(2 * G, 3 * G), (9 * G, G)]


def test_differing_names_whole_clusters_merged() -> None:
    source = bytes(range(256)) * (4 * G // 256)
    target = bytearray(source)
    target[G + 5] ^= 1            # cluster 1
    target[2 * G] ^= 1            # cluster 2: adjacent, merged with 1
    target[4 * G - 1] ^= 1        # cluster 3 is the last
    assert vr.differing(source, bytes(target), 0, G) == [(G, 3 * G)]
    assert vr.differing(source, source, 0, G) == []


def test_differing_aligns_clusters_to_the_image_and_counts_a_short_target() -> None:
    source = b"a" * (2 * G)
    target = b"a" * (G // 2) + b"b" + b"a" * (G + G // 2 - 1)
    # read at offset G/2: the first cluster in the buffer is the second half of cluster 0
    assert vr.differing(source, target, G // 2, G) == [(G, G)]
    assert vr.differing(source, source[:G], 0, G) == [(G, G)]


def test_a_watcher_sees_operations_in_flight_and_later_ones_but_conflicts_nothing() -> None:
    ops = InflightOps(G)
    before = ops.register(0, 4 * KiB)                  # cluster 0, in flight when watching starts
    watcher = ops.watch(0, 4 * G)                      # clusters 0..3
    assert len(ops) == 2 and not before.conflicted     # not empty: an inline write registers
    assert not ops.overlaps(2 * G, 1)                  # the copy task does not see it
    later = ops.register(2 * G + 100, 10)              # cluster 2
    outside = ops.register(5 * G, 10)
    assert not later.conflicted and not outside.conflicted
    assert watcher.conflicted and sorted(watcher.spans) == [(0, 0), (2, 2)]
    ops.unwatch(watcher)
    for op in (before, later, outside):
        ops.unregister(op)
    assert len(ops) == 0
    trio.run(ops.wait_idle)


def test_render_outcome_texts_and_exit_codes() -> None:
    text, code = render_outcome("vm.raw", {"result": "identical", "ranges": [], "compared-bytes": 8,
                                           "skipped-bytes": 0})
    assert code == 0 and "identical" in text and "differs" not in text
    text, code = render_outcome("vm.raw", {"result": "differ", "ranges": [{"offset": G, "length": G}],
                                           "differing-bytes": G, "repaired": True})
    assert code == 1 and text.startswith(f"differs: offset {G} length {G}\n") and "marked dirty" in text
    with pytest.raises(VerifyNotFinishedError, match="did not finish: the job ended") as caught:
        render_outcome("vm.raw", {"result": "cancelled", "error": "the job ended"})
    assert caught.value.exit_code == 3


# ---------------------------------------------------------------------------- the engine

class RacingTarget:
    """A real target whose every read of ``at`` first lets a guest write change ``at``: the
    write lands between the verify's read of the source and its read of the target, every time."""

    def __init__(self, inner: Any, write: Any, at: int) -> None:
        self._inner = inner
        self._write = write
        self._at = at
        self.races = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    async def pread(self, offset: int, length: int) -> bytes:
        if offset <= self._at < offset + length:
            self.races += 1
            await self._write(self._at, os.urandom(4096))
        return await self._inner.pread(offset, length)


@pytest.fixture(params=["thread", "direct"])
def io_mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """File I/O in worker threads, and on the trio thread (where a write may run inline without
    registering while nothing is in flight: the watcher must make it register)."""
    monkeypatch.setattr(fileio, "IO_MODE", request.param)
    return request.param


async def test_a_write_between_the_two_reads_is_never_reported(tmp_path: Path, io_mode: str) -> None:
    async with engine(tmp_path, random_content(4 * MiB)) as env:
        # write-blocking: the write is on the target too when it returns, so the target read
        # that follows sees bytes the source read before it did not
        job = await env.mirror(tmp_path / "target.img", copy_mode="write-blocking")
        await env.wait_event("BLOCK_JOB_READY")
        racing = RacingTarget(job.target, env.write, 2 * MiB + 8192)
        job.target = racing
        job.start_verify()
        done = await env.wait_event("__org.mirrorfs_VERIFY_COMPLETED")
        assert racing.races >= 1
        assert done["result"] == "identical" and done["ranges"] == []
        # the raced cluster is left to the job, not compared
        assert done["skipped-bytes"] >= G and done["compared-bytes"] + done["skipped-bytes"] == 4 * MiB


@pytest.mark.parametrize("copy_mode", ["background", "write-blocking"])
async def test_no_false_positive_under_concurrent_unaligned_writers(tmp_path: Path, io_mode: str,
                                                                    copy_mode: str) -> None:
    """Four writers of random unaligned writes, a target that delays every write a few ms (so
    duplicates and copies overlap the verify's reads), 4 KiB clusters: verify after verify finds
    nothing, and compares most of the image each time."""
    size = 2 * MiB
    async with engine(tmp_path, random_content(size)) as env:
        job = await env.mirror(tmp_path / "target.img", granularity=4096, buf_size=16384,
                               copy_mode=copy_mode)
        await env.wait_event("BLOCK_JOB_READY", timeout=60)
        job.target = SlowTarget(job.target, seed=7)
        results: list[dict] = []
        writes = 0

        async def writer(seed: int) -> None:
            # until the verifies are done; never cancelled inside a write, as FUSE never does
            nonlocal writes
            rng = random.Random(seed)
            while len(results) < 5:
                length = rng.randrange(1, 20000)
                await env.write(rng.randrange(0, size - length), rng.randbytes(length))
                writes += 1
                await trio.sleep(0)

        async with trio.open_nursery() as nursery:
            for w in range(4):
                nursery.start_soon(writer, w)
            for _ in range(5):
                env.events.clear()
                job.start_verify()
                results.append(await env.wait_event("__org.mirrorfs_VERIFY_COMPLETED", timeout=60))
        assert writes > 20, writes
        assert [r["result"] for r in results] == ["identical"] * 5, results
        assert all(r["compared-bytes"] + r["skipped-bytes"] == size for r in results)


async def test_corruption_is_found_and_repair_has_the_job_copy_it(tmp_path: Path, io_mode: str) -> None:
    async with engine(tmp_path, random_content(4 * MiB)) as env:
        target = tmp_path / "target.img"
        job = await env.mirror(target)
        await env.wait_event("BLOCK_JOB_READY")
        _corrupt(target, 3 * G)
        _corrupt(target, 4 * G)
        _corrupt(target, 9 * G)
        job.start_verify(repair=True)
        done = await env.wait_event("__org.mirrorfs_VERIFY_COMPLETED")
        assert done["result"] == "differ" and done["repaired"]
        assert done["ranges"] == [{"offset": 3 * G, "length": 2 * G}, {"offset": 9 * G, "length": G}]
        with trio.fail_after(30):
            while job.bitmap.dirty_bytes():
                await trio.sleep(0.01)
        await env.manager.complete(["img"], pivot=False)
        assert env.source.read_bytes() == target.read_bytes()


async def test_one_verify_per_job_and_the_jobs_end_cancels_it(tmp_path: Path) -> None:
    async with engine(tmp_path, random_content(4 * MiB)) as env:
        job = await env.mirror(tmp_path / "target.img")
        await env.wait_event("BLOCK_JOB_READY")
        job.start_verify(speed=256 * KiB)
        with pytest.raises(Exception, match="already being verified"):
            env.manager.verify("img")
        await trio.sleep(0.3)
        assert 0 < job.info()["__org.mirrorfs_verify"]["offset"] < 4 * MiB  # the rate holds it
        await env.manager.cancel(["img"])
        done = await env.wait_event("__org.mirrorfs_VERIFY_COMPLETED")
        assert done["result"] == "cancelled" and done["error"] == "the job ended"


# ---------------------------------------------------------------------------- real mounts

def _differing(stdout: str) -> list[tuple[int, int]]:
    return [(int(line.split()[2]), int(line.split()[4])) for line in stdout.splitlines()
            if line.startswith("differs: ")]


def _corrupt(path: Path, offset: int) -> bytes:
    """Overwrite one cluster of a target file directly (as a disk error or another program
    would): mirrorfs is not told."""
    with open(path, "r+b") as f:
        f.seek(offset)
        old = f.read(G)
        f.seek(offset)
        f.write(bytes(b ^ 0xFF for b in old))
        f.flush()
        os.fsync(f.fileno())
    return old


def _verify(mount: Mount, *args: str) -> subprocess.CompletedProcess[str]:
    return mount.cli("verify", mount.mountpoint, "vm.raw", *args, check=False, timeout=120)


def _verify_under_a_writer(mount: Mount, tmp_path: Path, target_file: Path, target: str) -> None:
    source = mount.source / "vm.raw"
    mount.cli("mirror", mount.mountpoint, "vm.raw", target)
    with qmp(mount) as client:
        wait_ready(client, "vm.raw")
    writer = Writer(mount.mountpoint / "vm.raw", tmp_path, span=WRITER_SPAN, pause=0)
    try:
        wait_for(lambda: _writes(mount) > 200, 30, "the writer to get going")
        for _ in range(3):
            r = _verify(mount)
            assert (r.returncode, _differing(r.stdout)) == (0, []), (r.stdout, r.stderr)
            assert "identical" in r.stdout
        _corrupt(target_file, CORRUPT_AT)
        r = _verify(mount)
        assert r.returncode == 1, (r.stdout, r.stderr)
        assert _differing(r.stdout) == [(CORRUPT_AT, G)], r.stdout
        r = _verify(mount, "--repair")
        assert r.returncode == 1 and _differing(r.stdout) == [(CORRUPT_AT, G)], (r.stdout, r.stderr)
        assert "marked dirty" in r.stdout
        stats = writer.stop()
    finally:
        writer.kill()
    assert not stats["errors"] and stats["writes"] > 1000, stats
    # six unlimited verifies ran meanwhile: none held the writer up
    assert stats["max_latency"] < 2.0, stats
    with qmp(mount) as client:
        wait_job(client, "vm.raw", lambda j: j["dirty-bytes"] == 0, 60, "the job to settle")
    r = _verify(mount)
    assert r.returncode == 0, (r.stdout, r.stderr)
    mount.cli("complete", mount.mountpoint, "vm.raw", "--no-pivot")
    assert_identical(source, target_file)


def _writes(mount: Mount) -> int:
    with qmp(mount) as client:
        job = client.execute("query-block-jobs")[0]
    return job["__org.mirrorfs_duplicated-bytes"] // 4096


def test_verify_of_a_local_target_under_a_busy_writer(mount_factory: Any, tmp_path: Path) -> None:
    mount = mount_factory()
    make_image(mount.source / "vm.raw", SIZE)
    target = tmp_path / "target.raw"
    make_blank(target, SIZE)
    _verify_under_a_writer(mount, tmp_path, target, f"{target}")


@contextlib.contextmanager
def _nbd_served(mount_factory: Any, tmp_path: Path) -> Iterator[tuple[Mount, Path, Any]]:
    """A mount with ``vm.raw`` and a qemu-nbd serving a blank file of its size; the mount goes
    before the server does."""
    mount = mount_factory()
    make_image(mount.source / "vm.raw", SIZE)
    served = tmp_path / "served.raw"
    make_blank(served, SIZE)
    with qemu_nbd(served, transport="unix") as server:
        try:
            yield mount, served, server
        finally:
            mount.unmount()


def test_verify_of_an_nbd_target_under_a_busy_writer(mount_factory: Any, tmp_path: Path) -> None:
    with _nbd_served(mount_factory, tmp_path) as (mount, served, server):
        _verify_under_a_writer(mount, tmp_path, served, server.uri)


def _ready_local_job(mount: Mount, tmp_path: Path) -> Path:
    make_image(mount.source / "vm.raw", SIZE)
    make_image(mount.source / "other.raw", SIZE)
    target = tmp_path / "target.raw"
    make_blank(target, SIZE)
    mount.cli("mirror", mount.mountpoint, "vm.raw", target)
    with qmp(mount) as client:
        wait_ready(client, "vm.raw")
    return target


def _no_verify_running(mount: Mount) -> bool:
    with qmp(mount) as client:
        return all("__org.mirrorfs_verify" not in j for j in client.execute("query-block-jobs"))


@pytest.mark.parametrize("args, message", [
    (("nope.raw",), "no mirror job 'nope.raw'"),
    (("other.raw",), "no mirror job 'other.raw'"),
    (("vm.raw", "--speed", "fast"), "invalid speed 'fast'"),
    (("vm.raw", "--speed", "-1"), "speed"),
    (("../vm.raw",), "leaves the mount"),
    (("other.raw", "--job-id", "vm.raw"), "job 'vm.raw' mirrors 'vm.raw', not 'other.raw'"),
], ids=["no-image", "no-job", "bad-speed", "negative-speed", "outside", "job-of-another-image"])
def test_bad_input_exits_2_with_one_line_and_starts_nothing(mount_factory: Any, tmp_path: Path,
                                                           args: tuple[str, ...], message: str) -> None:
    mount = mount_factory()
    _ready_local_job(mount, tmp_path)
    r = mount.cli("verify", mount.mountpoint, *args, check=False)
    assert r.returncode == 2 and r.stdout == "", (r.returncode, r.stdout, r.stderr)
    assert len(r.stderr.splitlines()) == 1 and r.stderr.startswith("mirrorfs verify: ")
    assert message in r.stderr, r.stderr
    assert _no_verify_running(mount)


def test_no_mount_there_exits_2(tmp_path: Path) -> None:
    proc = subprocess.run([*mirrorfs_argv(), "verify", str(tmp_path), "vm.raw"], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2 and "no mirrorfs mount serves" in proc.stderr


def test_a_second_verify_is_refused_and_a_cancel_ends_the_first(mount_factory: Any, tmp_path: Path) -> None:
    mount = mount_factory()
    _ready_local_job(mount, tmp_path)
    first = subprocess.Popen([*mirrorfs_argv(), "verify", str(mount.mountpoint), "vm.raw",
                              "--speed", "512K"], env=mount.env(), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        with qmp(mount) as client:
            job = wait_job(client, "vm.raw", lambda j: "__org.mirrorfs_verify" in j, 30,
                           "the verify to start")
        assert job["__org.mirrorfs_verify"]["speed"] == 512 * KiB
        r = _verify(mount)
        assert r.returncode == 2 and "already being verified" in r.stderr, (r.returncode, r.stderr)
        time.sleep(1)
        with qmp(mount) as client:
            progress = client.execute("query-block-jobs")[0]["__org.mirrorfs_verify"]
        assert 0 < progress["offset"] < SIZE // 2  # 8 s at 512 KiB/s for half: the rate holds it
        mount.cli("cancel", mount.mountpoint, "vm.raw")
        out, err = first.communicate(timeout=60)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait(10)
    assert first.returncode == 3, (first.returncode, out, err)
    assert out == "" and err.strip() == ("mirrorfs verify: the verify of vm.raw did not finish: "
                                         "the job ended")


def test_a_target_that_is_away_is_refused(mount_factory: Any, tmp_path: Path) -> None:
    with _nbd_served(mount_factory, tmp_path) as (mount, _, server):
        mount.cli("mirror", mount.mountpoint, "vm.raw", server.uri)
        with qmp(mount) as client:
            wait_ready(client, "vm.raw")
            server.kill()
            wait_job(client, "vm.raw", lambda j: not j["__org.mirrorfs_target-connected"], 30,
                     "the target to be lost")
        r = _verify(mount)
        assert r.returncode == 2, (r.stdout, r.stderr)
        assert "the target of job 'vm.raw' is not connected" in r.stderr
        assert _no_verify_running(mount)


def test_the_control_file_starts_a_verify_and_qmp_reports_it(mount_factory: Any, tmp_path: Path) -> None:
    from test_control_file import control, last_outcome

    mount = mount_factory()
    _ready_local_job(mount, tmp_path)
    assert control(mount, "verify vm.raw repair=maybe\n") == errno.EINVAL
    assert "'repair' must be true or false" in last_outcome(mount)
    assert control(mount, "verify\n") == errno.EINVAL
    assert "usage: verify IMAGE [repair=true] [speed=RATE]" in last_outcome(mount)
    assert control(mount, "verify nope.raw\n") == errno.EINVAL
    assert _no_verify_running(mount)
    with qmp(mount) as client:
        assert control(mount, "verify vm.raw speed=64M\n") == 0
        event = client.wait_event(["__org.mirrorfs_VERIFY_COMPLETED"], timeout=60)
        assert event is not None
        assert event["data"] == {"device": "vm.raw", "result": "identical", "ranges": [],
                                 "differing-bytes": 0, "repaired": False, "compared-bytes": SIZE,
                                 "skipped-bytes": 0}
        reply = client.execute_raw({"execute": "__org.mirrorfs_block-job-verify",
                                    "arguments": {"device": "vm.raw", "repair": "yes"}})
        assert reply["error"]["class"] == "GenericError" and "repair" in reply["error"]["desc"]


async def test_a_partial_last_cluster_is_reported_to_the_image_end(tmp_path: Path) -> None:
    size = 4 * MiB + 5000
    async with engine(tmp_path, random_content(size)) as env:
        target = tmp_path / "target.img"
        job = await env.mirror(target)
        await env.wait_event("BLOCK_JOB_READY")
        with open(target, "r+b") as f:
            f.seek(size - 1)
            f.write(b"\xff" if env.source.read_bytes()[-1:] != b"\xff" else b"\x00")
        job.start_verify()
        done = await env.wait_event("__org.mirrorfs_VERIFY_COMPLETED")
        assert done["ranges"] == [{"offset": 4 * MiB, "length": 5000}]


def test_repair_marks_the_range_in_the_bitmap_file(mount_factory: Any, tmp_path: Path) -> None:
    mount = mount_factory()
    make_image(mount.source / "vm.raw", SIZE)
    target = tmp_path / "target.raw"
    make_blank(target, SIZE)
    bitmap = tmp_path / "vm.bitmap"
    mount.cli("mirror", mount.mountpoint, "vm.raw", target, "--bitmap", bitmap)
    with qmp(mount) as client:
        wait_ready(client, "vm.raw")
    mount.cli("pause", mount.mountpoint, "vm.raw")  # so the job does not copy the range at once
    _corrupt(target, CORRUPT_AT)
    r = _verify(mount, "--repair")
    assert r.returncode == 1 and _differing(r.stdout) == [(CORRUPT_AT, G)], (r.stdout, r.stderr)
    inspected = json.loads(mount.cli("bitmap", "inspect", bitmap, "--json", check=False).stdout)
    assert inspected["dirty-ranges"] == [{"offset": CORRUPT_AT, "length": G}], inspected
    mount.cli("resume", mount.mountpoint, "vm.raw")
    with qmp(mount) as client:
        wait_job(client, "vm.raw", lambda j: j["ready"] and j["dirty-bytes"] == 0, 60, "the repair")
    mount.cli("complete", mount.mountpoint, "vm.raw", "--no-pivot")
    assert_identical(mount.source / "vm.raw", target)
