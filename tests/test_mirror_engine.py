"""Component tests of the job engine: real files, real local targets, the engine driven directly.

The FUSE layer's role is played by calling ``node.job.write`` the way ``fs/operations.py`` does;
the mount-level tests (tests/test_mirror_mount.py) repeat the important cases through a real mount.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import random
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator

import pytest
import trio

from compare import assert_identical
from mirrorfs import fileio
from mirrorfs.errors import ImageNotFoundError, StateError
from mirrorfs.fs.node import ImageNode, OpenHandle
from mirrorfs.mirror import inflight
from mirrorfs.mirror.manager import JobManager
from mirrorfs.mirror.params import MirrorParams
from mirrorfs.state.directory import StateDir

MiB = 1024 * 1024


@dataclasses.dataclass
class Env:
    tmp: Path
    source: Path
    node: ImageNode
    handle: OpenHandle
    manager: JobManager
    events: list[tuple[str, dict]]

    async def write(self, offset: int, data: bytes) -> int:
        job = self.node.job
        if job is not None:
            return await job.write(self.handle, offset, data)
        return await fileio.pwrite(self.handle.fd, data, offset)

    async def read(self, offset: int, size: int) -> bytes:
        job = self.node.job
        if job is not None:
            return await job.read(self.handle, offset, size)
        return await fileio.pread(self.handle.fd, size, offset)

    async def mirror(self, target: Path | str, **kwargs: Any):
        args = {"device": "img", "target": str(target), "mode": "absolute-paths"}
        args.update({k.replace("_", "-"): v for k, v in kwargs.items()})
        return await self.manager.start_mirror(MirrorParams.from_arguments(args))

    def event_names(self) -> list[str]:
        return [name for name, _ in self.events]

    async def wait_event(self, name: str, timeout: float = 30) -> dict:
        with trio.fail_after(timeout):
            while True:
                for event, data in self.events:
                    if event == name:
                        return data
                await trio.sleep(0.01)


@asynccontextmanager
async def engine(tmp_path: Path, content: bytes | None = None, *, size: int = 4 * MiB,
                 state: StateDir | None = None, reuse: bool = False) -> AsyncIterator[Env]:
    """The engine on ``tmp_path/source.img`` (written from ``content``, or ``size`` zeroes;
    ``reuse``: left as an earlier engine left it, as a remount finds it)."""
    source = tmp_path / "source.img"
    if not reuse:
        with open(source, "wb") as f:
            if content is not None:
                f.write(content)
            f.truncate(size if content is None else len(content))
    node = ImageNode(inode=1024, relpath="img", backing_path=str(source))
    handle = OpenHandle(fh=1, node=node, flags=os.O_RDWR, fd=os.open(source, os.O_RDWR))
    node.handles[1] = handle

    def resolve(relpath: str) -> ImageNode:
        if relpath != "img":
            raise ImageNotFoundError(f"no such image {relpath!r}")
        return node

    try:
        async with trio.open_nursery() as nursery:
            manager = JobManager(resolve, nursery=nursery, state=state)
            events: list[tuple[str, dict]] = []
            manager.add_listener(lambda e, d: events.append((e, d)))
            env = Env(tmp_path, source, node, handle, manager, events)
            try:
                yield env
            finally:
                await manager.shutdown()
    finally:
        os.close(handle.fd)


def hold_converge(job: Any) -> tuple[trio.Event, trio.Event]:
    """Make ``job``'s converges wait: returns ``(entered, release)``; ``entered`` is set when a
    converge (inside a transaction, the gate closed) has begun, and it goes on once ``release``
    is set."""
    entered, release = trio.Event(), trio.Event()
    real_converge = job.converge

    async def held_converge() -> None:
        entered.set()
        await release.wait()
        await real_converge()

    job.converge = held_converge
    return entered, release


def random_content(size: int, seed: int = 1, holes: bool = True) -> bytes:
    rng = random.Random(seed)
    data = bytearray(rng.randbytes(size))
    if holes:
        for _ in range(4):
            start = rng.randrange(0, size - 256 * 1024)
            data[start:start + 256 * 1024] = bytes(256 * 1024)
    return bytes(data)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


async def test_full_sync_reaches_ready_and_complete_no_pivot_leaves_exact_copy(tmp_path: Path) -> None:
    async with engine(tmp_path, random_content(4 * MiB)) as env:
        target = tmp_path / "target.img"
        job = await env.mirror(target)
        await env.wait_event("BLOCK_JOB_READY")
        assert job.info()["offset"] == job.info()["len"] == 4 * MiB
        assert job.info()["status"] == "ready"
        await env.manager.complete(["img"], pivot=False)
        assert_identical(env.source, target)
        assert "BLOCK_JOB_COMPLETED" in env.event_names()
        assert env.manager.query() == []
        # the mount stays on the source
        await env.write(0, b"after")
        assert env.source.read_bytes()[:5] == b"after"
        assert target.read_bytes()[:5] != b"after"


async def test_complete_before_ready_is_refused_and_changes_nothing(tmp_path: Path) -> None:
    async with engine(tmp_path, random_content(4 * MiB)) as env:
        target = tmp_path / "target.img"
        job = await env.mirror(target, speed=64 * 1024)  # slow enough never to be ready here
        with pytest.raises(StateError, match="not ready"):
            await env.manager.complete(["img"], pivot=True)
        with pytest.raises(StateError, match="not ready"):
            await env.manager.complete(["img"], pivot=False)
        assert job.info()["status"] == "running"
        assert env.node.job is job


async def test_sync_top_copies_only_allocated_extents_and_keeps_holes(tmp_path: Path) -> None:
    size = 256 * MiB
    async with engine(tmp_path, size=size) as env:
        with open(env.source, "r+b") as f:
            for offset in (0, 100 * MiB, 200 * MiB + 12345):
                f.seek(offset)
                f.write(random.Random(offset).randbytes(MiB))
        target = tmp_path / "target.img"
        job = await env.mirror(target, sync="top")
        await env.wait_event("BLOCK_JOB_READY")
        copied = job.stats["copied-bytes"]
        assert 3 * MiB <= copied <= 3 * MiB + 4 * 64 * 1024 + 2 * 1024 * 1024
        await env.manager.complete(["img"], pivot=False)
        assert_identical(env.source, target)
        allocated = os.stat(target).st_blocks * 512
        assert allocated <= 2 * os.stat(env.source).st_blocks * 512 + MiB


async def test_sync_none_duplicates_new_writes_only(tmp_path: Path) -> None:
    async with engine(tmp_path, random_content(2 * MiB, holes=False)) as env:
        target = tmp_path / "target.img"
        job = await env.mirror(target, sync="none")
        await env.wait_event("BLOCK_JOB_READY")
        assert job.stats["copied-bytes"] == 0
        await env.write(65536, b"x" * 65536)
        await env.write(300000, b"y" * 1000)  # unaligned, into a clean cluster
        with trio.fail_after(10):
            while job.stats["duplicated-bytes"] < 66536:
                await trio.sleep(0.01)
        data = target.read_bytes()
        assert data[65536:131072] == b"x" * 65536
        assert data[300000:301000] == b"y" * 1000
        assert data[:65536] == bytes(65536)  # never copied
        assert job.bitmap.count() == 0  # unaligned write into a clean cluster kept it clean


async def _random_writer(env: Env, seed: int, count: int, size: int, max_len: int) -> None:
    rng = random.Random(seed)
    for _ in range(count):
        length = rng.randrange(1, max_len)
        offset = rng.randrange(0, size - length)
        assert await env.write(offset, rng.randbytes(length)) == length
        if rng.random() < 0.3:
            await trio.sleep(0)


class SlowTarget:
    """Wraps a real target and delays every write by a random few milliseconds, so that copies
    and duplicates of the same cluster overlap as often as possible."""

    def __init__(self, inner: Any, seed: int) -> None:
        self._inner = inner
        self._rng = random.Random(seed)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    async def pwrite(self, offset: int, data: bytes, *, direct: bool = False) -> None:
        await trio.sleep(self._rng.random() * 0.003)
        await self._inner.pwrite(offset, data)

    async def write_zeroes(self, offset: int, length: int) -> None:
        await trio.sleep(self._rng.random() * 0.003)
        await self._inner.write_zeroes(offset, length)


async def _stress_round(tmp_path: Path, seed: int, copy_mode: str, slow: bool) -> bool:
    """One stress round; returns True when source and target ended identical."""
    size = 2 * MiB
    async with engine(tmp_path, random_content(size, seed)) as env:
        target = tmp_path / f"target-{seed}-{copy_mode}.img"
        job = await env.mirror(target, granularity=4096, buf_size=16384, copy_mode=copy_mode)
        if slow:
            job.target = SlowTarget(job.target, seed)
        async with trio.open_nursery() as nursery:
            for w in range(4):
                nursery.start_soon(_random_writer, env, seed * 10 + w, 150, size, 20000)
        await env.wait_event("BLOCK_JOB_READY", timeout=60)
        await env.manager.complete(["img"], pivot=False)
        return env.source.read_bytes() == target.read_bytes()


@pytest.fixture(params=["thread", "direct"])
def io_mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test with file I/O in worker threads (awaited, as on a disk) and on the trio thread
    (the inline write paths, as on tmpfs), wherever its files are."""
    monkeypatch.setattr(fileio, "IO_MODE", request.param)
    return request.param


@pytest.mark.parametrize("copy_mode", ["background", "write-blocking"])
async def test_stress_concurrent_unaligned_writers_converge_identical(tmp_path: Path, copy_mode: str,
                                                                      io_mode: str) -> None:
    for seed in range(6):
        assert await _stress_round(tmp_path, seed, copy_mode, slow=True), f"seed {seed} differs"


async def test_stress_detects_race_when_serialisation_is_disabled(tmp_path: Path, monkeypatch,
                                                                  io_mode: str) -> None:
    """The stress test has teeth: with conflict detection off, the target ends up stale."""
    original = inflight.InflightOps.register

    def register_without_conflicts(self, offset, length, *, is_copy=False):
        op = original(self, offset, length, is_copy=is_copy)
        for other in self._ops:
            other.conflicted = False
        return op

    monkeypatch.setattr(inflight.InflightOps, "register", register_without_conflicts)
    results = [await _stress_round(tmp_path, seed, "background", slow=True) for seed in range(6)]
    assert not all(results), "disabling the serialisation should have produced a stale target"


async def test_write_blocking_converges_under_a_writer_faster_than_the_copy(tmp_path: Path) -> None:
    size = 8 * MiB
    async with engine(tmp_path, random_content(size, 3)) as env:
        target = tmp_path / "target.img"
        job = await env.mirror(target, copy_mode="write-blocking", speed=2 * MiB)
        stop = trio.Event()

        async def writer() -> None:
            rng = random.Random(5)
            while not stop.is_set():
                offset = rng.randrange(0, size // 65536) * 65536
                await env.write(offset, rng.randbytes(65536))
                await trio.sleep(0)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(writer)
            await env.wait_event("BLOCK_JOB_READY", timeout=60)
            job.set_speed(0)
            stop.set()
        await env.manager.complete(["img"], pivot=False)
        assert_identical(env.source, target)


async def test_pivot_switches_open_handle_to_target(tmp_path: Path, io_mode: str) -> None:
    async with engine(tmp_path, random_content(2 * MiB)) as env:
        target = tmp_path / "target.img"
        await env.mirror(target)
        await env.write(0, b"before-pivot")
        await env.wait_event("BLOCK_JOB_READY")
        source_at_switch = env.source.read_bytes()
        await env.manager.complete(["img"])
        assert env.node.job is None
        assert env.node.backing_path == str(target)
        assert target.read_bytes() == source_at_switch
        await env.write(4096, b"after-pivot")
        assert await env.read(4096, 11) == b"after-pivot"
        assert env.source.read_bytes() == source_at_switch
        assert target.read_bytes()[4096:4107] == b"after-pivot"
        assert target.read_bytes()[:12] == b"before-pivot"


async def test_pause_leaves_target_unchanged_and_resume_converges(tmp_path: Path, io_mode: str) -> None:
    async with engine(tmp_path, random_content(4 * MiB)) as env:
        target = tmp_path / "target.img"
        job = await env.mirror(target)
        await env.wait_event("BLOCK_JOB_READY")
        await env.manager.pause("img")
        assert job.info()["status"] == "standby" and job.info()["paused"]
        before = sha(target)
        for i in range(20):
            await env.write(i * 100_000, b"paused-write")
        await trio.sleep(0.2)
        assert sha(target) == before
        assert job.bitmap.count() > 0
        env.manager.resume("img")
        with trio.fail_after(20):
            while job.bitmap.count():
                await trio.sleep(0.02)
        await env.manager.complete(["img"], pivot=False)
        assert_identical(env.source, target)


async def test_cancel_before_ready_and_after_ready(tmp_path: Path) -> None:
    async with engine(tmp_path, random_content(4 * MiB)) as env:
        await env.mirror(tmp_path / "t1.img", speed=64 * 1024)
        await env.manager.cancel(["img"])
        assert "BLOCK_JOB_CANCELLED" in env.event_names()
        assert env.node.job is None or env.node.job.finished
        env.events.clear()
        target = tmp_path / "t2.img"
        with trio.fail_after(10):
            while env.node.job is not None:
                await trio.sleep(0.01)
        await env.mirror(target)
        await env.wait_event("BLOCK_JOB_READY")
        await env.write(777, b"late write")
        await env.manager.cancel(["img"])
        assert "BLOCK_JOB_COMPLETED" in env.event_names()
        assert_identical(env.source, target)


async def test_persistent_bitmap_full_sync_then_clean_after_complete(tmp_path: Path, io_mode: str) -> None:
    from mirrorfs.bitmap.persistent import read_bitmap_file

    async with engine(tmp_path, random_content(4 * MiB)) as env:
        target = tmp_path / "target.img"
        bitmap_path = tmp_path / "job.bitmap"
        await env.mirror(target, bitmap=str(bitmap_path), speed=256 * 1024)
        # a full job's file starts with its whole work set
        with trio.fail_after(5):
            while not bitmap_path.exists():
                await trio.sleep(0.01)
        env.manager.set_speed("img", 0)
        await env.wait_event("BLOCK_JOB_READY")
        await env.manager.complete(["img"], pivot=False)
        assert_identical(env.source, target)
    header, data = read_bitmap_file(str(bitmap_path))
    assert not any(data[header.bits_offset:])  # nothing differed when it completed ...
    assert header.clean and header.ended  # ... and it no longer records writes


async def test_transaction_refused_when_one_job_not_ready(tmp_path: Path) -> None:
    async with engine(tmp_path, random_content(4 * MiB)) as env:
        job = await env.mirror(tmp_path / "t.img", speed=64 * 1024)
        from mirrorfs.mirror.manager import Action
        with pytest.raises(StateError):
            await env.manager.transaction([Action("complete", "img", pivot=False)])
        assert job.info()["status"] == "running"
        assert not job.gate.closed


async def test_bad_parameters_change_nothing(tmp_path: Path) -> None:
    from mirrorfs.errors import UsageError
    async with engine(tmp_path, random_content(MiB)) as env:
        with pytest.raises(UsageError, match="does not exist"):
            await env.manager.start_mirror(MirrorParams.from_arguments(
                {"device": "img", "target": str(tmp_path / "missing.img")}))
        with pytest.raises(ImageNotFoundError):
            await env.mirror(tmp_path / "x.img", device="nope")
        with pytest.raises(UsageError, match="power of two"):
            MirrorParams.from_arguments({"device": "img", "target": "/x", "granularity": 5000})
        with pytest.raises(UsageError, match="leaves the mount"):
            MirrorParams.from_arguments({"device": "../../etc/passwd", "target": "/x"})
        wrong = tmp_path / "wrong.img"
        wrong.write_bytes(b"x" * 1000)
        with pytest.raises(UsageError, match="bytes but the image|size"):
            await env.mirror(wrong)
        assert env.manager.query() == [] and env.node.job is None


@pytest.mark.parametrize("persistent", [False, True])
async def test_image_that_grows_during_the_job_is_mirrored_whole(tmp_path: Path, persistent: bool, io_mode: str) -> None:
    """A qcow2 file grows as it allocates; the job grows its bitmap and the target with it."""
    from mirrorfs.bitmap.persistent import read_bitmap_file

    async with engine(tmp_path, random_content(MiB)) as env:
        target = tmp_path / "target.img"
        extra = {"bitmap": str(tmp_path / "grow.bitmap")} if persistent else {}
        job = await env.mirror(target, granularity=65536, **extra)
        await env.wait_event("BLOCK_JOB_READY")
        await env.write(MiB, b"a" * 70000)            # appends
        await env.write(3 * MiB + 5, b"b" * 1000)     # leaves a hole, unaligned end
        assert job.size == 3 * MiB + 1005 and job.info()["len"] == job.size
        with trio.fail_after(10):
            while job.bitmap.count():
                await trio.sleep(0.01)
        await env.manager.complete(["img"], pivot=False)
        assert os.path.getsize(target) == os.path.getsize(env.source) == 3 * MiB + 1005
        assert_identical(env.source, target)
    if persistent:
        header, data = read_bitmap_file(str(tmp_path / "grow.bitmap"))
        assert header.image_size == 3 * MiB + 1005 and header.ended
        assert not any(data[header.bits_offset:])


async def test_write_in_flight_when_the_job_attaches_reaches_the_target(tmp_path: Path, io_mode: str) -> None:
    """A write that began before the job attached bypassed the write path: the job marks its
    range and lets it land before copying (regression: test_e2e_pivot_writes lost such a block)."""
    async with engine(tmp_path, random_content(MiB, holes=False)) as env:
        token = env.node.begin_passthrough_write(70000, 5000)  # as the FUSE layer does
        target = tmp_path / "target.img"
        async with trio.open_nursery() as nursery:
            started = trio.Event()

            async def start() -> None:
                await env.mirror(target, sync="none")
                started.set()

            nursery.start_soon(start)
            await started.wait()
            job = env.node.job
            assert job is not None and job.bitmap.is_dirty(70000, 5000)
            await trio.sleep(0.05)
            assert job.stats["copied-bytes"] == 0  # nothing copied while the write is in flight
            os.pwrite(env.handle.fd, b"z" * 5000, 70000)
            env.node.end_passthrough_write(token)
        await env.wait_event("BLOCK_JOB_READY")
        await env.manager.complete(["img"], pivot=False)
        assert target.read_bytes()[70000:75000] == b"z" * 5000


@pytest.mark.parametrize("copy_mode", ["background", "write-blocking"])
async def test_unaligned_write_into_a_clean_partial_last_cluster(tmp_path: Path, copy_mode: str,
                                                                io_mode: str) -> None:
    """A write that starts inside the image's partial last cluster, while that cluster is clean:
    its edge cluster stays clean once duplicated, and clearing it stays inside the image (it
    raised UsageError from the duplicate, which failed the job, or the mount)."""
    size = 4 * MiB + 12345
    async with engine(tmp_path, random_content(size, holes=False)) as env:
        target = tmp_path / "target.img"
        job = await env.mirror(target, copy_mode=copy_mode)
        await env.wait_event("BLOCK_JOB_READY")
        last = size - size % (64 * 1024)
        duplicated = 0
        for offset, data in ((last + 100, b"tail" * 10), (size - 7, b"the end")):
            await env.write(offset, data)  # one at a time: overlapping, neither would clear
            duplicated += len(data)
            with trio.fail_after(10):
                while job.stats["duplicated-bytes"] < duplicated and job.error is None:
                    await trio.sleep(0.01)
            assert job.error is None and job.info()["status"] == "ready"
            assert job.bitmap.count() == 0
        await env.manager.complete(["img"], pivot=False)
        assert_identical(env.source, target)


class HeldFlushTarget:
    """Wraps a real target: a flush from the ``held`` task waits for ``release`` before flushing
    for real (the copy loop's own durable points go through)."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.held: trio.lowlevel.Task | None = None
        self.started = trio.Event()
        self.release = trio.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    async def flush(self) -> None:
        if trio.lowlevel.current_task() is self.held:
            self.started.set()
            await self.release.wait()
        await self._inner.flush()


@pytest.mark.parametrize("source_fails", [False, True])
@pytest.mark.parametrize("first", ["source", "target"])
async def test_a_guest_flush_waits_for_both_the_source_and_the_target_flush(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, first: str, source_fails: bool) -> None:
    """The source's fsync and the target's flush run side by side; the guest's flush returns
    (or raises the source's error as it is) only once both have completed, whichever ends first,
    and the clears that flush made durable are committed to the bitmap file."""
    async with engine(tmp_path) as env:
        job = await env.mirror(tmp_path / "target.img", bitmap=str(tmp_path / "b.bitmap"),
                               granularity=4096)
        await env.wait_event("BLOCK_JOB_READY")
        await env.write(0, b"x" * 4096)
        with trio.fail_after(10):
            while job.bitmap.count():
                await trio.sleep(0.01)
        target = HeldFlushTarget(job.target)
        job.target = target
        source_started, source_release = trio.Event(), trio.Event()
        real_fsync = fileio.fsync

        async def held_fsync(fd: int, datasync: bool = False) -> None:
            if fd != env.handle.fd:
                return await real_fsync(fd, datasync)
            source_started.set()
            await source_release.wait()
            if source_fails:
                raise OSError(5, "injected source EIO")
            await real_fsync(fd, datasync)

        monkeypatch.setattr(fileio, "fsync", held_fsync)
        outcome: list[BaseException | None] = []

        async def guest_flush() -> None:
            target.held = trio.lowlevel.current_task()
            try:
                await job.fsync(env.handle, datasync=True)
            except BaseException as exc:  # noqa: BLE001  (the exact exception is the point)
                outcome.append(exc)
            else:
                outcome.append(None)

        events = {"source": source_release, "target": target.release}
        try:
            with trio.fail_after(10):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(guest_flush)
                    await source_started.wait()
                    await target.started.wait()  # both under way at once
                    events[first].set()
                    await trio.sleep(0.1)
                    assert outcome == [], "the guest's flush returned before both flushes completed"
                    events["target" if first == "source" else "source"].set()
        finally:
            for event in events.values():  # the job's end flushes the target too
                event.set()
        if source_fails:
            assert isinstance(outcome[0], OSError) and outcome[0].errno == 5, outcome
        else:
            assert outcome == [None]
        # the clear of the duplicated cluster reached the file (committed after the flush), and
        # the file is msync'ed
        stats = job.bitmap.statistics()
        assert stats["file_dirty_clusters"] == 0 and not stats["unsynced_changes"], stats
        await env.manager.complete(["img"], pivot=False)
