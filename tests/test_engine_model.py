"""A hypothesis state machine of the job engine: guest writes (inline and threaded), copy steps,
target writes landing in any order, target failures, pause/resume and complete/cancel, with the
bitmap invariant checked after every step and byte equality at the end.

The machine runs in a worker thread (hypothesis drives it synchronously); every rule runs its
coroutine on the test's trio thread with ``trio.from_thread.run``. Between rules the engine's
tasks run until all of them wait: the copy is driven by the model (``CopyTask.step``; the job's
own copy loop is replaced), and every target write waits until a rule lands it, so the
interleavings of copies and duplicates are the model's choice, not the scheduler's.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Awaitable, Callable

import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import (RuleBasedStateMachine, initialize, invariant, precondition, rule,
                                 run_state_machine_as_test)

from mirrorfs import fileio
from mirrorfs.errors import StateError, TargetRetryableError
from mirrorfs.fs.node import ImageNode, OpenHandle
from mirrorfs.mirror import inflight
from mirrorfs.mirror import failures
from mirrorfs.mirror.copy import CopyTask
from mirrorfs.mirror.manager import JobManager
from mirrorfs.mirror.params import MirrorParams
from mirrorfs.mirror.writes import WritePath

SIZE = 64 * 1024
GRANULARITY = 4096


class HeldTarget:
    """A real target whose async writes each wait until the model lands them (or fails them)."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.pending: list[list[Any]] = []  # [event, fail?]
        self.inline = False  # accept the inline path's synchronous write

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    async def _held(self) -> None:
        entry = [trio.Event(), False]
        self.pending.append(entry)
        await entry[0].wait()
        if entry[1]:
            raise TargetRetryableError("injected: connection lost")

    async def pwrite(self, offset: int, data: Any, *, direct: bool = False) -> None:
        await self._held()
        await self._inner.pwrite(offset, data)

    async def write_zeroes(self, offset: int, length: int) -> None:
        await self._held()
        await self._inner.write_zeroes(offset, length)

    def can_write_now(self, length: int) -> bool:
        return self.inline and self._inner.can_write_now(length)

    async def connect(self) -> None:  # the file stays open: a reconnect finds it at once
        await trio.lowlevel.checkpoint()

    def land(self, index: int, fail: bool) -> None:
        entry = self.pending.pop(index % len(self.pending))
        entry[1] = fail
        entry[0].set()


class EngineModel(RuleBasedStateMachine):
    """One job per example; ``run_model`` sets the class attributes."""

    nursery: trio.Nursery
    tmp: Path
    copy_mode = "background"
    examples = 0

    def _run(self, fn: Callable[[], Awaitable[Any]]) -> Any:
        async def body() -> Any:
            result = await fn()
            await _settle()
            return result
        return trio.from_thread.run(body)

    @initialize()
    def start(self) -> None:
        EngineModel.examples += 1
        self.dir = self.tmp / f"ex{EngineModel.examples}"
        self.dir.mkdir()
        self.source = self.dir / "source.img"
        self.source.write_bytes(bytes(range(256)) * (SIZE // 256))
        self.target_path = self.dir / "target.img"
        self.serial = 0
        self.ended: str | None = None
        self.commanding = False
        self._run(self._start)

    async def _start(self) -> None:
        self.node = ImageNode(inode=1024, relpath="img", backing_path=str(self.source))
        self.handle = OpenHandle(fh=1, node=self.node, flags=os.O_RDWR,
                                 fd=os.open(self.source, os.O_RDWR))
        self.node.handles[1] = self.handle
        self.manager = JobManager(lambda relpath: self.node, nursery=self.nursery)
        params = MirrorParams.from_arguments({
            "device": "img", "target": str(self.target_path), "mode": "absolute-paths",
            "granularity": GRANULARITY, "buf-size": 4 * GRANULARITY,
            "copy-mode": self.copy_mode})
        self.job = await self.manager.start_mirror(params)
        self.target = HeldTarget(self.job.target)
        self.job.target = self.target

    # ------------------------------------------------------------------ rules

    @rule(offset=st.integers(0, SIZE - 1), length=st.integers(1, 3 * GRANULARITY),
          inline=st.booleans())
    def guest_write(self, offset: int, length: int, inline: bool) -> None:
        length = min(length, SIZE - offset)
        self.serial += 1
        data = bytes([self.serial % 251 + 1]) * length

        async def write() -> None:
            self.target.inline = inline
            # the guest's request runs as its own task: a write-blocking duplicate waits
            self.nursery.start_soon(self._write, offset, data)
        self._run(write)

    async def _write(self, offset: int, data: bytes) -> None:
        job = self.node.job
        if job is not None:
            assert await job.write(self.handle, offset, data) == len(data)
        else:
            fileio.pwrite_now(self.handle.fd, data, offset)

    @precondition(lambda self: self.ended is None)
    @rule()
    def copy_step(self) -> None:
        async def step() -> None:
            copy = self.job.copy
            if self.job.finished or not copy.allowed():
                return
            # A step blocks on a free copy slot, and at a pass's end on every copy in flight:
            # take it only when that cannot wait for a target write the model holds.
            if len(self.target.pending) >= copy.max_copies:
                return
            at_pass_end = self.job.bitmap.next_dirty(copy._cursor) is None
            if at_pass_end and (copy.busy or self.target.pending):
                return
            await copy.step()
        self._run(step)

    @rule(index=st.integers(0, 7), fail=st.booleans())
    def land_target_write(self, index: int, fail: bool) -> None:
        async def land() -> None:
            if self.target.pending:
                self.target.land(index, fail and index % 4 == 0)
        self._run(land)

    # A pause waits for the target writes in flight, a complete or cancel for the guest's
    # requests: each runs as its own task, which the model's landings let finish.

    @precondition(lambda self: self.ended is None and not self.commanding)
    @rule()
    def pause_or_resume(self) -> None:
        async def toggle() -> None:
            job = self.job
            if job.finished:
                return
            if job.paused:
                job.resume()
            elif not job.user_paused:
                self.nursery.start_soon(self._command, job.pause)
        self._run(toggle)

    @precondition(lambda self: self.ended is None and not self.commanding)
    @rule(kind=st.sampled_from(["complete", "cancel"]))
    def end(self, kind: str) -> None:
        async def end() -> None:
            if self.job.finished:
                return
            if kind == "complete":
                self.nursery.start_soon(self._command, self._complete)
            else:
                self.nursery.start_soon(self._command, self._cancel)
        self._run(end)

    async def _command(self, fn: Callable[[], Awaitable[None]]) -> None:
        self.commanding = True
        try:
            await fn()
        except StateError:
            pass  # not ready, paused, already paused: refused, nothing changed
        finally:
            self.commanding = False

    async def _complete(self) -> None:
        await self.manager.complete(["img"], pivot=False)
        self.ended = "converged"

    async def _cancel(self) -> None:
        ready = self.job.ready  # a cancel after ready converges first
        await self.manager.cancel(["img"])
        self.ended = "converged" if ready else "cancelled"

    # ------------------------------------------------------------------ checks

    @invariant()
    def differing_clusters_are_dirty(self) -> None:
        def check() -> None:
            job = self.job
            if job.finished:
                return
            source, target = self.source.read_bytes(), self.target_path.read_bytes()
            for first in range(0, SIZE, GRANULARITY):
                if source[first:first + GRANULARITY] == target[first:first + GRANULARITY]:
                    continue
                assert job.bitmap.is_dirty(first, GRANULARITY) \
                    or job.inflight.overlaps(first, GRANULARITY), \
                    f"cluster at {first} differs on the target but is clean"

        async def run_check() -> None:
            check()
        trio.from_thread.run(run_check)

    def teardown(self) -> None:
        if getattr(self, "job", None) is None:
            return
        self._run(self._finish)

    async def _finish(self) -> None:
        job = self.job
        # Land everything, then let the copy converge and complete.
        with trio.fail_after(20):
            while not job.finished:
                while self.target.pending:
                    self.target.land(0, False)
                    await _settle()
                if self.commanding:
                    await _settle()
                    continue
                if job.paused:
                    job.resume()
                if job.ready and not self.target.pending and not job.copy.busy:
                    await self.manager.complete(["img"], pivot=False)
                    self.ended = "converged"
                    break
                if job.copy.allowed() and not self.target.pending:
                    await job.copy.step()
                await _settle()
        await self.manager.shutdown()
        os.close(self.handle.fd)
        if self.ended == "converged":
            assert self.source.read_bytes() == self.target_path.read_bytes(), \
                "the job converged but the target differs from the source"


async def _settle() -> None:
    """Let every engine task run until all wait (for a held target write, or an event), and
    every worker thread's I/O has come back."""
    for _ in range(3):
        await trio.testing.wait_all_tasks_blocked(cushion=0.001)
        while fileio.LIMITER.borrowed_tokens:
            await trio.sleep(0.001)
            await trio.testing.wait_all_tasks_blocked(cushion=0.001)


async def run_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *, copy_mode: str,
                    examples: int) -> None:
    async def attach_only(self: CopyTask, nursery: trio.Nursery) -> None:
        self.attach(nursery)
        await trio.sleep_forever()

    monkeypatch.setattr(CopyTask, "run", attach_only)
    monkeypatch.setattr(failures, "RECONNECT_BACKOFF", (0.001, 0.002))
    EngineModel.tmp = tmp_path
    EngineModel.copy_mode = copy_mode
    EngineModel.examples = 0
    cfg = settings(max_examples=examples, stateful_step_count=30, deadline=None, database=None,
                   phases=[Phase.generate], derandomize=True, suppress_health_check=list(HealthCheck))
    failure: Exception | None = None
    async with trio.open_nursery() as nursery:
        EngineModel.nursery = nursery
        try:
            await trio.to_thread.run_sync(
                lambda: run_state_machine_as_test(EngineModel, settings=cfg))
        except Exception as exc:  # raised as itself, not inside the nursery's group
            failure = exc
        finally:
            nursery.cancel_scope.cancel()
    if failure is not None:
        raise failure


@pytest.fixture(params=["thread", "direct"])
def io_mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Source I/O in worker threads (the threaded paths) or on the trio thread (the inline
    paths, as on tmpfs)."""
    monkeypatch.setattr(fileio, "IO_MODE", request.param)
    return request.param


@pytest.mark.parametrize("copy_mode", ["background", "write-blocking"])
async def test_engine_model_keeps_the_bitmap_invariant(tmp_path: Path, monkeypatch, io_mode: str,
                                                       copy_mode: str) -> None:
    both = 0
    write_both = WritePath._write_both

    async def counted(self, *args: Any) -> int:
        nonlocal both
        both += 1
        return await write_both(self, *args)

    monkeypatch.setattr(WritePath, "_write_both", counted)
    await run_model(tmp_path, monkeypatch, copy_mode=copy_mode, examples=25)
    # the threaded write-blocking writes issue the source write and the duplicate at once
    assert (both > 0) == (copy_mode == "write-blocking" and io_mode == "thread")


async def test_engine_model_fails_without_the_write_copy_serialisation(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, io_mode: str) -> None:
    """The model has teeth: with conflict detection off, it finds a stale clean cluster."""
    original = inflight.InflightOps.register

    def register_without_conflicts(self, offset, length, *, is_copy=False):
        op = original(self, offset, length, is_copy=is_copy)
        for other in self._ops:
            other.conflicted = False
            other.spans.clear()
        return op

    monkeypatch.setattr(inflight.InflightOps, "register", register_without_conflicts)
    with pytest.raises(AssertionError, match="differ"):
        await run_model(tmp_path, monkeypatch, copy_mode="background", examples=200)
