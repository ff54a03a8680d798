"""Many jobs on one image: ready ones give back their copy buffers, and there is a cap.

A ready job gives back its copy buffers: many standing jobs cost little memory. The background copy reads into reused buffers of buf-size in all (see ``mirror/copy.py``); once a
pass ends with nothing dirty they are unmapped. Eight ready jobs of the default buf-size (16 MiB)
would otherwise keep 128 MiB of the daemon resident. Measured in this process (the engine is
driven directly), as the growth of its resident set.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from compare import assert_identical
from mirrorfs.errors import StateError
from mirrorfs.mirror import manager as manager_module
from mirrorfs.mirror.manager import MAX_JOBS_PER_IMAGE
from mirrorfs.state.directory import StateDir
from test_mirror_engine import engine, random_content

MiB = 1024 * 1024
JOBS = 8


def resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


async def test_ready_jobs_keep_no_copy_buffers(tmp_path: Path) -> None:
    content = random_content(16 * MiB, holes=False)
    async with engine(tmp_path, content) as env:
        before = resident_bytes()
        jobs = [await env.mirror(tmp_path / f"t{i}.img", job_id=f"j{i}") for i in range(JOBS)]
        with trio.fail_after(60):
            while not all(job.ready for job in jobs):
                await trio.sleep(0.01)
            # the pass that finds nothing left runs once more after ready
            await trio.sleep(0.2)
        grown = resident_bytes() - before
        assert grown < 4 * 16 * MiB, f"{JOBS} ready jobs keep {grown / MiB:.0f} MiB resident"
        for i in range(JOBS):
            assert_identical(env.source, tmp_path / f"t{i}.img")


async def test_an_image_has_at_most_max_jobs_and_one_more_changes_nothing(tmp_path: Path) -> None:
    async with engine(tmp_path, random_content(1 * MiB)) as env:
        jobs = [await env.mirror(tmp_path / f"t{i}.img", job_id=f"j{i}")
                for i in range(MAX_JOBS_PER_IMAGE)]
        with pytest.raises(StateError) as refused:
            await env.mirror(tmp_path / "one-more.img", job_id="one-more")
        assert str(refused.value) == (f"image 'img' has {MAX_JOBS_PER_IMAGE} mirror jobs, the most "
                                      f"one image may have; end one of them first")
        assert not (tmp_path / "one-more.img").exists()
        assert sorted(env.manager.jobs) == sorted(job.id for job in jobs)
        # Once one has ended, there is room again.
        await env.manager.cancel(["j0"], force=True)
        await env.mirror(tmp_path / "one-more.img", job_id="one-more")
        assert "one-more" in env.manager.jobs and "j0" not in env.manager.jobs


async def test_a_remount_reattaches_every_persistent_job_even_past_the_cap(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Jobs saved under a higher cap (an older version) all come back: a mount is never refused
    for the cap. A new job is still refused while they run."""
    content = random_content(1 * MiB)
    state = StateDir.open(tmp_path / "state")
    try:
        async with engine(tmp_path, content, state=state) as env:
            for i in range(3):
                await env.mirror(tmp_path / f"t{i}.img", job_id=f"j{i}", persistent=True)
        monkeypatch.setattr(manager_module, "MAX_JOBS_PER_IMAGE", 2)
        async with engine(tmp_path, state=state, reuse=True) as env:
            records, bad = state.load_all()
            assert bad == [] and len(records) == 3
            for record in records:
                await env.manager.reattach(record)
            assert sorted(env.manager.jobs) == ["j0", "j1", "j2"]
            with pytest.raises(StateError, match="has 3 mirror jobs, the most one image may have"):
                await env.mirror(tmp_path / "one-more.img", job_id="one-more")
            assert not (tmp_path / "one-more.img").exists()
    finally:
        state.close()
