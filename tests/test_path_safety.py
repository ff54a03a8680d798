"""Paths a mirror command names never lead the daemon into its own mount, onto an image, onto
another job's files, and images with a second name are refused (``mirror/paths.py``).

- pure decisions of ``paths.check_path`` / ``paths.check_image_links``;
- on a real mount: a target that is the source (by name, through a symlink, through ``..``), an
  existing image of the source directory, another job's target or bitmap, a bitmap on the job's
  own target: refused with one line, nothing created, the source unchanged;
- a target, bitmap, ``nbd+unix`` socket or TLS directory that resolves into the mount (through a
  symlink or ``..``) is refused and the mount keeps serving: these used to deadlock the daemon,
  so each command runs under a deadline and a hung daemon is killed by the test;
- an image that is a symlink, lies under a symlinked directory or has two hard links is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import pytest

from mirrorfs.errors import UsageError
from mirrorfs.mirror import paths
from mounting import Mount, is_mounted, process_alive, wait_for

MiB = 1 << 20
#: A command into a deadlocked daemon never returns; this long is plenty for one that works.
DEADLINE = 20.0


# ---------------------------------------------------------------------------- pure decisions

def _places(**claimed: str) -> paths.Places:
    source = paths.Resolved("/src/a.raw", "/src/a.raw", dev=1, ino=10, regular=True)
    return paths.Places("/mnt", 99, "/src", source, "a.raw", dict(claimed))


@pytest.mark.parametrize("resolved, message", [
    (paths.Resolved("/x/link", "/mnt/b.raw", dev=99, ino=5, regular=True), "inside the mount"),
    (paths.Resolved("/bind/b.raw", "/bind/b.raw", dev=99, ino=5, regular=True), "inside the mount"),
    (paths.Resolved("/mnt/new", "/mnt/new", dev=None), "inside the mount"),
    (paths.Resolved("/src/a.raw", "/src/a.raw", dev=1, ino=10, regular=True), "is the image 'a.raw' itself"),
    (paths.Resolved("/o/hard", "/o/hard", dev=1, ino=10, regular=True), "is the image 'a.raw' itself"),
    (paths.Resolved("/src/b.raw", "/src/b.raw", dev=1, ino=11, regular=True), "is an image of the mount"),
    (paths.Resolved("/o/t.raw", "/o/t.raw", dev=2, ino=7, regular=True), "is already the target of job 'j'"),
    (paths.Resolved("/o/h", "/o/h", dev=1, ino=12, regular=True, nlink=2), "has 2 hard links"),
])
def test_check_path_refuses(resolved: paths.Resolved, message: str) -> None:
    places = _places(**{"/o/t.raw": "the target of job 'j'"})
    with pytest.raises(UsageError, match=message) as info:
        paths.check_path("target", resolved, places, written=True)
    assert "\n" not in str(info.value)


def test_check_path_accepts() -> None:
    places = _places()
    paths.check_path("target", paths.Resolved("/o/t", "/o/t", dev=2), places, written=True)
    # a new file in the source directory is not an image yet
    paths.check_path("target", paths.Resolved("/src/new", "/src/new", dev=1), places, written=True)
    # a socket only must not lead into the mount
    paths.check_path("NBD socket", paths.Resolved("/src/a.raw", "/src/a.raw", dev=1, ino=10),
                     places, written=False)
    with pytest.raises(UsageError, match="NBD socket '/s' is inside the mount"):
        paths.check_path("NBD socket", paths.Resolved("/s", "/mnt/s"), places, written=False)


def test_inside() -> None:
    assert paths.inside("/mnt", "/mnt") and paths.inside("/mnt/a/b", "/mnt/")
    assert not paths.inside("/mnt2/a", "/mnt") and not paths.inside("/", "/mnt")


@pytest.mark.parametrize("links, message", [
    (paths.ImageLinks("a.raw", "/src/a.raw", "/src/b.raw", True, 1), "is a symbolic link"),
    (paths.ImageLinks("d/a.raw", "/src/d/a.raw", "/src/e/a.raw", False, 1), "through a symbolic link"),
    (paths.ImageLinks("a.raw", "/src/a.raw", "/src/a.raw", False, 2), "has 2 hard links"),
])
def test_check_image_links_refuses(links: paths.ImageLinks, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        paths.check_image_links(links)
    paths.check_image_links(paths.ImageLinks("a.raw", "/src/a.raw", "/src/a.raw", False, 1))


def test_resolve_follows_symlinks_and_dotdot(tmp_path: Path) -> None:
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / "f").write_bytes(b"x")
    (tmp_path / "link").symlink_to(tmp_path / "d" / "sub")
    found = paths.resolve(f"{tmp_path}/link/../f")
    assert found.real == str(tmp_path / "d" / "f") and found.regular
    assert found.identity == (os.stat(tmp_path / "d" / "f").st_dev, os.stat(tmp_path / "d" / "f").st_ino)
    new = paths.resolve(f"{tmp_path}/link/new")
    assert new.real == str(tmp_path / "d" / "sub" / "new") and new.identity is None
    assert new.dev == os.stat(tmp_path).st_dev


async def test_a_resolver_that_hangs_is_abandoned_with_one_line() -> None:
    import threading

    import trio

    release = threading.Event()
    try:
        with trio.fail_after(5):
            with pytest.raises(UsageError, match="could not be resolved within 0 s"):
                await paths.run_resolver(release.wait, timeout=0.2)
    finally:
        release.set()
    assert await paths.run_resolver(lambda: 7) == 7


# ---------------------------------------------------------------------------- on a mount

def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def image(mount: Mount, name: str, size: int = 1 * MiB) -> str:
    path = mount.source / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(os.urandom(size))
    return sha(path)


def jobs(mount: Mount) -> list[dict[str, Any]]:
    return json.loads(mount.cli("status", mount.mountpoint, "--json", timeout=DEADLINE).stdout)


def kill_hung(mount: Mount) -> None:
    """End a daemon that no longer answers (only SIGKILL does) and drop its mount."""
    if mount.pid and process_alive(mount.pid):
        os.kill(mount.pid, signal.SIGKILL)
        wait_for(lambda: not process_alive(mount.pid), 10, "the hung daemon to die")
    if is_mounted(mount.mountpoint):
        subprocess.run(["fusermount3", "-u", "-z", str(mount.mountpoint)], capture_output=True)


def run_or_kill(mount: Mount, argv: list[str]) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` (a client of the mount) with a deadline; a daemon that does not answer in
    time is deadlocked: kill it (so the fixture can clean up) and fail."""
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=DEADLINE,
                              env=mount.env())
    except subprocess.TimeoutExpired:
        kill_hung(mount)
        raise AssertionError(f"the mount did not answer within {DEADLINE:.0f} s "
                             f"(deadlocked): {argv}") from None


def mirror(mount: Mount, *args: str | os.PathLike[str]) -> subprocess.CompletedProcess[str]:
    from mounting import mirrorfs_argv

    return run_or_kill(mount, [*mirrorfs_argv(), "mirror", str(mount.mountpoint), *map(str, args)])


def control_line(mount: Mount, line: str) -> str:
    """Write one line to ``.mirrorfs/control`` (raw: no client-side path handling) under a
    deadline; returns the outcome the control file records for it."""
    script = ("import os, sys\nfd = os.open(sys.argv[1], os.O_WRONLY)\n"
              "try:\n    os.write(fd, sys.argv[2].encode())\nexcept OSError as e:\n"
              "    print(e.errno)\n")
    run_or_kill(mount, [sys.executable, "-c", script, str(mount.control / "control"), line + "\n"])
    return (mount.control / "control").read_text().splitlines()[-1].split(" -> ", 1)[1]


def assert_refused(proc: subprocess.CompletedProcess[str], message: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert message in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr


def assert_serving(mount: Mount, name: str, digest: str) -> None:
    """The mount still answers: reads through it, status, and no job was left."""
    data = run_or_kill(mount, [sys.executable, "-c", "import hashlib, sys; print(hashlib.sha256("
                               "open(sys.argv[1], 'rb').read()).hexdigest())",
                               str(mount.mountpoint / name)])
    assert data.stdout.strip() == digest
    assert jobs(mount) == []


def test_a_target_that_is_the_source_or_an_image_is_refused(mounted: Mount, tmp_path: Path) -> None:
    digest = image(mounted, "a.raw")
    other = image(mounted, "b.raw")
    (tmp_path / "alias").symlink_to(mounted.source / "a.raw")
    (tmp_path / "dir").symlink_to(mounted.source)
    for target in (mounted.source / "a.raw", tmp_path / "alias", tmp_path / "dir" / "a.raw"):
        assert_refused(mirror(mounted, "a.raw", target), "is the image 'a.raw' itself")
    # through ``..`` after a symlink (sent raw: the CLI would normalise it lexically)
    (mounted.source / "sub").mkdir()
    (tmp_path / "sublink").symlink_to(mounted.source / "sub")
    assert "is the image 'a.raw' itself" in control_line(mounted, f"mirror a.raw {tmp_path}/sublink/../a.raw")
    assert_refused(mirror(mounted, "a.raw", mounted.source / "b.raw"), "is an image of the mount")
    os.link(mounted.source / "b.raw", tmp_path / "b-link.raw")
    assert_refused(mirror(mounted, "a.raw", tmp_path / "b-link.raw"), "has 2 hard links")
    assert sha(mounted.source / "a.raw") == digest and sha(mounted.source / "b.raw") == other
    assert_serving(mounted, "a.raw", digest)


def test_another_jobs_target_or_bitmap_and_a_bitmap_on_the_own_target_are_refused(
        mounted: Mount, tmp_path: Path) -> None:
    image(mounted, "a.raw", 4 * MiB)
    image(mounted, "b.raw", 4 * MiB)
    target, bitmap = tmp_path / "ta.raw", tmp_path / "ta.bitmap"
    assert mirror(mounted, "a.raw", target, "--create", "--bitmap", bitmap,
                  "--speed", "64K", "--buf-size", "64K").returncode == 0
    assert_refused(mirror(mounted, "b.raw", target), "is already the target of job 'a.raw'")
    assert_refused(mirror(mounted, "b.raw", bitmap), "is already the bitmap of job 'a.raw'")
    assert_refused(mirror(mounted, "b.raw", tmp_path / "tb.raw", "--create", "--bitmap", target),
                   "is already the target of job 'a.raw'")
    assert not (tmp_path / "tb.raw").exists()
    assert_refused(mirror(mounted, "b.raw", tmp_path / "tb.raw", "--create", "--bitmap",
                          tmp_path / "tb.raw"), "is already this job's target")
    assert not (tmp_path / "tb.raw").exists()
    assert [j["device"] for j in jobs(mounted)] == ["a.raw"]
    mounted.cli("cancel", mounted.mountpoint, "a.raw", "--force")
    wait_for(lambda: jobs(mounted) == [], 30, "the job to end")
    # once the job ended its files are free again
    assert mirror(mounted, "b.raw", target, "--sync", "none").returncode == 0
    mounted.cli("cancel", mounted.mountpoint, "b.raw", "--force")


PATHS_INTO_THE_MOUNT: dict[str, Callable[[Path, Path], list[str]]] = {
    "target through a file symlink": lambda t, m: [f"{t}/link-b"],
    "target through a directory symlink": lambda t, m: [f"{t}/link-mnt/new.raw", "--create"],
    "bitmap through a directory symlink": lambda t, m: [f"{t}/out.raw", "--create",
                                                        "--bitmap", f"{t}/link-mnt/a.bitmap"],
    "bitmap through a file symlink (sync dirty)": lambda t, m: [f"{t}/out.raw", "--create", "--sync",
                                                                "dirty", "--bitmap", f"{t}/link-b"],
    "nbd+unix socket": lambda t, m: ["nbd+unix:///x?socket=" + f"{t}/link-mnt/sock"],
    "TLS certificate directory": lambda t, m: ["nbds+unix:///x?socket=/nonexistent.sock"
                                               f"&tls-certificates={t}/link-mnt"],
}


@pytest.mark.parametrize("case", sorted(PATHS_INTO_THE_MOUNT))
def test_a_path_that_resolves_into_the_mount_is_refused_and_the_mount_serves_on(
        mounted: Mount, tmp_path: Path, case: str) -> None:
    digest = image(mounted, "a.raw")
    image(mounted, "b.raw")
    (tmp_path / "link-b").symlink_to(mounted.mountpoint / "b.raw")
    (tmp_path / "link-mnt").symlink_to(mounted.mountpoint)
    proc = mirror(mounted, "a.raw", *PATHS_INTO_THE_MOUNT[case](tmp_path, mounted.mountpoint))
    assert_refused(proc, "is inside the mount")
    assert not (tmp_path / "out.raw").exists() and not (mounted.source / "new.raw").exists()
    assert_serving(mounted, "a.raw", digest)


def test_a_path_into_the_mount_through_dotdot_is_refused(mounted: Mount, tmp_path: Path) -> None:
    digest = image(mounted, "a.raw")
    image(mounted, "b.raw")
    (mounted.source / "sub").mkdir()
    (tmp_path / "link-sub").symlink_to(mounted.mountpoint / "sub")
    outcome = control_line(mounted, f"mirror a.raw {tmp_path}/link-sub/../b.raw")
    assert "is inside the mount" in outcome, outcome
    assert_serving(mounted, "a.raw", digest)


# ---------------------------------------------------------------------------- links

def test_an_image_with_a_second_name_is_refused(mounted: Mount, tmp_path: Path) -> None:
    digest = image(mounted, "a.raw")
    (mounted.source / "alias.raw").symlink_to("a.raw")
    (mounted.source / "real").mkdir()
    image(mounted, "real/c.raw")
    (mounted.source / "dirlink").symlink_to("real")
    image(mounted, "h.raw")
    os.link(mounted.source / "h.raw", mounted.source / "h2.raw")
    cases = {"alias.raw": "is a symbolic link", "dirlink/c.raw": "through a symbolic link",
             "h.raw": "has 2 hard links", "h2.raw": "has 2 hard links"}
    for name, message in cases.items():
        assert_refused(mirror(mounted, name, tmp_path / "t.raw", "--create"), message)
        assert not (tmp_path / "t.raw").exists()
    assert_serving(mounted, "a.raw", digest)
    # the file itself, under its one name, is mirrored
    assert mirror(mounted, "real/c.raw", tmp_path / "t.raw", "--create").returncode == 0
    wait_for(lambda: jobs(mounted)[0]["ready"], 30, "ready")
    mounted.cli("complete", mounted.mountpoint, "real/c.raw", "--no-pivot")
    assert sha(tmp_path / "t.raw") == sha(mounted.source / "real" / "c.raw")


def test_an_image_that_links_into_the_mount_is_refused_and_the_mount_serves_on(
        mounted: Mount, tmp_path: Path) -> None:
    """Looking such an image up on the thread that serves the mount would wait on itself."""
    digest = image(mounted, "a.raw")
    (mounted.source / "loop.raw").symlink_to(mounted.mountpoint / "a.raw")
    assert_refused(mirror(mounted, "loop.raw", tmp_path / "t.raw", "--create"), "is a symbolic link")
    assert not (tmp_path / "t.raw").exists()
    assert_serving(mounted, "a.raw", digest)
