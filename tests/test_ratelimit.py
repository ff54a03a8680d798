"""The copy's rate limiter: bytes per second over time, smooth chunks, set-speed takes effect."""

import trio

from mirrorfs.mirror.ratelimit import RateLimiter


async def test_rate_is_held_over_time(autojump_clock: trio.abc.Clock) -> None:
    limiter = RateLimiter(1000)
    start = trio.current_time()
    for _ in range(11):
        await limiter.take(100)
    assert abs((trio.current_time() - start) - 1.0) < 1e-6  # the 11th waits for the 10th's slot


async def test_set_speed_zero_frees_a_waiting_task(autojump_clock: trio.abc.Clock) -> None:
    limiter = RateLimiter(10)
    await limiter.take(1000)  # the next slot is 100 s away
    done = trio.Event()

    async def waiter() -> None:
        await limiter.take(1000)
        done.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter)
        await trio.sleep(1)
        assert not done.is_set()
        limiter.set_rate(0)
        with trio.fail_after(0.001):
            await done.wait()


def test_chunk_size_is_a_quarter_second_of_whole_clusters() -> None:
    assert RateLimiter(0).chunk_size(65536, 4 << 20) == 4 << 20
    assert RateLimiter(1 << 20).chunk_size(65536, 4 << 20) == 256 << 10
    assert RateLimiter(1000).chunk_size(65536, 4 << 20) == 65536


async def test_set_speed_zero_as_the_wait_ends(autojump_clock: trio.abc.Clock) -> None:
    """``set-speed 0`` in the same instant as a waiting task's slot comes: the task is let go,
    whichever of the two trio runs first (the task used to divide by the new rate, 0)."""
    for _ in range(30):  # trio orders tasks woken together at random
        limiter = RateLimiter(10)
        await limiter.take(10)  # the next slot is 1 s away
        slot = trio.current_time() + 1

        async def clear_at_slot() -> None:
            await trio.sleep_until(slot)
            limiter.set_rate(0)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(clear_at_slot)
            nursery.start_soon(limiter.take, 10)
