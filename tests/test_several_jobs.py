"""Several jobs on one image at once, through a real mount and the real CLI.

- Two jobs of one image, each to its own local target, one write-blocking and one background:
  every write through the mount reaches both targets; a pivot of one moves the image to its
  target and the other job goes on, ready, with the new file as its source and without a
  resync; at the end the old storage holds the image at the pivot, and the new storage, the
  other target and the mount's view are identical.
- Refusals: a second job with the image's default job id, a second job to a target in use, a
  command naming an image with two jobs, two pivots of one image in one transaction, a pivot to
  NBD under another job. Each refused in one line, with nothing changed.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from mounting import Mount, is_mounted, random_image, wait_for
from nbdservers import qemu_nbd

MiB = 1 << 20


def jobs(mount: Mount) -> dict[str, dict[str, Any]]:
    return {j["device"]: j for j in json.loads((mount.control / "status.json").read_text())}


def wait_ready(mount: Mount, *devices: str, timeout: float = 60.0) -> None:
    wait_for(lambda: all(jobs(mount).get(d, {}).get("ready", False) for d in devices), timeout,
             f"{', '.join(devices)} ready", 0.05)


def refused(mount: Mount, code: int, message: str, *args: Any) -> None:
    """The CLI exits ``code`` with one line on stderr holding ``message``."""
    r = mount.cli(*args, check=False)
    assert r.returncode == code, (args, r.returncode, r.stderr)
    assert r.stderr.count("\n") == 1 and message in r.stderr, (args, message, r.stderr)


def write_through(path: Path, offset: int, data: bytes, *, direct: bool = False) -> None:
    fd = os.open(path, os.O_WRONLY | (os.O_DIRECT if direct else 0))
    try:
        if direct:
            import mmap
            buf = mmap.mmap(-1, len(data))
            buf[:] = data
            assert os.pwrite(fd, buf, offset) == len(data)
        else:
            assert os.pwrite(fd, data, offset) == len(data)
        os.fsync(fd)
    finally:
        os.close(fd)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("direct", [False, True], ids=["buffered", "direct"])
def test_two_targets_get_every_write_and_one_pivot_keeps_the_other_job(
        mounted: Mount, tmp_path: Path, direct: bool) -> None:
    m = mounted.mountpoint
    random_image(mounted, "disk.img", 8 * MiB)
    image = m / "disk.img"
    new_storage, replica = tmp_path / "new.img", tmp_path / "replica.img"
    mounted.cli("mirror", m, "disk.img", replica, "--create", "--job-id", "replica",
                "--copy-mode", "write-blocking")
    mounted.cli("mirror", m, "disk.img", new_storage, "--create", "--job-id", "move",
                "--copy-mode", "background")
    listed = jobs(mounted)
    assert set(listed) == {"replica", "move"}, listed
    assert {j["__org.mirrorfs_image"] for j in listed.values()} == {"disk.img"}
    for n in range(8):  # while both copy
        write_through(image, n * MiB + 4096 * n, os.urandom(64 * 1024), direct=direct)
    wait_ready(mounted, "replica", "move")
    for n in range(8):  # both ready: duplicated to both
        write_through(image, n * MiB + 8192, os.urandom(12288), direct=direct)
    wait_ready(mounted, "replica", "move")
    assert digest(new_storage) == digest(replica) == digest(image)

    before = jobs(mounted)["replica"]
    mounted.cli("complete", m, "move")  # the migration pivots; the replica goes on
    at_pivot = digest(image)
    after_pivot = os.urandom(3 * 65536)
    write_through(image, 5 * MiB, after_pivot, direct=direct)
    write_through(image, 123, b"unaligned", direct=False)
    wait_ready(mounted, "replica")
    entry = jobs(mounted)["replica"]
    assert set(jobs(mounted)) == {"replica"}
    assert entry["ready"] and entry["status"] == "ready", entry
    # no resync: the replica copied nothing after the pivot, it got the writes as duplicates
    assert entry["__org.mirrorfs_copied-bytes"] == before["__org.mirrorfs_copied-bytes"], entry
    assert (entry["__org.mirrorfs_duplicated-bytes"] - before["__org.mirrorfs_duplicated-bytes"]
            >= len(after_pivot)), entry
    assert digest(mounted.source / "disk.img") == at_pivot  # the old storage stays as at the pivot
    mounted.cli("complete", m, "disk.img", "--no-pivot")  # one job left: named by its image
    assert jobs(mounted) == {}
    assert digest(new_storage) == digest(replica) == digest(image) != at_pivot


def test_several_jobs_are_refused_where_they_would_clash(mounted: Mount, tmp_path: Path) -> None:
    m = mounted.mountpoint
    random_image(mounted, "disk.img", 2 * MiB)
    first, second = tmp_path / "first.img", tmp_path / "second.img"
    mounted.cli("mirror", m, "disk.img", first, "--create")
    # the default job id is the image's name, taken by the first job
    refused(mounted, 1, "job id 'disk.img' is in use (the default, the image's name: a second job "
            "of an image needs its own --job-id)", "mirror", m, "disk.img", second, "--create")
    assert not second.exists() and set(jobs(mounted)) == {"disk.img"}
    mounted.cli("cancel", m, "disk.img")
    mounted.cli("mirror", m, "disk.img", first, "--job-id", "one")
    # the same target twice, or another job's target
    refused(mounted, 2, "is already the target of job 'one'", "mirror", m, "disk.img", first,
            "--job-id", "again")
    mounted.cli("mirror", m, "disk.img", second, "--create", "--job-id", "two")
    wait_ready(mounted, "one", "two")
    # an image with two jobs names neither
    for command in (["complete", m, "disk.img"], ["cancel", m, "disk.img"],
                    ["pause", m, "disk.img"], ["set-speed", m, "disk.img", "1M"]):
        refused(mounted, 2, "image 'disk.img' has 2 mirror jobs (one, two): name one by its "
                "job id", *command)
    # the image cannot be truncated while either runs; the log names both
    proc = subprocess.run(["truncate", "-s", "1M", str(m / "disk.img")], capture_output=True,
                          text=True, timeout=30)
    assert proc.returncode != 0 and "busy" in proc.stderr.lower(), proc.stderr
    assert "mirror jobs 'one', 'two' are running on it" in mounted.read_log()
    assert (m / "disk.img").stat().st_size == 2 * MiB
    listed = jobs(mounted)
    assert set(listed) == {"one", "two"} and all(j["ready"] for j in listed.values()), listed
    assert all(j["speed"] == 0 and not j["paused"] for j in listed.values()), listed
    # one image pivoted twice in one transaction
    refused(mounted, 2, "jobs 'one' and 'two' would both pivot image 'disk.img'",
            "complete", m, "one", "two")
    assert set(jobs(mounted)) == {"one", "two"}
    mounted.cli("complete", m, "one", "two", "--no-pivot")  # one transaction, both jobs
    assert jobs(mounted) == {}
    assert digest(first) == digest(second) == digest(m / "disk.img")


def test_a_pivot_to_nbd_under_another_job_is_refused(mounted: Mount, tmp_path: Path) -> None:
    m = mounted.mountpoint
    random_image(mounted, "disk.img", 2 * MiB)
    export = tmp_path / "export.img"
    export.write_bytes(bytes(2 * MiB))
    local = tmp_path / "local.img"
    with qemu_nbd(export) as server:
        mounted.cli("mirror", m, "disk.img", server.uri, "--job-id", "remote")
        mounted.cli("mirror", m, "disk.img", local, "--create", "--job-id", "local")
        wait_ready(mounted, "remote", "local")
        refused(mounted, 1, "cannot pivot 'disk.img' to the NBD target of job 'remote' while "
                "job(s) 'local' also run on it", "complete", m, "remote")
        assert set(jobs(mounted)) == {"remote", "local"}
        mounted.cli("cancel", m, "local")  # once the other job ended, the pivot goes
        mounted.cli("complete", m, "remote")
        write_through(m / "disk.img", 0, b"after" * 100)
        assert export.read_bytes()[:500] == b"after" * 100
        refused(mounted, 1, "serves it from its NBD target for the rest of this mount",
                "mirror", m, "disk.img", tmp_path / "third.img", "--create", "--job-id", "third")


def test_persistent_jobs_of_one_image_reattach_and_follow_a_pivot(mount_factory: Any,
                                                                  tmp_path: Path) -> None:
    """Two persistent jobs of one image are re-attached by a remount. One pivots the image to a
    new directory; the other's bitmap records the new file, so a remount over the old directory
    refuses to resume it from the file the image left, and a mount of the new directory resumes
    it from where it was, without a resync."""
    state = tmp_path / "state"
    old_dir, new_dir = tmp_path / "old", tmp_path / "new"
    old_dir.mkdir()
    new_dir.mkdir()
    mount = mount_factory(source=old_dir, extra_args=["--state-dir", str(state)])
    m = mount.mountpoint
    (old_dir / "disk.raw").write_bytes(os.urandom(4 * MiB))
    replica, moved = tmp_path / "replica.raw", new_dir / "disk.raw"
    mount.cli("mirror", m, "disk.raw", replica, "--create", "--persistent", "--job-id", "replica",
              "--copy-mode", "write-blocking")
    mount.cli("mirror", m, "disk.raw", moved, "--create", "--persistent", "--job-id", "move")
    mount.unmount()
    mount.start()
    assert set(jobs(mount)) == {"replica", "move"}  # both re-attached
    write_through(m / "disk.raw", 1 * MiB, os.urandom(65536))
    wait_ready(mount, "replica", "move")
    copied = jobs(mount)["replica"]["__org.mirrorfs_copied-bytes"]
    mount.cli("complete", m, "move")
    write_through(m / "disk.raw", 2 * MiB, os.urandom(65536))
    wait_ready(mount, "replica")
    assert jobs(mount)["replica"]["__org.mirrorfs_copied-bytes"] == copied  # no resync
    inspect = json.loads(mount.cli("bitmap", "inspect", state / "job-replica.bitmap", "--json",
                                   check=False).stdout)
    assert inspect["source"] == str(moved.resolve()), inspect
    mount.unmount()

    # the old directory: the image there is not the one the replica follows any more
    mount.allow_log(r"ERROR: persistent job replica \(image disk.raw\): bitmap .* was made for source")
    r = mount.cli("mount", old_dir, m, "--state-dir", state, check=False)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, (r.returncode, r.stderr)
    assert "job-replica" in r.stderr and str(moved.resolve()) in r.stderr, r.stderr
    assert not is_mounted(m)
    # the new directory holds the image under the same name: the replica resumes there
    mount.source = new_dir
    mount.start()
    entry = jobs(mount)["replica"]
    assert entry["__org.mirrorfs_image"] == "disk.raw" and set(jobs(mount)) == {"replica"}, entry
    # its journal followed the image too: the replica stayed consistent, nothing to resync
    assert entry["__org.mirrorfs_replica-consistent"] is True, entry
    warned = [line for line in mount.read_log().splitlines() if "WARNING" in line and "journal" in line]
    assert warned == [], warned
    write_through(m / "disk.raw", 3 * MiB, os.urandom(65536))
    wait_ready(mount, "replica")
    # no resync: the re-attached job starts its counters anew, and only the write is missing
    assert jobs(mount)["replica"]["__org.mirrorfs_copied-bytes"] == 0, jobs(mount)["replica"]
    mount.cli("complete", m, "replica", "--no-pivot")
    assert digest(replica) == digest(moved) == digest(m / "disk.raw")
