"""Done-when 5: metadata operations through the mount, compared with the source directory."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest

from mirrorfs.fs.rename2 import RENAME_EXCHANGE, RENAME_NOREPLACE, rename2
from mounting import Mount


def listing(root: Path, *, hide_control: bool = False) -> dict[str, tuple[int, int, int]]:
    """relpath -> (type+mode, size, mtime_ns) for everything below ``root``."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        if hide_control and Path(dirpath) == root and ".mirrorfs" in dirnames:
            dirnames.remove(".mirrorfs")
        for name in dirnames + filenames:
            p = Path(dirpath, name)
            st = p.lstat()
            size = st.st_size if stat.S_ISREG(st.st_mode) else 0
            out[str(p.relative_to(root))] = (st.st_mode, size, st.st_mtime_ns)
    return out


def assert_same_view(m: Mount) -> None:
    assert listing(m.mountpoint, hide_control=True) == listing(m.source)


def test_file_and_directory_operations_match_source(mounted: Mount) -> None:
    mnt, src = mounted.mountpoint, mounted.source
    (mnt / "d1" / "d2").mkdir(parents=True)
    (mnt / "d1" / "d2" / "f.raw").write_bytes(b"abc" * 1000)
    (mnt / "g.raw").write_bytes(b"0123456789")
    assert (src / "d1" / "d2" / "f.raw").read_bytes() == b"abc" * 1000
    assert_same_view(mounted)

    # truncate: shrink and grow
    os.truncate(mnt / "g.raw", 4)
    assert (src / "g.raw").read_bytes() == b"0123"
    with open(mnt / "g.raw", "r+b") as f:
        f.truncate(1 << 20)
    assert (src / "g.raw").stat().st_size == 1 << 20
    assert (mnt / "g.raw").stat().st_size == 1 << 20
    assert (mnt / "g.raw").read_bytes()[:6] == b"0123\0\0"

    # chmod, utime, chown
    os.chmod(mnt / "g.raw", 0o640)
    assert stat.S_IMODE((src / "g.raw").stat().st_mode) == 0o640
    os.utime(mnt / "g.raw", ns=(1_000_000_000, 2_000_000_123))
    assert (src / "g.raw").stat().st_mtime_ns == 2_000_000_123
    os.chown(mnt / "g.raw", 1234, 5678)
    assert ((src / "g.raw").stat().st_uid, (src / "g.raw").stat().st_gid) == (1234, 5678)
    assert_same_view(mounted)

    # rename of a file and of a directory keeps inode numbers (stable while mounted)
    ino_f = (mnt / "d1" / "d2" / "f.raw").stat().st_ino
    ino_g = (mnt / "g.raw").stat().st_ino
    os.rename(mnt / "g.raw", mnt / "d1" / "h.raw")
    os.rename(mnt / "d1", mnt / "e1")
    assert (mnt / "e1" / "h.raw").stat().st_ino == ino_g
    assert (mnt / "e1" / "d2" / "f.raw").stat().st_ino == ino_f
    assert (src / "e1" / "d2" / "f.raw").read_bytes() == b"abc" * 1000
    assert not (src / "d1").exists()
    assert_same_view(mounted)

    # rename over an existing file replaces it
    (mnt / "x.raw").write_bytes(b"new")
    os.replace(mnt / "x.raw", mnt / "e1" / "h.raw")
    assert (src / "e1" / "h.raw").read_bytes() == b"new"

    # unlink, rmdir (non-empty refused), statfs
    os.unlink(mnt / "e1" / "h.raw")
    assert not (src / "e1" / "h.raw").exists()
    with pytest.raises(OSError) as exc:
        os.rmdir(mnt / "e1")
    assert exc.value.errno == errno.ENOTEMPTY
    os.unlink(mnt / "e1" / "d2" / "f.raw")
    os.rmdir(mnt / "e1" / "d2")
    os.rmdir(mnt / "e1")
    assert sorted(os.listdir(src)) == []
    assert sorted(os.listdir(mnt)) == [".mirrorfs"]
    sv_m, sv_s = os.statvfs(mnt), os.statvfs(src)
    assert (sv_m.f_bsize, sv_m.f_blocks, sv_m.f_files, sv_m.f_namemax) == \
        (sv_s.f_bsize, sv_s.f_blocks, sv_s.f_files, sv_s.f_namemax)


def test_rename_noreplace_and_exchange(mounted: Mount) -> None:
    """renameat2's flags reach the source: NOREPLACE refuses an existing name and changes nothing;
    EXCHANGE swaps two names (files or a file and a directory) and their inode numbers."""
    mnt, src = mounted.mountpoint, mounted.source
    (mnt / "a.raw").write_bytes(b"A")
    (mnt / "b.raw").write_bytes(b"B")
    (mnt / "d").mkdir()
    (mnt / "d" / "inner").write_bytes(b"I")
    ino = {name: (mnt / name).stat().st_ino for name in ("a.raw", "b.raw", "d")}
    inner = (mnt / "d" / "inner").stat().st_ino

    with pytest.raises(OSError) as exc:
        rename2(mnt / "a.raw", mnt / "b.raw", RENAME_NOREPLACE)
    assert exc.value.errno == errno.EEXIST
    assert (src / "a.raw").read_bytes() == b"A" and (src / "b.raw").read_bytes() == b"B"
    rename2(mnt / "a.raw", mnt / "c.raw", RENAME_NOREPLACE)
    assert (src / "c.raw").read_bytes() == b"A" and not (src / "a.raw").exists()
    assert (mnt / "c.raw").stat().st_ino == ino["a.raw"]

    fd = os.open(mnt / "c.raw", os.O_RDWR)
    try:
        rename2(mnt / "c.raw", mnt / "b.raw", RENAME_EXCHANGE)
        assert (src / "b.raw").read_bytes() == b"A" and (src / "c.raw").read_bytes() == b"B"
        assert (mnt / "b.raw").read_bytes() == b"A" and (mnt / "c.raw").read_bytes() == b"B"
        assert (mnt / "b.raw").stat().st_ino == ino["a.raw"] and (mnt / "c.raw").stat().st_ino == ino["b.raw"]
        os.pwrite(fd, b"a", 0)  # an open handle follows its file to the new name
        assert (src / "b.raw").read_bytes() == b"a"
    finally:
        os.close(fd)
    rename2(mnt / "d", mnt / "c.raw", RENAME_EXCHANGE)  # a directory and a file trade places
    assert (src / "d").read_bytes() == b"B" and (src / "c.raw" / "inner").read_bytes() == b"I"
    assert (mnt / "c.raw").stat().st_ino == ino["d"] and (mnt / "d").stat().st_ino == ino["b.raw"]
    assert (mnt / "c.raw" / "inner").stat().st_ino == inner
    with pytest.raises(OSError) as exc:
        rename2(mnt / "d", mnt / "missing", RENAME_EXCHANGE)
    assert exc.value.errno == errno.ENOENT
    with pytest.raises(OSError) as exc:
        rename2(mnt / "d", mnt / "x", RENAME_EXCHANGE | RENAME_NOREPLACE)
    assert exc.value.errno == errno.EINVAL
    assert_same_view(mounted)


def test_errors_have_the_source_errno(mounted: Mount) -> None:
    mnt = mounted.mountpoint
    for call, err in [
        (lambda: os.stat(mnt / "missing"), errno.ENOENT),
        (lambda: os.mkdir(mnt / "a") or os.mkdir(mnt / "a"), errno.EEXIST),
        (lambda: os.open(mnt / "a" / "f", os.O_CREAT | os.O_EXCL | os.O_WRONLY) and
         os.open(mnt / "a" / "f", os.O_CREAT | os.O_EXCL | os.O_WRONLY), errno.EEXIST),
        (lambda: os.rmdir(mnt / "a" / "f"), errno.ENOTDIR),
        (lambda: os.unlink(mnt / "nope"), errno.ENOENT),
    ]:
        with pytest.raises(OSError) as exc:
            call()
        assert exc.value.errno == err


def test_shared_state_and_unlinked_open_file(mounted: Mount) -> None:
    """Several opens see each other's writes; an unlinked open file keeps working."""
    path = mounted.mountpoint / "s.raw"
    a = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    b = os.open(path, os.O_RDWR)
    try:
        os.pwrite(a, b"hello", 0)
        assert os.pread(b, 5, 0) == b"hello"
        os.unlink(path)
        assert not (mounted.source / "s.raw").exists()
        os.pwrite(b, b"world", 5)
        assert os.pread(a, 10, 0) == b"helloworld"
        assert os.fstat(a).st_size == 10
    finally:
        os.close(a)
        os.close(b)


def test_control_dir(mounted: Mount) -> None:
    """.mirrorfs/ is virtual; the source's own .mirrorfs never shows through."""
    (mounted.source / ".mirrorfs").mkdir()
    (mounted.source / ".mirrorfs" / "status").write_text("from the source\n")
    ctl = mounted.control
    names = os.listdir(ctl)
    assert {"pid", "status"} <= set(names) and len(names) == len(set(names))
    assert "from the source" not in {(ctl / n).read_text() for n in names if n != "control"}
    assert (ctl / "status").read_text() == "no jobs\n"
    assert int((ctl / "pid").read_text()) == mounted.pid
    assert os.listdir(mounted.mountpoint).count(".mirrorfs") == 1
    with pytest.raises(OSError) as exc:
        (ctl / "status").write_text("x")
    assert exc.value.errno in (errno.EACCES, errno.EPERM)
    with pytest.raises(OSError):
        (ctl / "new").write_text("x")
    with pytest.raises(OSError):
        os.rmdir(ctl)
    with pytest.raises(OSError):
        os.rename(ctl, mounted.mountpoint / "other")
    # Inode numbers do not collide with the source's files.
    (mounted.mountpoint / "f").write_bytes(b"1")
    inos = {(ctl / n).stat().st_ino for n in names} | {ctl.stat().st_ino}
    assert (mounted.mountpoint / "f").stat().st_ino not in inos
