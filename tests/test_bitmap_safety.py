"""Bitmap files never claim less than the truth, through a real mount and the mirrorfs CLI.

- ``--bitmap`` naming an image or any file that is not a bitmap of the same image and target is
  refused with one line and the file is left untouched; a new bitmap is 0600 whatever the umask.
- ``--sync dirty`` refuses the bitmap of another image or another target (even of the same size),
  and accepts another spelling of the same target (identities are canonical).
- A job that ends (cancel, ``complete --no-pivot``, failure, pivot) records it in its bitmap:
  ``bitmap inspect`` says so, ``--sync dirty`` is refused, and a verified resync (CLI, control
  file and QMP) compares every cluster and leaves the target identical, writes made after the
  end included.
- A write between an unmount and the resume (recorded nowhere) is noticed: the resume asks for a
  verified resync.
- A job that fails to start releases its bitmap (engine level).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
from pathlib import Path
from typing import Any, Callable

import pytest
import trio

from compare import assert_identical
from mounting import Mount
from test_mirror_engine import engine, random_content
from test_mirror_mount import (job, jobs, make_image, qemu_io, read_at, tiny_tmpfs, wait_job,
                               wait_ready)

MiB = 1 << 20


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def inspect(mount: Mount, bitmap: Path) -> tuple[int, dict[str, Any], str]:
    text = mount.cli("bitmap", "inspect", bitmap, check=False)
    js = mount.cli("bitmap", "inspect", bitmap, "--json", check=False)
    assert text.returncode == js.returncode, text.stderr + js.stderr
    return js.returncode, json.loads(js.stdout), text.stdout


def refused(mount: Mount, *args: str | os.PathLike[str]) -> str:
    """Run a mirrorfs command that must fail with one line on stderr; returns that line."""
    proc = mount.cli(*args, check=False)
    assert proc.returncode != 0, proc.stdout
    assert proc.stderr.count("\n") == 1, proc.stderr
    return proc.stderr


# ---------------------------------------------------------------------------- creation


def test_bitmap_naming_an_image_or_a_foreign_file_is_refused_and_left_untouched(mounted: Mount,
                                                                                tmp_path: Path) -> None:
    name = "a.raw"
    source = mounted.source / name
    make_image(source, 2 * MiB, 1)
    notes = tmp_path / "notes.txt"
    notes.write_text("important\n")
    os.symlink(notes, tmp_path / "link")
    other = tmp_path / "other.bitmap"  # a real bitmap, of another image's job
    (mounted.source / "b.raw").write_bytes(os.urandom(2 * MiB))
    mounted.cli("mirror", mounted.mountpoint, "b.raw", tmp_path / "tb.raw", "--create", "--bitmap", other)
    wait_ready(mounted, "b.raw")
    mounted.cli("cancel", mounted.mountpoint, "b.raw")
    victims = {source: None, notes: "is not a valid mirrorfs bitmap: refusing to overwrite it",
               tmp_path / "link": "is a symbolic link", other: "not of this job: refusing to overwrite"}
    before = {p: (os.lstat(p).st_ino, digest(p)) for p in victims}
    for i, (victim, expect) in enumerate(victims.items()):
        err = refused(mounted, "mirror", mounted.mountpoint, name, tmp_path / f"t{i}.raw", "--create",
                      "--bitmap", victim)
        if expect is not None:  # the image itself may also be refused as a path of the mount
            assert expect in err, err
        assert jobs(mounted) == []
    assert {p: (os.lstat(p).st_ino, digest(p)) for p in victims} == before
    assert os.path.islink(tmp_path / "link") and notes.read_text() == "important\n"
    # a new file: created, 0600 although the daemon runs with its own umask
    fresh = tmp_path / "fresh.bitmap"
    mounted.cli("mirror", mounted.mountpoint, name, tmp_path / "t.raw", "--create", "--bitmap", fresh)
    assert os.stat(fresh).st_mode & 0o777 == 0o600
    wait_ready(mounted, name)
    mounted.cli("cancel", mounted.mountpoint, name)


# ---------------------------------------------------------------------------- identity


def test_sync_dirty_refuses_the_bitmap_of_another_image_or_target(mounted: Mount, tmp_path: Path) -> None:
    size = 2 * MiB
    for name, seed in (("a.raw", 2), ("b.raw", 3)):  # same size: only the identity tells them apart
        make_image(mounted.source / name, size, seed)
    real = tmp_path / "real"
    real.mkdir()
    os.symlink(real, tmp_path / "alias")
    bitmap = tmp_path / "a.bitmap"
    mounted.cli("mirror", mounted.mountpoint, "a.raw", real / "ta.raw", "--create", "--bitmap", bitmap,
                "--speed", "512K", "--buf-size", "64K")
    wait_job(mounted, "a.raw", lambda j: 0 < j["offset"] < j["len"], "mid-copy")
    mounted.remount()  # an unmount mid-copy: the bitmap is the resume point
    before = digest(bitmap)
    (tmp_path / "tb.raw").write_bytes(bytes(size))
    err = refused(mounted, "mirror", mounted.mountpoint, "b.raw", tmp_path / "tb.raw", "--sync", "dirty",
                  "--bitmap", bitmap)
    assert f"was made for source '{os.path.realpath(mounted.source / 'a.raw')}'" in err, err
    (tmp_path / "other.raw").write_bytes(bytes(size))
    err = refused(mounted, "mirror", mounted.mountpoint, "a.raw", tmp_path / "other.raw", "--sync", "dirty",
                  "--bitmap", bitmap)
    assert f"was made for target '{real / 'ta.raw'}'" in err, err
    assert digest(bitmap) == before and jobs(mounted) == []
    # the same target by another path is the same target
    mounted.cli("mirror", mounted.mountpoint, "a.raw", tmp_path / "alias" / "ta.raw", "--sync", "dirty",
                "--bitmap", bitmap)
    wait_ready(mounted, "a.raw")
    mounted.cli("complete", mounted.mountpoint, "a.raw", "--no-pivot")
    assert_identical(mounted.source / "a.raw", real / "ta.raw")


def test_a_write_between_the_unmount_and_the_resume_is_not_missed(mounted: Mount, tmp_path: Path) -> None:
    """The mount serves the image again before ``--sync dirty`` runs: a write then is recorded
    nowhere. The bitmap noted the image's ctime at the unmount, so the resume sees the change and
    asks for a verified resync, which is exact."""
    name = "vm.raw"
    source = mounted.source / name
    make_image(source, 4 * MiB, 6)
    target, bitmap = tmp_path / "t.raw", tmp_path / "vm.bitmap"
    mounted.cli("mirror", mounted.mountpoint, name, target, "--create", "--bitmap", bitmap)
    wait_ready(mounted, name)
    mounted.remount()  # an unmount with the job running: a resume point
    code, info, _ = inspect(mounted, bitmap)
    assert code == 0 and info["clean-shutdown"] and not info.get("ended"), info
    qemu_io(mounted.mountpoint / name, "write -P 0x6b 1000000 5000")  # before the resume
    err = refused(mounted, "mirror", mounted.mountpoint, name, target, "--sync", "dirty", "--bitmap", bitmap)
    assert "changed after its job was stopped by an unmount" in err and "--verify-resync" in err, err
    mounted.cli("mirror", mounted.mountpoint, name, target, "--sync", "dirty", "--bitmap", bitmap,
                "--verify-resync")
    wait_ready(mounted, name)
    mounted.cli("complete", mounted.mountpoint, name, "--no-pivot")
    assert_identical(source, target)


# ---------------------------------------------------------------------------- ended


def _resync(mount: Mount, how: str, name: str, target: Path, bitmap: Path) -> None:
    """Start a verified resync from ``bitmap`` through the CLI, the control file or QMP."""
    if how == "cli":
        mount.cli("mirror", mount.mountpoint, name, target, "--sync", "dirty", "--bitmap", bitmap,
                  "--verify-resync")
    elif how == "control":
        fd = os.open(mount.control / "control", os.O_WRONLY)
        try:
            os.write(fd, f"mirror {name} {target} sync=dirty bitmap={bitmap} verify-resync=true\n".encode())
        finally:
            os.close(fd)
    else:
        command = {"execute": "drive-mirror", "arguments": {
            "device": name, "target": str(target), "sync": "dirty", "bitmap": str(bitmap),
            "verify-resync": True}}
        mount.cli("qmp", mount.mountpoint, json.dumps(command))


ENDINGS = {"cancel": "cli", "complete-no-pivot": "control", "failed": "qmp"}


@pytest.mark.parametrize("ending", sorted(ENDINGS))
def test_a_bitmap_whose_job_ended_is_not_trusted_and_a_verified_resync_is_exact(
        mount_factory: Callable[..., Mount], tmp_path: Path, ending: str) -> None:
    mount = mount_factory()
    mount.allow_log(r"target error")
    size = 8 * MiB
    name = "vm.raw"
    source = mount.source / name
    make_image(source, size, 4, holes=False)
    bitmap = tmp_path / "vm.bitmap"
    image = mount.mountpoint / name
    problems: list[str] = []
    with contextlib.ExitStack() as stack:
        if ending == "failed":  # the target's file system fills up: the job fails (report)
            small = stack.enter_context(tiny_tmpfs(tmp_path / "tiny", "2M"))
        else:
            small = tmp_path
        stack.callback(lambda: problems.extend(mount.close()))
        target = small / "target.raw"
        mount.cli("mirror", mount.mountpoint, name, target, "--create", "--bitmap", bitmap,
                  "--buf-size", "256K")
        if ending == "failed":
            entry = wait_job(mount, name, lambda j: j["status"] == "concluded", "failed")
            assert "space" in entry["error"].lower(), entry
        else:
            wait_ready(mount, name)
            if ending == "cancel":
                mount.cli("cancel", mount.mountpoint, name)
            else:
                mount.cli("complete", mount.mountpoint, name, "--no-pivot")
            assert job(mount, name) is None
        # the job no longer records writes: these are in no bitmap
        qemu_io(image, "write -P 0x5a 3000000 70000")
        code, info, text = inspect(mount, bitmap)
        assert code == 1 and info["ended"] is True and info["ended-at"], info
        assert "ended:          yes, at " in text and "ended: its job ended at" in text, text
        if ending != "failed":
            assert info["dirty-bytes"] == 0  # identical when it ended, yet not "clean"
        err = refused(mount, "mirror", mount.mountpoint, name, target, "--sync", "dirty", "--bitmap", bitmap)
        assert "stopped recording when its job ended at" in err and "--verify-resync" in err, err
        assert [j["status"] for j in jobs(mount)] == (["concluded"] if ending == "failed" else [])
        if ending == "failed":
            subprocess.run(["mount", "-o", "remount,size=16M", str(small)], check=True, timeout=30)
        _resync(mount, ENDINGS[ending], name, target, bitmap)
        entry = wait_ready(mount, name)
        assert read_at(target, 3000000, 70000) == b"\x5a" * 70000
        if ending != "failed":  # everything but the clusters of that write compared equal
            assert entry["__org.mirrorfs_copied-bytes"] <= 3 * 64 * 1024, entry
            assert entry["__org.mirrorfs_verified-equal-bytes"] >= size - 3 * 64 * 1024, entry
        # the resync records writes again, and its bitmap is a resume point again
        code, info, _ = inspect(mount, bitmap)
        assert not info["ended"] and info["in-use"], info
        mount.cli("complete", mount.mountpoint, name, "--no-pivot")
        assert_identical(source, target)
    assert not problems, problems


def test_a_pivoted_bitmap_is_refused_even_for_a_verified_resync(mount_factory: Callable[..., Mount],
                                                                 tmp_path: Path) -> None:
    # After a pivot the target is the newer disk: resuming the old job on the old storage (a
    # later mount of the same source directory) would copy the stale source over it.
    name = "pv.raw"
    first = mount_factory()
    make_image(first.source / name, 2 * MiB, 5)
    target = tmp_path / "pv-target.raw"
    bitmap = tmp_path / "pv.bitmap"
    first.cli("mirror", first.mountpoint, name, target, "--create", "--bitmap", bitmap)
    wait_ready(first, name)
    first.cli("complete", first.mountpoint, name)
    assert not first.close()
    code, info, _ = inspect(first, bitmap)
    assert code == 0 and info["pivoted"] and info["ended"], info
    before, target_before = digest(bitmap), digest(target)
    again = mount_factory(source=first.source, mountpoint=first.mountpoint)
    err = refused(again, "mirror", again.mountpoint, name, target, "--sync", "dirty", "--bitmap",
                  bitmap, "--verify-resync")
    assert "ended by pivot at" in err, err
    assert digest(bitmap) == before and digest(target) == target_before
    assert jobs(again) == []


# ---------------------------------------------------------------------------- start failure


@pytest.mark.parametrize("where", ["job-start", "top-extents"])
async def test_a_job_that_fails_to_start_releases_its_bitmap(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             where: str) -> None:
    from mirrorfs.mirror import manager, job as jobmod

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise OSError(5, "Input/output error")

    if where == "job-start":
        monkeypatch.setattr(jobmod.MirrorJob, "run", broken)
    else:
        monkeypatch.setattr(manager, "allocated_extents", broken)
    bitmap = tmp_path / "job.bitmap"
    async with engine(tmp_path, random_content(MiB)) as env:
        with pytest.raises(Exception, match="Input/output error"):
            await env.mirror(tmp_path / "t.img", bitmap=str(bitmap),
                             sync="top" if where == "top-extents" else "full")
        # the file this start created is gone again (the extents are found before it is made)
        assert not bitmap.exists()
        assert env.manager.query() == []
        await trio.lowlevel.checkpoint()
