"""Safe resume (issue 13, item 4): a ``--sync dirty`` job compares clean clusters first.

Through real mounts: a job is stopped by an unmount, a clean cluster of its target is changed
behind mirrorfs's back, and the resume is refused with one line naming that cluster (no job, the
files and the bitmap's verdict unchanged), or with ``--on-mismatch full`` copies everything and
ends identical. A cluster the last clear commit cleared is compared on every resume (it is in the
bitmap file's ring), checked against a real NBD server on a large image where 64 random samples
would mostly miss it. A version 2 bitmap (no ring) still resumes. Below: the ring and the sample
choice on their own, and the check of a target that was away at the start (engine-level: this
branch cannot start a job offline), at its first connect.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import struct
import zlib
from pathlib import Path
from typing import Any

import pytest

from compare import assert_identical
from mirrorfs.bitmap import PersistentBitmap
from mirrorfs.bitmap import format as fmt
from mirrorfs.bitmap.memory import DirtyBitmap
from mirrorfs.bitmap.persistent import read_bitmap_file
from mirrorfs.mirror import resume
from nbdservers import qemu_nbd
from test_replication_support import make_blank, make_image, qmp, wait_ready

KiB = 1 << 10
MiB = 1 << 20
G = 64 * KiB


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def corrupt(path: Path, offset: int, length: int = 512) -> None:
    """Change bytes of a target file behind mirrorfs's back."""
    with open(path, "r+b") as f:
        f.seek(offset)
        old = f.read(length)
        f.seek(offset)
        f.write(bytes(b ^ 0x5A for b in old))


def inspect(mount: Any, bitmap: Path) -> dict[str, Any]:
    return json.loads(mount.cli("bitmap", "inspect", bitmap, "--json", check=False).stdout)


def jobs(mount: Any) -> list[dict[str, Any]]:
    return json.loads(mount.cli("status", mount.mountpoint, "--json").stdout)


def mirror_write_and_stop(mount: Any, target: str, bitmap: Path, *, cluster: int) -> None:
    """Mirror vm.raw to ``target`` until ready, write ``cluster`` through the mount and fsync it
    (its duplicate's clear is committed: the newest entry of the ring), then unmount."""
    mount.cli("mirror", mount.mountpoint, "vm.raw", target, "--bitmap", bitmap)
    with qmp(mount) as client:
        wait_ready(client, "vm.raw")
        with open(mount.mountpoint / "vm.raw", "r+b") as f:
            f.seek(cluster * G)
            f.write(b"\xa7" * G)
            f.flush()
            os.fsync(f.fileno())
        wait_ready(client, "vm.raw")
    mount.unmount()


def stopped_local_job(mount_factory: Any, tmp_path: Path, *, cluster: int
                      ) -> tuple[Any, Path, Path, Path]:
    """A 4 MiB image (64 clusters at 64K: the random samples are every clean cluster) mirrored
    to a local file with a bitmap, stopped by an unmount: (mount, source, target, bitmap)."""
    mount = mount_factory()
    source = mount.source / "vm.raw"
    make_image(source, 4 * MiB)
    target, bitmap = tmp_path / "target.raw", tmp_path / "vm.bitmap"
    make_blank(target, 4 * MiB)
    mirror_write_and_stop(mount, str(target), bitmap, cluster=cluster)
    return mount, source, target, bitmap


def resume_refused(mount: Any, target: str, bitmap: Path, *extra: str) -> str:
    """``mirror --sync dirty`` that must be refused; returns its one line."""
    r = mount.cli("mirror", mount.mountpoint, "vm.raw", target, "--sync", "dirty", "--bitmap",
                  bitmap, *extra, check=False)
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    assert r.stderr.count("\n") == 1, r.stderr
    assert jobs(mount) == []
    return r.stderr


def test_a_changed_clean_cluster_refuses_the_resume_and_on_mismatch_full_resyncs(
        mount_factory: Any, tmp_path: Path) -> None:
    mount, source, target, bitmap = stopped_local_job(mount_factory, tmp_path, cluster=5)
    assert inspect(mount, bitmap)["dirty-clusters"] == 0
    corrupt(target, 37 * G + 1000)
    before = (digest(source), digest(target), {k: v for k, v in inspect(mount, bitmap).items()
                                               if k != "generation"})
    mount.start()
    line = resume_refused(mount, str(target), bitmap)
    assert (f"cannot resume from bitmap {bitmap}: cluster 37 (offset {37 * G}, 65536 bytes) of "
            f"image 'vm.raw' differs on target {target}, but the bitmap calls it clean") in line
    assert "resume with --on-mismatch full" in line and "--verify-resync" in line
    after = (digest(source), digest(target), {k: v for k, v in inspect(mount, bitmap).items()
                                              if k != "generation"})
    assert after == before  # nothing changed: no job, the files, the bitmap's verdict
    # and a second try is refused the same way (the bitmap was left as found)
    assert "cluster 37 " in resume_refused(mount, str(target), bitmap)

    mount.cli("mirror", mount.mountpoint, "vm.raw", target, "--sync", "dirty", "--bitmap", bitmap,
              "--on-mismatch", "full")
    with qmp(mount) as client:
        job = wait_ready(client, "vm.raw")
    assert job["__org.mirrorfs_copied-bytes"] + job["__org.mirrorfs_zeroed-bytes"] == 4 * MiB, job
    assert 1 <= job["__org.mirrorfs_resume-samples"] <= 64
    mount.cli("complete", mount.mountpoint, "vm.raw", "--no-pivot")
    assert_identical(source, target)


def test_on_mismatch_is_checked_like_every_argument(mounted: Any, tmp_path: Path) -> None:
    make_image(mounted.source / "vm.raw", 1 * MiB)
    for args, expect in ((["--on-mismatch", "full"], "it goes with sync 'dirty', not 'full'"),
                         (["--sync", "dirty", "--bitmap", tmp_path / "b", "--on-mismatch", "maybe"],
                          "'on-mismatch' must be one of refuse, full")):
        r = mounted.cli("mirror", mounted.mountpoint, "vm.raw", tmp_path / "t", "--create", *args,
                        check=False)
        assert r.returncode == 2 and expect in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert jobs(mounted) == [] and not (tmp_path / "t").exists()


def test_the_cluster_cleared_last_is_compared_every_time_on_an_nbd_target(
        mount_factory: Any, tmp_path: Path, monkeypatch: Any) -> None:
    """64 MiB: 1024 clusters, of which 64 random samples would hit one in 16 resumes; the one the
    last commit cleared is compared first, whatever the seed."""
    size = 64 * MiB
    mount = mount_factory()
    source = mount.source / "vm.raw"
    make_image(source, size)
    served, bitmap = tmp_path / "served.raw", tmp_path / "vm.bitmap"
    make_blank(served, size)
    with qemu_nbd(served) as server:
        mirror_write_and_stop(mount, server.uri, bitmap, cluster=700)
        assert inspect(mount, bitmap)["recently-cleared"][-1] == 700
        server.stop()
        corrupt(served, 700 * G + 4096)
        server.start()
        for seed in ("1", "2", "3"):  # the daemon's seed of the random samples
            monkeypatch.setenv("MIRRORFS_RESUME_SEED", seed)
            mount.start()
            line = resume_refused(mount, server.uri, bitmap)
            assert "cluster 700 (offset 45875200, 65536 bytes)" in line, line
            assert "(sampled cluster 1 of " in line, line  # from the ring, not by chance
            mount.unmount()
        assert inspect(mount, bitmap)["recently-cleared"][-1] == 700
        server.stop()
        corrupt(served, 700 * G + 4096)  # put it back: now the target is right
        server.start()
        mount.start()
        mount.cli("mirror", mount.mountpoint, "vm.raw", server.uri, "--sync", "dirty", "--bitmap",
                  bitmap)
        with qmp(mount) as client:
            job = wait_ready(client, "vm.raw")
        assert job["__org.mirrorfs_resume-samples"] > 64 and job["__org.mirrorfs_copied-bytes"] == 0
        mount.cli("complete", mount.mountpoint, "vm.raw", "--no-pivot")
        mount.unmount()
    assert_identical(source, served)


def to_version2(path: Path) -> None:
    """Rewrite a bitmap file as mirrorfs wrote version 2: no ring (zero padding)."""
    data = bytearray(path.read_bytes())
    struct.pack_into("<I", data, 8, 2)
    data[fmt.RECENT_OFFSET:fmt.RECENT_END] = bytes(fmt.RECENT_END - fmt.RECENT_OFFSET)
    struct.pack_into("<I", data, 64, 0)
    struct.pack_into("<I", data, 64, zlib.crc32(bytes(data[:fmt.HEADER_SIZE])))
    path.write_bytes(data)


def test_a_version2_bitmap_resumes_with_random_samples_only(mount_factory: Any,
                                                              tmp_path: Path) -> None:
    mount, source, target, bitmap = stopped_local_job(mount_factory, tmp_path, cluster=9)
    to_version2(bitmap)
    info = inspect(mount, bitmap)
    assert info["version"] == 2 and info["recently-cleared"] == [] and info["exit-code"] == 0
    mount.start()
    mount.cli("mirror", mount.mountpoint, "vm.raw", target, "--sync", "dirty", "--bitmap", bitmap)
    with qmp(mount) as client:
        job = wait_ready(client, "vm.raw")
    assert job["__org.mirrorfs_resume-samples"] == 64  # every clean cluster, at random
    mount.cli("complete", mount.mountpoint, "vm.raw", "--no-pivot")
    assert_identical(source, target)
    assert inspect(mount, bitmap)["version"] == 3


# ---------------------------------------------------------------------------- without a mount

def test_each_clear_commit_records_what_it_cleared_in_the_ring(tmp_path: Path) -> None:
    path = str(tmp_path / "b.bitmap")
    size = 1024 * G
    bm = PersistentBitmap.create(path, size, G, source_id="/s", target_id="/t", fill=True)
    bm.clear(0, size)
    bm.finish_clear_commit(bm.begin_clear_commit())  # 1024 cleared: 64 spread over them
    spread = bm.recent_cleared()
    assert len(spread) == 64 and spread[0] == 0 and spread[-1] == 1023
    for cluster in (5, 900, 7):
        bm.mark(cluster * G, 1)
        bm.clear(cluster * G, G)
        bm.finish_clear_commit(bm.begin_clear_commit())
    assert bm.recent_cleared()[-3:] == (5, 900, 7)
    bm.resize(size + G)
    assert bm.recent_cleared()[-3:] == (5, 900, 7)
    bm.close()
    header, _ = read_bitmap_file(path)
    assert header.recent_cleared[-3:] == (5, 900, 7) and len(header.recent_cleared) == 64
    again = PersistentBitmap.open(path, size=size + G)
    assert again.recent_cleared()[-3:] == (5, 900, 7)
    again.close()


def test_the_samples_are_the_recent_clean_clusters_then_random_clean_ones() -> None:
    bm = DirtyBitmap(100_000 * G, G)
    bm.mark(0, 50_000 * G)  # half dirty
    recent = [60_000, 10, 70_000, 60_000]  # 10 is dirty now: not evidence
    picks = resume.pick_samples(bm, recent, 64, random.Random(7))
    assert picks[:2] == [60_000, 70_000] and len(picks) == 66
    assert all(c >= 50_000 for c in picks) and len(set(picks)) == 66
    assert picks == resume.pick_samples(bm, recent, 64, random.Random(7))  # seedable
    assert picks != resume.pick_samples(bm, recent, 64, random.Random(8))
    few = DirtyBitmap(100 * G, G)
    few.mark(0, 90 * G)
    assert resume.pick_samples(few, [], 64, random.Random(1)) == list(range(90, 100))


@pytest.mark.parametrize("seed", ["12", None])
def test_the_seed_comes_from_the_environment(monkeypatch: Any, seed: str | None) -> None:
    if seed is None:
        monkeypatch.delenv("MIRRORFS_RESUME_SEED", raising=False)
    else:
        monkeypatch.setenv("MIRRORFS_RESUME_SEED", seed)
    a, b = resume.seeded_rng().random(), resume.seeded_rng().random()
    assert (a == b) == (seed is not None)


# ---------------------------------------------------------------------------- at the first connect

@pytest.mark.parametrize("policy", ["refuse", "full"])
async def test_a_check_still_pending_runs_at_the_first_connect(tmp_path: Path, policy: str) -> None:
    """The engine driven directly: a resumed job whose target was away at the start (its check
    still pending) checks when the target comes, before the copy or a duplicate writes it; a
    refused mismatch fails the job with the message, ``full`` copies everything."""
    from mirrorfs.errors import TargetRetryableError
    from test_mirror_engine import engine, random_content

    target, bitmap = tmp_path / "target.img", tmp_path / "img.bitmap"
    async with engine(tmp_path, random_content(4 * MiB)) as env:
        await env.mirror(target, bitmap=str(bitmap))
        await env.wait_event("BLOCK_JOB_READY")
        await env.manager.shutdown()
        env.events.clear()
        job = await env.mirror(target, sync="dirty", bitmap=str(bitmap), on_mismatch=policy)
        assert job.stats["resume-samples"] > 0 and not job.resume_check_pending
        # As a job started while its NBD server was away: the check waits for the target.
        job.resume_check_pending = True
        corrupt(target, 21 * G)
        job._target_lost(TargetRetryableError("the server went away"))
        if policy == "refuse":
            done = await env.wait_event("BLOCK_JOB_COMPLETED")
            assert "cluster 21 (offset 1376256, 65536 bytes)" in done["error"], done
            assert "MIRROR_TARGET_RESTORED" not in env.event_names()
        else:
            await env.wait_event("MIRROR_TARGET_RESTORED")
            await env.wait_event("BLOCK_JOB_READY")
            assert job.stats["copied-bytes"] + job.stats["zeroed-bytes"] >= 4 * MiB
            await env.manager.complete([job.id], pivot=False)
            assert_identical(env.source, target)
