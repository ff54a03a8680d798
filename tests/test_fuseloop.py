"""The cheaper waiting given to pyfuse3's request loop (``fs/fuseloop.py``), on pipes, no FUSE.

Every mount in the other tests runs with it installed; these pin down its own promises: no
scheduler pass when a request is already queued, a lock handed over in order, the polling window
adapting both ways, and other tasks still running under a flood of requests.
"""

from __future__ import annotations

import os
import time

import pyfuse3
import pytest
import trio
import trio.testing

from mirrorfs.fs import fuseloop
from mirrorfs.fs.fuseloop import HandoffLock, PollingWaiter


@pytest.fixture
def pipe():
    r, w = os.pipe()
    os.set_blocking(r, False)
    yield r, w
    os.close(r)
    os.close(w)


async def _append_one(ran: list[int]) -> None:
    ran.append(1)


async def test_free_lock_is_taken_without_a_scheduler_pass() -> None:
    lock = HandoffLock()
    ran = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_append_one, ran)
        async with lock:
            assert lock.locked()
            assert ran == []  # the other task did not get to run: no checkpoint happened
        assert not lock.locked()


async def test_lock_is_handed_to_waiters_in_order_and_survives_a_cancelled_waiter() -> None:
    lock = HandoffLock()
    order: list[str] = []
    doomed = trio.CancelScope()

    async def user(name: str, scope: trio.CancelScope | None = None) -> None:
        with scope or trio.CancelScope():
            async with lock:
                order.append(name)
                await trio.sleep(0.001)

    async with trio.open_nursery() as nursery:
        async with lock:
            for name, scope in (("a", None), ("cancelled", doomed), ("b", None)):
                nursery.start_soon(user, name, scope)
                await trio.testing.wait_all_tasks_blocked()
            doomed.cancel()
            await trio.testing.wait_all_tasks_blocked()
    assert order == ["a", "b"]
    assert not lock.locked()


async def test_queued_data_returns_without_a_scheduler_pass(pipe) -> None:
    r, w = pipe
    waiter = PollingWaiter()
    os.write(w, b"x")
    await waiter.wait_readable(r)  # may go through trio (the first yield is due)
    assert os.read(r, 1) == b"x"
    os.write(w, b"x")
    ran = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_append_one, ran)
        await waiter.wait_readable(r)
        assert ran == []
    assert os.read(r, 1) == b"x"


async def test_waits_through_trio_until_data_comes(pipe) -> None:
    r, w = pipe
    waiter = PollingWaiter()

    async def write_later() -> None:
        await trio.sleep(0.02)
        os.write(w, b"y")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(write_later)
        await waiter.wait_readable(r)
        assert os.read(r, 1) == b"y"
    # that wait took longer than poll_max: no polling window after it
    assert waiter.window == 0.0


def test_the_window_opens_doubles_up_to_poll_max_and_closes() -> None:
    waiter = PollingWaiter(poll_max_ns=32768)
    waiter.adapt(10e-6)  # a sleep that polling would have saved opens the window
    assert waiter.window == fuseloop.POLL_START_NS / 1e9
    for expected in (8e-6, 16e-6, 32e-6, 32.768e-6, 32.768e-6):
        waiter.adapt(1e-6)
        assert waiter.window == pytest.approx(expected)
    waiter.adapt(1e-3)  # one longer than poll_max closes it: an idle mount does not spin
    assert waiter.window == 0.0


async def test_zero_poll_max_never_opens_a_window(pipe) -> None:
    r, w = pipe
    waiter = PollingWaiter(poll_max_ns=0)
    for _ in range(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.sleep, 0.001)
            os.write(w, b"z")
            await waiter.wait_readable(r)
        os.read(r, 1)
    assert waiter.window == 0.0


async def test_other_tasks_run_under_a_flood_of_queued_requests(pipe) -> None:
    r, w = pipe
    waiter = PollingWaiter()
    os.write(w, b"q")  # never read: the descriptor stays readable, as under a flood of requests
    ticks = 0

    async def other_task() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await trio.sleep(0)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(other_task)
        end = time.monotonic() + 0.2
        rounds = 0
        while time.monotonic() < end:
            await waiter.wait_readable(r)
            rounds += 1
        nursery.cancel_scope.cancel()
    # At least one scheduler pass per YIELD_INTERVAL (1 ms): about 200 in 0.2 s; most rounds
    # returned without one.
    assert ticks >= 0.2 / fuseloop.YIELD_INTERVAL / 2
    assert rounds > 2 * ticks


async def test_cancellation_reaches_a_waiter(pipe) -> None:
    r, _ = pipe
    waiter = PollingWaiter()
    with trio.move_on_after(0.05) as scope:
        await waiter.wait_readable(r)
    assert scope.cancelled_caught


def test_install_gives_pyfuse3_alone_the_primitives_and_uninstall_restores_trio() -> None:
    try:
        waiter = fuseloop.install(1000)
        seen = pyfuse3.__dict__["trio"]
        assert seen is not trio
        assert seen.Lock is HandoffLock
        assert seen.lowlevel.wait_readable == waiter.wait_readable
        # everything else is trio's own
        assert seen.open_nursery is trio.open_nursery
        assert seen.lowlevel.current_task is trio.lowlevel.current_task
        assert seen.ClosedResourceError is trio.ClosedResourceError
        assert trio.Lock is not HandoffLock
    finally:
        fuseloop.uninstall()
    assert pyfuse3.__dict__["trio"] is trio
