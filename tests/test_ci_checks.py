"""CI refuses to go green where FUSE is missing: ``.ci/check-fuse`` fails up front, and under
``CI=true`` the suite fails (not skips) every FUSE test it cannot run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from mounting import FUSE_DEVICE_ENV

ROOT = Path(__file__).resolve().parents[1]
#: A test that mounts (through the ``mounted`` fixture): it gets the ``fuse`` marker.
FUSE_TEST = "tests/test_mount_cli.py::test_busy_mountpoint"


def test_check_fuse_fails_with_a_reason_when_the_device_is_missing(tmp_path: Path) -> None:
    missing = tmp_path / "fuse"
    r = subprocess.run([str(ROOT / ".ci" / "check-fuse"), str(missing)], capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 1
    assert f"{missing} is missing" in r.stderr and "CI fails" in r.stderr


@pytest.mark.fuse
def test_check_fuse_passes_here() -> None:
    r = subprocess.run([str(ROOT / ".ci" / "check-fuse")], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("FUSE available: /dev/fuse")


def test_ci_run_checks_fuse_before_the_suite() -> None:
    lines = (ROOT / ".ci" / "run").read_text().splitlines()
    check = lines.index("./.ci/check-fuse")
    assert check < lines.index("export CI=true") < lines.index('exec ./scripts/test "$@"')


def _run_fuse_test_without_fuse(tmp_path: Path, ci: str | None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env[FUSE_DEVICE_ENV] = str(tmp_path / "no-fuse")
    if ci is not None:
        env["CI"] = ci
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rA",
                           FUSE_TEST], capture_output=True, text=True, timeout=120, cwd=ROOT, env=env)


def test_without_fuse_a_fuse_test_fails_in_ci(tmp_path: Path) -> None:
    r = _run_fuse_test_without_fuse(tmp_path, "true")
    assert r.returncode == 1, r.stdout
    assert "1 error" in r.stdout and "no FUSE" in r.stdout and "is missing" in r.stdout


def test_without_fuse_a_fuse_test_is_skipped_outside_ci(tmp_path: Path) -> None:
    r = _run_fuse_test_without_fuse(tmp_path, None)
    assert r.returncode == 0, r.stdout
    assert "1 skipped" in r.stdout and "no FUSE" in r.stdout
