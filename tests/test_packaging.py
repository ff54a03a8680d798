"""``pip install .`` gives a working mirrorfs outside the checkout: the wheel carries the console
scripts, the licence and the files the docs promise, and the installed ``mirrorfs`` (not the
checkout's) mounts and mirrors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path
from typing import Iterator

import pytest

from mounting import STARTED, Mount, is_mounted, wait_for

ROOT = Path(__file__).resolve().parents[1]
#: What the wheel must hold besides the code: the docs' promises and the licence.
PACKAGE_DATA = {"mirrorfs/data/bitmap-format.md": "docs/bitmap-format.md",
                "mirrorfs/data/mirrorfs@.service": "docs/mirrorfs@.service",
                "mirrorfs/data/reference.md": "docs/reference.md"}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(ROOT)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    (path,) = out.glob("mirrorfs-*.whl")
    return path


def test_the_wheel_ships_the_promised_files_the_licence_and_both_scripts(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        for inside, source in PACKAGE_DATA.items():
            assert inside in names, sorted(names)
            assert z.read(inside) == (ROOT / source).read_bytes(), inside
        licence = [n for n in names if n.endswith("/LICENSE")]
        assert licence and z.read(licence[0]) == (ROOT / "LICENSE").read_bytes()
        entry_points = z.read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
        metadata = z.read(next(n for n in names if n.endswith("METADATA"))).decode()
    assert "mirrorfs = mirrorfs.cli:main" in entry_points
    assert "mount.fuse.mirrorfs = mirrorfs.cli:mount_helper_main" in entry_points
    for dependency in ("pyfuse3", "trio", "numpy", "rich"):
        assert f"Requires-Dist: {dependency}" in metadata


@pytest.fixture
def installed(wheel: Path, tmp_path: Path) -> Iterator[Path]:
    """A fresh venv outside the checkout with the wheel installed; its ``bin`` directory."""
    venv = tmp_path / "venv"
    subprocess.run([getattr(sys, "_base_executable", sys.executable), "-m", "venv", str(venv)],
                   check=True, capture_output=True, timeout=300)
    # The dependencies come from the test environment (a path line in a .pth file) so the test
    # needs no index; the package itself is only the wheel, and the path line does not run the
    # checkout's editable-install hook, so nothing of the checkout is importable.
    purelib = subprocess.run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    deps = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    Path(purelib, "test-dependencies.pth").write_text("".join(f"{d}\n" for d in sorted(deps)))
    r = subprocess.run([str(venv / "bin" / "pip"), "install", "--no-deps", "--no-index", "-q", str(wheel)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    r = subprocess.run([str(venv / "bin" / "pip"), "check"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    yield venv / "bin"


@pytest.mark.fuse
def test_the_installed_mirrorfs_mounts_and_mirrors(installed: Path, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["MIRRORFS_LOG_FILE"] = str(tmp_path / "mount.log")

    def run(*args: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
        r = subprocess.run([str(installed / "mirrorfs"), *map(str, args)], capture_output=True,
                           text=True, timeout=120, cwd=tmp_path, env=env)
        assert not check or r.returncode == 0, f"mirrorfs {args} exited {r.returncode}: {r.stderr}"
        return r

    where = subprocess.run([str(installed / "python"), "-c", "import mirrorfs; print(mirrorfs.__file__)"],
                           capture_output=True, text=True, cwd=tmp_path, env=env, check=True).stdout
    assert where.startswith(str(installed.parent)), where
    unit = subprocess.run([str(installed / "python"), "-c", "import importlib.resources as r; "
                           "print((r.files('mirrorfs') / 'data' / 'mirrorfs@.service').read_text(), end='')"],
                          capture_output=True, text=True, cwd=tmp_path, env=env, check=True).stdout
    assert unit == (ROOT / "docs" / "mirrorfs@.service").read_text()
    assert run("--version").stdout.startswith("mirrorfs ")

    source, mnt = tmp_path / "images", tmp_path / "mnt"
    source.mkdir()
    mnt.mkdir()
    data = os.urandom(3 << 20)
    (source / "vm.raw").write_bytes(data)
    # Cleanup through the suite's own helper, whatever happens below.
    mount = Mount(source=source, mountpoint=mnt, log_file=tmp_path / "mount.log")
    STARTED.append((mnt, None))
    mount._closed = False
    try:
        run("mount", source, mnt)
        mount.pid = int((mnt / ".mirrorfs" / "pid").read_text())
        STARTED.append((mnt, mount.pid))
        run("mirror", mnt, "vm.raw", tmp_path / "copy.raw", "--create")
        wait_for(lambda: json.loads(run("status", mnt, "--json").stdout)[0]["ready"], 60, "the job to be ready")
        with open(mnt / "vm.raw", "r+b") as f:  # a write while mirroring reaches both
            f.seek(1 << 20)
            f.write(b"installed" * 100)
        run("complete", mnt, "vm.raw", "--no-pivot")
        assert (tmp_path / "copy.raw").read_bytes() == (source / "vm.raw").read_bytes() != data
        run("unmount", mnt)
        assert not is_mounted(mnt)
    finally:
        problems = mount.close()
    assert not problems, problems
    assert not mount.bad_log_lines(), mount.read_log()
