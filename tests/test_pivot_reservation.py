"""A pivot of an image that another transaction is pivoting is refused, not queued behind it.

Transactions run one at a time; queued, the second pivot would move the image again right after
the first one moved it. The engine is driven directly (tests/test_mirror_engine.py's harness),
with the first pivot held in its converge so the second request surely comes in the middle.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from mirrorfs.errors import StateError
from compare import assert_identical, assert_same_bytes
from test_mirror_engine import engine, hold_converge, random_content

MiB = 1024 * 1024


async def _all_ready(jobs: list, timeout: float = 30) -> None:
    with trio.fail_after(timeout):
        while not all(job.ready for job in jobs):
            await trio.sleep(0.01)


async def test_a_second_pivot_of_an_image_in_the_middle_of_one_is_refused(tmp_path: Path) -> None:
    content = random_content(4 * MiB)
    async with engine(tmp_path, content) as env:
        jobs = [await env.mirror(tmp_path / f"{name}.img", job_id=name) for name in "abc"]
        a, b, c = jobs
        await _all_ready(jobs)

        in_converge, let_go = hold_converge(a)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(env.manager.complete, ["a"])
            await in_converge.wait()

            with pytest.raises(StateError) as refused, trio.fail_after(5):  # not queued
                await env.manager.complete(["c"])
            assert str(refused.value) == ("cannot pivot 'img' with job 'c': job 'a' is pivoting "
                                          "it now; wait until that has ended")
            assert not c.finished and c.ready and env.node.backing_path == str(env.source)
            # What does not pivot the image waits for the pivot, as before.
            nursery.start_soon(lambda: env.manager.complete(["b"], pivot=False))
            await trio.sleep(0.05)
            assert not b.finished
            let_go.set()

        assert a.finished and b.finished and not c.finished
        assert env.node.backing_path == str(tmp_path / "a.img")
        await env.write(0, b"\x5a" * 65536)
        # Once the first pivot has ended, the image can be pivoted again.
        await env.manager.complete(["c"])
        assert env.node.backing_path == str(tmp_path / "c.img")
        new = b"\x5a" * 65536 + content[65536:]
        assert_same_bytes((tmp_path / "c.img").read_bytes(), new, "the second pivot's target")
        assert_identical(tmp_path / "a.img", tmp_path / "c.img")
        assert_same_bytes((tmp_path / "b.img").read_bytes(), content, "b, ended before the write")
