"""Fixtures shared by the whole suite: real mirrorfs mounts that always clean up.

- ``mounted``: a fresh mount of ``tmp_path/source`` at ``tmp_path/mnt`` (see ``mounting.Mount``).
- ``mount_factory``: ``mount_factory(source=None, mountpoint=None, extra_args=())`` for tests that
  need their own source directory or options; every mount it made is closed at teardown.
- ``fuse`` marker / ``requires_fuse``: skip where /dev/fuse or fusermount3 is missing; under
  ``CI=true`` (``.ci/run``) such a test FAILS instead, so a machine without FUSE is never green.
  Tests that use the fixtures get the marker automatically.
- Session-end check (Done-when 8): the suite fails if any mount or mirrorfs process it started is
  still there when it ends.
- checklogs: a test fails if its mount's log holds a traceback, an ERROR line or a handler BUG
  (``mount.allow_log(regex)`` declares expected lines), as s3ql's pytest_checklogs does.
"""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator

import pytest

import mounting

_FUSE_OK, _FUSE_WHY = mounting.fuse_available()
requires_fuse = pytest.mark.fuse


def in_ci() -> bool:
    """CI runs (``.ci/run`` sets ``CI=true``, as most CI services do) may not skip FUSE tests."""
    return os.environ.get("CI", "").lower() in ("true", "1", "yes")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        fixtures = getattr(item, "fixturenames", ())
        if "mounted" in fixtures or "mount_factory" in fixtures or item.get_closest_marker("fuse"):
            item.add_marker(pytest.mark.fuse)


def pytest_runtest_setup(item: pytest.Item) -> None:
    if _FUSE_OK or item.get_closest_marker("fuse") is None:
        return
    if in_ci():
        pytest.fail(f"no FUSE: {_FUSE_WHY}; CI=true, so this FUSE test fails instead of being "
                    f"skipped (run CI on a machine with /dev/fuse and fusermount3)", pytrace=False)
    pytest.skip(f"no FUSE: {_FUSE_WHY}")


@pytest.fixture(scope="session", autouse=True)
def no_leftover_mounts() -> Iterator[None]:
    """Fail the session if a mount or mirrorfs process started by the tests is left behind."""
    yield
    left = mounting.leftovers()
    assert not left, "left behind by the test suite: " + "; ".join(left)


MountFactory = Callable[..., mounting.Mount]


@pytest.fixture
def mount_factory(tmp_path: Path) -> Iterator[MountFactory]:
    """Make mounts with custom source directories or options; all are unmounted at teardown."""
    mounts: list[mounting.Mount] = []
    counter = itertools.count()

    def make(source: Path | None = None, mountpoint: Path | None = None,
             extra_args: tuple[str, ...] | list[str] = ()) -> mounting.Mount:
        n = next(counter)
        suffix = "" if n == 0 else f"-{n}"
        if source is None:
            source = tmp_path / f"source{suffix}"
            source.mkdir(exist_ok=True)
        if mountpoint is None:
            mountpoint = tmp_path / f"mnt{suffix}"
            mountpoint.mkdir(exist_ok=True)
        mount = mounting.Mount(source=Path(source), mountpoint=Path(mountpoint),
                               log_file=tmp_path / f"mirrorfs{suffix}.log", extra_args=tuple(extra_args))
        mounts.append(mount)
        mount.start()
        return mount

    problems: list[str] = []
    try:
        yield make
    finally:
        for mount in reversed(mounts):
            problems += [f"{mount.mountpoint}: {p}" for p in mount.close()]
    for mount in mounts:
        bad = mount.bad_log_lines()
        if bad:
            problems.append(f"{mount.log_file} has unexpected lines:\n" + "\n".join(bad[:20]))
    if problems:
        pytest.fail("mount teardown: " + "\n".join(problems), pytrace=False)


@pytest.fixture
def shm_path() -> Iterator[Path]:
    """A fresh directory on tmpfs (``/dev/shm``), removed afterwards: where mirrorfs runs file I/O
    on the trio thread and its inline request paths (``fileio.inline_capable``) are taken;
    ``tmp_path`` is on a disk file system here."""
    path = Path(tempfile.mkdtemp(prefix="mirrorfs-test-", dir="/dev/shm"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def mounted(mount_factory: MountFactory) -> mounting.Mount:
    """A mirrorfs mount of an empty ``tmp_path/source`` at ``tmp_path/mnt``."""
    return mount_factory()
