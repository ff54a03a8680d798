"""O_DIRECT requests by Linux AIO (``mirrorfs.aio``): no worker thread for an aligned request,
the bytes land and stay out of the page cache, and whatever AIO does not take (unaligned, too
large, a write that extends the file, an error) takes the thread path with the same result.

The files live in ``tmp_path``, on a disk filesystem (ext4 here), where O_DIRECT matters.
"""

from __future__ import annotations

import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
import trio

from benchscripts import SCRIPTS
from mirrorfs import aio, fileio
from mirrorfs.fs import fuseloop

sys.path.insert(0, str(SCRIPTS))
from benchlib.images import drop_cache, resident  # noqa: E402

MiB = 1 << 20


@pytest.fixture
def image(tmp_path: Path) -> Iterator[tuple[Path, int, int]]:
    """A written 4 MiB file on disk, its buffered descriptor and its O_DIRECT twin."""
    path = tmp_path / "img"
    path.write_bytes(os.urandom(4 * MiB))
    drop_cache(path)  # dirty cached pages would make RWF_NOWAIT refuse the requests there
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    twin = fileio.open_direct_twin(fd, os.O_RDWR, "source")
    if twin is None:
        os.close(fd)
        pytest.skip(f"{tmp_path} is on tmpfs or refuses O_DIRECT: no twin")
    try:
        yield path, fd, twin
    finally:
        fileio.close_twin(twin)
        os.close(fd)


@pytest.fixture
def no_threads(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Record every hand-off to a worker thread."""
    calls: list[Any] = []
    real = trio.to_thread.run_sync

    async def recording(func: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(func)
        return await real(func, *args, **kwargs)

    monkeypatch.setattr(trio.to_thread, "run_sync", recording)
    return calls


async def test_aligned_requests_take_no_thread_and_skip_the_page_cache(
        image: tuple[Path, int, int], no_threads: list[Any]) -> None:
    path, fd, twin = image
    if aio.context() is None:
        pytest.skip("no Linux AIO on this machine")
    blocks = {n * 64 * 1024: os.urandom(4096 * (n % 4 + 1)) for n in range(32)}
    async with trio.open_nursery() as nursery:  # many in flight at once, as at QD16
        for offset, data in blocks.items():
            nursery.start_soon(fileio.pwrite_thread, fd, data, offset, twin)
    for offset, data in blocks.items():
        assert await fileio.pread_thread(fd, len(data), offset, twin) == data
    assert no_threads == []
    assert resident(path) == 0
    with open(path, "rb") as f:
        assert all(os.pread(f.fileno(), len(d), o) == d for o, d in blocks.items())


async def test_completions_come_from_the_ring_without_a_system_call(
        image: tuple[Path, int, int], monkeypatch: pytest.MonkeyPatch) -> None:
    """On x86-64 the completions are read from the kernel's mapped ring: no ``io_getevents``,
    and the ring's head wraps around (more requests than it has places) without losing one."""
    path, fd, twin = image
    ctx = aio.context()
    if ctx is None or platform.machine() != "x86_64":
        pytest.skip("no Linux AIO with user-space completions on this machine")
    calls: list[int] = []
    real = ctx._syscall

    def counting(number: int, *args: Any) -> int:
        calls.append(number)
        return real(number, *args)

    monkeypatch.setattr(ctx, "_syscall", counting)
    ring_places = ctx._ring.nr if ctx._ring is not None else 0
    count = 3 * ring_places
    blocks = {n * 4096: os.urandom(4096) for n in range(count)}
    pending = list(blocks.items())

    async def writer() -> None:
        while pending:
            offset, data = pending.pop()
            assert await ctx.pwrite(twin, data, offset) == 4096

    async with trio.open_nursery() as nursery:  # 16 in flight, as at QD16
        for _ in range(16):
            nursery.start_soon(writer)
    assert calls.count(ctx._nr_submit) == count
    assert ctx._nr_getevents not in calls
    with open(path, "rb") as f:
        assert all(os.pread(f.fileno(), 4096, o) == d for o, d in blocks.items())


class _Steps(trio.abc.Instrument):
    def __init__(self) -> None:
        self.tasks: list[str] = []

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self.tasks.append(task.name)


async def test_a_completion_resumes_its_request_without_another_task(
        image: tuple[Path, int, int]) -> None:
    """A request with nothing else in flight waits on the eventfd itself: a QD1 request costs
    no step of the reaper task (and no scheduler pass for it)."""
    _, _, twin = image
    ctx = aio.context()
    if ctx is None:
        pytest.skip("no Linux AIO on this machine")
    data = os.urandom(4096)
    assert await ctx.pwrite(twin, data, 0) == 4096
    await trio.lowlevel.checkpoint()  # the reaper's first step (it parks) may share a batch with us
    steps = _Steps()
    trio.lowlevel.add_instrument(steps)
    try:
        for n in range(20):
            assert await ctx.pwrite(twin, data, n * 4096) == 4096
            assert await ctx.pread(twin, 4096, n * 4096) == data
    finally:
        trio.lowlevel.remove_instrument(steps)
    me = trio.lowlevel.current_task().name
    assert set(steps.tasks) == {me}


async def test_cancelled_requests_still_complete_and_hand_over_the_wait(
        image: tuple[Path, int, int]) -> None:
    """A cancellation does not end a request in flight (the kernel still writes into its
    buffer), and the requests that outlive the eventfd's waiter are still delivered."""
    path, _, twin = image
    ctx = aio.context()
    if ctx is None:
        pytest.skip("no Linux AIO on this machine")
    blocks = {n * 8192: os.urandom(4096) for n in range(48)}
    results: list[int | None] = []

    async def write(offset: int, data: bytes) -> None:
        results.append(await ctx.pwrite(twin, data, offset))

    async with trio.open_nursery() as nursery:
        for offset, data in blocks.items():
            nursery.start_soon(write, offset, data)
        await trio.lowlevel.checkpoint()
        nursery.cancel_scope.cancel()
    assert results == [4096] * len(blocks) and ctx.in_flight == 0
    assert await ctx.pwrite(twin, blocks[0], 0) == 4096  # and the next request is served
    with open(path, "rb") as f:
        assert all(os.pread(f.fileno(), 4096, o) == d for o, d in blocks.items())


async def test_what_aio_does_not_take_goes_through_a_thread(
        image: tuple[Path, int, int], no_threads: list[Any]) -> None:
    path, fd, twin = image
    size = path.stat().st_size
    cases = [
        (4000, os.urandom(1000)),  # unaligned: the buffered descriptor
        (MiB, os.urandom(2 * MiB)),  # larger than a slot
        (size, os.urandom(8192)),  # extends the file: RWF_NOWAIT refuses it
    ]
    expected = bytearray(path.read_bytes())
    for offset, data in cases:
        assert await fileio.pwrite_thread(fd, data, offset, twin) == len(data)
        expected[offset:offset + len(data)] = data
    # a read past the end is short: AIO leaves it to the thread, which returns what is there
    assert await fileio.pread_thread(fd, 16384, size) == bytes(expected[size:size + 16384])
    assert len(no_threads) == len(cases) + 1
    assert path.read_bytes() == bytes(expected)


async def test_an_aio_error_is_reported_by_the_thread_path(image: tuple[Path, int, int]) -> None:
    _, fd, twin = image
    ro = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_DIRECT)
    try:
        with pytest.raises(OSError) as err:
            await fileio.pwrite_aligned(fd, ro, os.urandom(4096), 0)
        assert err.value.errno == 9  # EBADF: the twin is read-only
    finally:
        os.close(ro)


async def _completed_write(ctx: aio.AioContext, twin: int, done: list[int | None]) -> None:
    """Submit a write and wait, without yielding, until it completed but is not delivered."""

    async def write() -> None:
        done.append(await ctx.pwrite(twin, os.urandom(4096), 0))

    for _ in range(100):
        trio.lowlevel.spawn_system_task(write)
        while not ctx.in_flight and not done:
            await trio.lowlevel.checkpoint()
        if not done:
            break
        done.clear()  # submitted and delivered between two of our steps (a fast disk): again
    deadline = time.monotonic() + 10
    while not ctx.completed() and time.monotonic() < deadline:
        time.sleep(0.0001)  # no yield: nothing can deliver it
    assert ctx.completed() and done == []


async def test_completed_tells_when_a_scheduler_pass_must_deliver(image: tuple[Path, int, int]) -> None:
    _, _, twin = image
    ctx = aio.context()
    if ctx is None:
        pytest.skip("no Linux AIO on this machine")
    assert not ctx.completed()
    done: list[int | None] = []
    await _completed_write(ctx, twin, done)
    while not done:
        await trio.sleep(0.001)
    assert done == [4096] and not ctx.completed()


class _IoWaits(trio.abc.Instrument):
    def __init__(self) -> None:
        self.count = 0

    def before_io_wait(self, timeout: float) -> None:
        self.count += 1


async def test_the_fuse_loop_takes_a_scheduler_pass_when_completions_wait(
        image: tuple[Path, int, int], monkeypatch: pytest.MonkeyPatch) -> None:
    """pyfuse3's loop serves queued requests without a scheduler pass; a completed O_DIRECT
    request would wait up to ``YIELD_INTERVAL`` to be delivered, so the waiter takes one."""
    _, _, twin = image
    ctx = aio.context()
    if ctx is None:
        pytest.skip("no Linux AIO on this machine")
    waiter = fuseloop.PollingWaiter()
    r, w = os.pipe()
    try:
        os.write(w, b"x")  # a request is queued: the fast path would return at once
        waits = _IoWaits()
        trio.lowlevel.add_instrument(waits)
        try:
            monkeypatch.setattr(fuseloop, "YIELD_INTERVAL", 0.0)
            await waiter.wait_readable(r)  # a scheduler pass: the waiter finds the AIO context
            assert waits.count == 1
            monkeypatch.setattr(fuseloop, "YIELD_INTERVAL", 3600.0)  # only a completion ends it
            waits.count = 0
            await waiter.wait_readable(r)
            assert waits.count == 0  # the fast path
            await waiter.wait_readable(r)
            assert waits.count == 0
            done: list[int | None] = []
            await _completed_write(ctx, twin, done)
            before = waits.count
            await waiter.wait_readable(r)
            assert waits.count > before
        finally:
            trio.lowlevel.remove_instrument(waits)
        while not done:
            await trio.sleep(0.001)
        assert done == [4096]
    finally:
        os.close(r)
        os.close(w)
