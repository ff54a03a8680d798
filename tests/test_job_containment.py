"""Failure containment of the job engine, driven without FUSE (the seam of test_mirror_engine.py).

Whatever fails inside a job's tasks ends that job (``failed``, or paused as its policy says),
never the nursery the jobs run in: in these tests that nursery is the test's own, so an escaped
exception fails the test. Also: a job's failed end waits for a transaction acting on it, the copy
loop's durable point is serialised with the job's end, and a start that fails undoes what it did.
The same through a real mount, with a real faulty source, is in tests/test_source_faults.py.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import pytest
import trio

from compare import assert_identical
from mirrorfs import fileio
from mirrorfs.bitmap.inspect import inspect_file
from mirrorfs.bitmap.persistent import PersistentBitmap
from mirrorfs.errors import BitmapFormatError, SourceError, StateError, UsageError
from mirrorfs.mirror.copy import CopyTask
from mirrorfs.mirror.job import MirrorJob
from mirrorfs.mirror.params import MirrorParams
from test_mirror_engine import MiB, Env, engine, hold_converge, random_content


async def wait_for(predicate: Any, what: str, timeout: float = 10) -> None:
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.01)


async def assert_serves_io(env: Env) -> None:
    """The image is still served: a write reaches the source and reads back."""
    await env.write(3 * MiB + 7, b"still served")
    assert await env.read(3 * MiB + 7, 12) == b"still served"
    with open(env.source, "rb") as f:
        f.seek(3 * MiB + 7)
        assert f.read(12) == b"still served"


async def assert_new_job_completes(env: Env, name: str) -> None:
    target = env.tmp / name
    env.events.clear()
    await env.mirror(target)
    await env.wait_event("BLOCK_JOB_READY")
    await env.manager.complete(["img"], pivot=False)
    assert_identical(env.source, target)


def assert_clean_and_unlocked(path: Path, size: int, *, ended: bool) -> None:
    """The bitmap file says clean, all clear, ended (or not), and no job holds it."""
    info = inspect_file(str(path))
    assert info["size"] == size and info["clean-shutdown"] and info["dirty-clusters"] == 0, info
    assert info["ended"] is ended and not info["in-use"], info


def _raise_in(monkeypatch: pytest.MonkeyPatch, name: str, exc: BaseException,
              when: Any = lambda *a: True) -> None:
    """Make ``MirrorJob.<name>`` (``CopyTask.<name>`` for the copy's methods) raise ``exc``
    whenever ``when(*args)`` holds."""
    owner: Any = CopyTask if name in ("copy_range", "_settled") else MirrorJob
    real = getattr(owner, name)
    if name == "copy_range":
        async def broken(self: Any, *args: Any) -> Any:
            if when(*args):
                raise exc
            return await real(self, *args)
    else:
        def broken(self: Any, *args: Any) -> Any:  # type: ignore[misc]
            if when(*args):
                raise exc
            return real(self, *args)
    monkeypatch.setattr(owner, name, broken)


@pytest.mark.parametrize("where", ["copy", "copy loop", "duplicate", "inline duplicate", "bitmap msync"])
async def test_an_exception_in_a_job_task_fails_that_job_and_the_mount_goes_on(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str) -> None:
    async with engine(tmp_path, random_content(4 * MiB)) as env:
        extra: dict[str, Any] = {}
        if where == "copy":
            _raise_in(monkeypatch, "copy_range", RuntimeError("injected"), lambda off, n: off + n > MiB)
            expected = "internal error in a copy: RuntimeError: injected"
        elif where == "copy loop":
            _raise_in(monkeypatch, "_settled", KeyError("injected"))
            expected = "internal error in the copy loop: KeyError: 'injected'"
        elif where == "duplicate":
            # as from a bitmap closed under a write: the duplicate landed, clearing raises
            _raise_in(monkeypatch, "_duplicated", ValueError("injected"), lambda op, *a: op is not None)
            expected = "internal error in a duplicated write: ValueError: injected"
        elif where == "inline duplicate":  # in the guest's request, on the trio thread
            monkeypatch.setattr(fileio, "IO_MODE", "direct")
            env.handle.fd = env.handle.fd  # asks inline_capable() anew
            assert env.handle.runs_inline(70000)
            _raise_in(monkeypatch, "_duplicated", ValueError("injected"))
            expected = "internal error in a duplicated write: ValueError: injected"
        else:
            def failing_msync(self: PersistentBitmap) -> None:
                raise OSError(errno.EIO, os.strerror(errno.EIO))
            monkeypatch.setattr(PersistentBitmap, "flush", failing_msync)
            extra["bitmap"] = str(tmp_path / "job.bitmap")
            expected = f"cannot write bitmap {tmp_path / 'job.bitmap'}: Input/output error"
        job = await env.mirror(tmp_path / "target.img", **extra)
        if where.endswith("duplicate"):
            await env.wait_event("BLOCK_JOB_READY")
            assert await env.write(5000, b"d" * 70000) == 70000  # the writer's result stands
        done = await env.wait_event("BLOCK_JOB_COMPLETED")
        assert done["error"] == expected
        info = job.info()
        assert info["status"] == "concluded" and info["io-status"] == "failed"
        assert info["error"] == expected
        # a failed job stays listed with its reason (its recovery point ages as time goes on)
        assert [_timeless(entry) for entry in env.manager.query()] == [_timeless(info)]
        assert env.node.job is None
        with pytest.raises(StateError, match="ended"):
            await env.manager.complete(["img"])
        await assert_serves_io(env)
        monkeypatch.undo()
        await assert_new_job_completes(env, "again.img")


class BadSector:
    """Makes the copy's reads of [start, end) fail with EIO until ``heal()``; counts them."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, start: int, end: int) -> None:
        self.failed = 0
        self.healed = False
        real = fileio.preadinto

        async def preadinto(fd: int, view: memoryview, offset: int, twin: int | None = None) -> int:
            if not self.healed and offset < end and start < offset + len(view):
                self.failed += 1
                raise OSError(errno.EIO, os.strerror(errno.EIO))
            return await real(fd, view, offset, twin)

        monkeypatch.setattr(fileio, "preadinto", preadinto)

    def heal(self) -> None:
        self.healed = True


@pytest.mark.parametrize("policy", ["report", "enospc"])
async def test_a_source_read_error_fails_the_job_with_report(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             policy: str) -> None:
    async with engine(tmp_path, random_content(4 * MiB)) as env:
        BadSector(monkeypatch, MiB, MiB + 4096)
        job = await env.mirror(tmp_path / "target.img", on_source_error=policy)
        done = await env.wait_event("BLOCK_JOB_COMPLETED")
        assert "reading image 'img' at offset" in done["error"] and "Input/output error" in done["error"]
        errors = [d for e, d in env.events if e == "BLOCK_JOB_ERROR"]
        assert errors == [{"device": "img", "operation": "read", "action": "report"}]
        assert job.info()["io-status"] == "failed" and job.info()["error"] == done["error"]
        await assert_serves_io(env)


async def test_a_source_read_error_pauses_the_job_with_stop(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async with engine(tmp_path, random_content(4 * MiB)) as env:
        bad = BadSector(monkeypatch, MiB, MiB + 4096)
        target = tmp_path / "target.img"
        job = await env.mirror(target, on_source_error="stop")
        error = await env.wait_event("BLOCK_JOB_ERROR")
        assert error == {"device": "img", "operation": "read", "action": "stop"}
        info = job.info()
        assert info["status"] == "paused" and info["paused"] and info["io-status"] == "failed"
        assert job.bitmap.is_dirty(MiB, 4096)
        await assert_serves_io(env)
        bad.heal()
        env.manager.resume("img")
        assert job.info()["io-status"] == "ok"
        await env.wait_event("BLOCK_JOB_READY")
        await env.manager.complete(["img"], pivot=False)
        assert_identical(env.source, target)


async def test_a_source_read_error_is_retried_at_a_bounded_rate_with_ignore(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async with engine(tmp_path, random_content(4 * MiB)) as env:
        bad = BadSector(monkeypatch, MiB, MiB + 4096)
        target = tmp_path / "target.img"
        job = await env.mirror(target, on_source_error="ignore")
        await env.wait_event("BLOCK_JOB_ERROR")
        await trio.sleep(1)
        assert 2 <= bad.failed <= 15, bad.failed  # retried, but no busy loop
        actions = {d["action"] for e, d in env.events if e == "BLOCK_JOB_ERROR"}
        assert actions == {"ignore"}
        assert job.info()["status"] == "running" and job.bitmap.is_dirty(MiB, 4096)
        bad.heal()
        await env.wait_event("BLOCK_JOB_READY")
        await env.manager.complete(["img"], pivot=False)
        assert_identical(env.source, target)


async def test_a_failure_during_a_transaction_waits_for_it(tmp_path: Path) -> None:
    """A job that fails while a transaction holds its gate ends after the transaction, which
    is refused (the failure came first): its gate never reopens in the middle."""
    async with engine(tmp_path, random_content(4 * MiB)) as env:
        job = await env.mirror(tmp_path / "target.img")
        await env.wait_event("BLOCK_JOB_READY")
        entered, release = hold_converge(job)
        outcome: list[Any] = []
        written: list[int] = []

        async def complete() -> None:
            try:
                await env.manager.complete(["img"], pivot=False)
                outcome.append("completed")
            except StateError as exc:
                outcome.append(exc)

        async def write() -> None:
            written.append(await env.write(0, b"during"))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(complete)
            with trio.fail_after(5):
                await entered.wait()
            job._fail("injected failure")  # as the job's tasks report one
            nursery.start_soon(write)
            await trio.sleep(0.3)
            reopened = not job.gate.closed or bool(written)
            ended_early = "BLOCK_JOB_COMPLETED" in env.event_names()
            release.set()
        assert not reopened, "the gate reopened during the transaction"
        assert not ended_early, "the failed end ran during the transaction"
        assert len(outcome) == 1 and isinstance(outcome[0], StateError), outcome
        assert "failing: injected failure" in str(outcome[0])
        await wait_for(lambda: job.finished and not job.gate.closed, "the failed end")
        assert written == [6]
        completed = [d for e, d in env.events if e == "BLOCK_JOB_COMPLETED"]
        assert len(completed) == 1 and completed[0]["error"] == "injected failure"
        assert job.info()["status"] == "concluded"


async def test_the_copy_loops_durable_point_is_serialised_with_the_jobs_end(tmp_path: Path) -> None:
    """The copy loop's commit (target flush, then clear the file's bits) must not run into a
    complete that closes the bitmap meanwhile."""
    async with engine(tmp_path, random_content(4 * MiB)) as env:
        bitmap_path = tmp_path / "job.bitmap"
        target = tmp_path / "target.img"
        job = await env.mirror(target, bitmap=str(bitmap_path))
        await env.wait_event("BLOCK_JOB_READY")
        entered, release = trio.Event(), trio.Event()
        real_flush = job.target.flush

        async def stalled_flush() -> None:
            if entered.is_set():
                return await real_flush()
            entered.set()
            # as an fsync in a worker thread: once begun it runs to its end
            with trio.CancelScope(shield=True):
                await release.wait()
                await real_flush()

        job.target.flush = stalled_flush  # type: ignore[method-assign]
        await env.write(0, b"y" * 65536)  # its duplicate clears a bit: the commit has work
        with trio.fail_after(5):
            await entered.wait()  # the copy loop's periodic commit, between begin and finish
        done = trio.Event()

        async def complete() -> None:
            await env.manager.complete(["img"], pivot=False)
            done.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(complete)
            await trio.sleep(0.3)
            early = done.is_set()
            release.set()
        assert not early, "complete ran while the copy loop was committing"
        assert_identical(env.source, target)
        assert [e for e in env.event_names() if e.startswith("BLOCK_JOB_")] == \
            ["BLOCK_JOB_READY", "BLOCK_JOB_COMPLETED"]
    assert_clean_and_unlocked(bitmap_path, 4 * MiB, ended=True)  # complete --no-pivot ends it


async def test_a_start_that_fails_after_creating_the_target_removes_it(tmp_path: Path) -> None:
    async with engine(tmp_path, random_content(MiB)) as env:
        target = tmp_path / "created.img"
        with pytest.raises(UsageError, match="bitmap directory"):
            await env.mirror(target, bitmap=str(tmp_path / "missing" / "job.bitmap"))
        assert not target.exists()
        assert env.manager.query() == [] and env.node.job is None
        # an existing target is never removed
        target.write_bytes(bytes(MiB))
        with pytest.raises(UsageError, match="bitmap directory"):
            await env.mirror(target, bitmap=str(tmp_path / "missing" / "job.bitmap"))
        assert target.read_bytes() == bytes(MiB)


@pytest.mark.parametrize("sync", ["full", "dirty"])
async def test_a_start_that_fails_after_the_bitmap_undoes_everything(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sync: str) -> None:
    """A failure after the target and the bitmap exist (the image cannot be read): the bitmap is
    closed (its lock released) and, if this start created it, removed; so is a created target;
    no job remains, and a failed job with the same id is listed again."""
    async with engine(tmp_path, random_content(MiB)) as env:
        bitmap_path = tmp_path / "job.bitmap"
        if sync == "dirty":  # a bitmap left by an earlier job
            await env.mirror(tmp_path / "first.img", bitmap=str(bitmap_path))
            await env.wait_event("BLOCK_JOB_READY")
            await env.manager.complete(["img"], pivot=False)
        # a failed job with the same id
        _raise_in(monkeypatch, "copy_range", RuntimeError("injected"))
        failed = await env.mirror(tmp_path / "failed.img")
        await wait_for(lambda: failed.finished, "the first job to fail")

        async def unreadable_image(self: MirrorJob, **kwargs: Any) -> None:
            raise SourceError("cannot read image 'img': Input/output error", errno=errno.EIO)

        monkeypatch.setattr(MirrorJob, "run", unreadable_image)
        target = tmp_path / "created.img"
        if sync == "full":
            with pytest.raises(SourceError, match="cannot read image"):
                await env.mirror(target, bitmap=str(bitmap_path), sync=sync)
        else:  # the earlier job's bitmap (another target) is refused; the created target goes
            before = bitmap_path.read_bytes()
            with pytest.raises(BitmapFormatError, match="was made for target"):
                await env.mirror(target, bitmap=str(bitmap_path), sync=sync)
            assert bitmap_path.read_bytes() == before
        assert not target.exists()
        assert [_timeless(e) for e in env.manager.query()] == [_timeless(failed.info())]
        assert env.node.job is None
        if sync == "full":
            assert not bitmap_path.exists()
        else:  # kept as it was
            assert_clean_and_unlocked(bitmap_path, MiB, ended=True)
        monkeypatch.undo()
        await assert_new_job_completes(env, "again.img")


def test_buf_size_has_an_upper_bound() -> None:
    args = {"device": "img", "target": "/t.img"}
    assert MirrorParams.from_arguments({**args, "buf-size": "1G"}).buf_size == 1 << 30
    for too_big in ((1 << 30) + 1, "2G", 1 << 62):
        with pytest.raises(UsageError, match=r"^buf-size \d+ is more than the largest allowed, 1G"):
            MirrorParams.from_arguments({**args, "buf-size": too_big})


def _timeless(info: dict) -> dict:
    """A job's entry without the fields that move with the clock."""
    return {key: value for key, value in info.items() if key != "__org.mirrorfs_recovery-point-age"}
