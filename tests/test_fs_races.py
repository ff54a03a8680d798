"""Metadata requests are atomic against changes of the source made while they run.

Each race is made exact with the stalling filesystem (``stallfs.py``) below the source: the
source holds one step of a request while the test changes the source directory (as another
user of it could at any time), then lets go.
"""

from __future__ import annotations

import errno
import os
import stat
import subprocess
import threading
from pathlib import Path

from conftest import MountFactory
from mirrorfs.fs.rename2 import RENAME_NOREPLACE, rename2
from stallfs import Stall, stalling_fs

#: the user that creates files through an ``--allow-other`` mount
NOBODY = 65534


def test_rename_noreplace_never_replaces_a_name_that_appears_meanwhile(
        tmp_path: Path, shm_path: Path, mount_factory: MountFactory) -> None:
    source = shm_path / "source"
    (source / "slow").mkdir(parents=True)
    backing = tmp_path / "backing"
    backing.mkdir()
    (backing / "a").write_bytes(b"moving")
    ctl = tmp_path / "ctl"
    with stalling_fs(backing, source / "slow", ctl):
        mount = mount_factory(source=source)
        slow = mount.mountpoint / "slow"
        outcome: list[BaseException | None] = []

        def move() -> None:
            try:
                rename2(slow / "a", slow / "b", RENAME_NOREPLACE)
                outcome.append(None)
            except OSError as exc:
                outcome.append(exc)

        with Stall(ctl, "rename") as stall:
            thread = threading.Thread(target=move)
            thread.start()
            stall.wait_stalled()  # "b" was free when the request came
            (backing / "b").write_bytes(b"precious")
        thread.join(30)
        mount.unmount()
    assert isinstance(outcome[0], OSError) and outcome[0].errno == errno.EEXIST, outcome
    assert (backing / "b").read_bytes() == b"precious"
    assert (backing / "a").read_bytes() == b"moving"


#: run as NOBODY (who cannot run this checkout's Python): noclobber makes ``>`` an O_EXCL create
_CREATOR = 'set -eC; printf mine > "$1"; mkdir "$2"'


def test_create_for_another_user_owns_the_new_file_not_the_name(
        tmp_path: Path, shm_path: Path, mount_factory: MountFactory) -> None:
    """As root with --allow-other, a file created through the mount gets the caller's owner and
    umask, set on the new file itself: a name swapped for a link to another file (while the
    source holds a step of the request) neither changes that file's owner nor lets the caller
    write into it."""
    os.chmod(shm_path, 0o755)  # the caller must reach the mountpoint
    source = shm_path / "source"
    (source / "slow").mkdir(parents=True)
    backing = tmp_path / "backing"
    backing.mkdir(mode=0o777)
    os.chmod(backing, 0o777)
    precious = backing / "precious"
    precious.write_bytes(b"root's")
    os.chmod(precious, 0o600)
    ctl = tmp_path / "ctl"
    mnt = shm_path / "mnt"
    mnt.mkdir()
    with stalling_fs(backing, source / "slow", ctl):
        mount = mount_factory(source=source, mountpoint=mnt, extra_args=["--allow-other"])
        with Stall(ctl, "flush") as stall:
            # The first close of the new file in the source: inside the create request where
            # it is closed and chowned by name, at the caller's close where it is not.
            proc = subprocess.Popen(["/bin/sh", "-c", _CREATOR, "sh", str(mnt / "slow" / "new"),
                                     str(mnt / "slow" / "dir")], cwd="/",
                                    user=NOBODY, group=NOBODY, umask=0o027, stderr=subprocess.PIPE, text=True)
            try:
                stall.wait_stalled()
                created = os.lstat(backing / "new")
                os.link(precious, backing / "swap")
                os.rename(backing / "swap", backing / "new")
            finally:
                stall.release()
                _, err = proc.communicate(timeout=30)
        mount.unmount()
    st = precious.stat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, 0, 0o600)
    assert precious.read_bytes() == b"root's"
    assert proc.returncode == 0, err
    assert (created.st_uid, created.st_gid, stat.S_IMODE(created.st_mode)) == (NOBODY, NOBODY, 0o640)
    st = (backing / "dir").stat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (NOBODY, NOBODY, 0o750)
