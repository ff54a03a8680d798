"""Done-when 2 and the known QEMU traps: qemu-img/qemu-io through the mount, both cache modes."""

from __future__ import annotations

import mmap
import os
import subprocess

import pytest

from mounting import Mount


def run(*argv: str) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"{' '.join(argv)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def qemu_io(fmt: str, cache: str, path: os.PathLike[str], *commands: str) -> str:
    argv = ["qemu-io", "-f", fmt, "-t", cache]
    for c in commands:
        argv += ["-c", c]
    out = run(*argv, str(path))
    # Belt and braces: qemu-io 7.2 exits 1 on a failed command, and says so.
    assert "Pattern verification failed" not in out and "failed" not in out.lower(), out
    return out


@pytest.mark.parametrize("cache", ["none", "writeback"])
def test_qemu_img_and_qemu_io_through_mount(mounted: Mount, cache: str) -> None:
    mnt, src = mounted.mountpoint, mounted.source
    run("qemu-img", "create", "-f", "qcow2", str(mnt / "a.qcow2"), "64M")
    run("qemu-img", "create", "-f", "raw", str(mnt / "b.raw"), "64M")
    assert (src / "a.qcow2").is_file() and (src / "b.raw").stat().st_size == 64 << 20

    for fmt, name in (("qcow2", "a.qcow2"), ("raw", "b.raw")):
        qemu_io(fmt, cache, mnt / name,
                "write -P 0xa5 0 1M", "write -P 0x5a 1M 64k", "write -P 0x3c 33M 4k",
                "write -P 0x11 65011712 1M")  # the last MiB
        out = qemu_io(fmt, cache, mnt / name,
                      "read -P 0xa5 0 1M", "read -P 0x5a 1M 64k", "read -P 0x3c 33M 4k",
                      "read -P 0x11 65011712 1M", "read -P 0 2M 1M")
        assert out.count("read ") == 5, out
        # Read back the other way round: through the source directly, in the other cache mode.
        other = "writeback" if cache == "none" else "none"
        qemu_io(fmt, other, src / name, "read -P 0xa5 0 1M", "read -P 0x11 65011712 1M")
        assert "Images are identical" in run("qemu-img", "compare", "-f", fmt, "-F", fmt,
                                             str(mnt / name), str(src / name))
    info = run("qemu-img", "info", "--output=json", str(mnt / "a.qcow2"))
    assert '"format": "qcow2"' in info
    run("qemu-img", "check", str(mnt / "a.qcow2"))


def test_pattern_mismatch_is_detected(mounted: Mount) -> None:
    """The check above can fail: a wrong pattern makes qemu-io say so."""
    img = mounted.mountpoint / "c.raw"
    run("qemu-img", "create", "-f", "raw", str(img), "4M")
    qemu_io("raw", "none", img, "write -P 0x42 0 64k")
    proc = subprocess.run(["qemu-io", "-f", "raw", "-t", "none", "-c", "read -P 0x43 0 64k", str(img)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "Pattern verification failed" in proc.stdout


def test_readonly_open_kept_while_opened_readwrite(mounted: Mount) -> None:
    """QEMU's trap 1: a read-only handle stays open while the image is opened read-write."""
    path = mounted.mountpoint / "img.raw"
    path.write_bytes(b"\0" * 65536)
    ro = os.open(path, os.O_RDONLY)
    try:
        rw = os.open(path, os.O_RDWR | os.O_DIRECT)
        try:
            buf = mmap.mmap(-1, 4096)  # page-aligned, as O_DIRECT wants
            buf.write(b"\xee" * 4096)
            assert os.pwrite(rw, buf, 8192) == 4096
            os.fsync(rw)
            with pytest.raises(OSError):
                os.pwrite(ro, b"x", 0)  # the read-only handle stays read-only
        finally:
            os.close(rw)
        assert os.pread(ro, 4096, 8192) == b"\xee" * 4096
    finally:
        os.close(ro)
    assert (mounted.source / "img.raw").read_bytes()[8192:8192 + 4096] == b"\xee" * 4096


def test_odirect_unaligned_python_buffer_on_source(mounted: Mount) -> None:
    """QEMU's trap 2: O_DIRECT through the mount, with reads and writes of odd sizes."""
    path = mounted.mountpoint / "d.raw"
    path.write_bytes(bytes(range(256)) * 1024)
    fd = os.open(path, os.O_RDWR | os.O_DIRECT)
    try:
        buf = mmap.mmap(-1, 65536)
        buf.write(os.urandom(65536))
        assert os.pwrite(fd, buf, 4096) == 65536
        back = mmap.mmap(-1, 65536)
        assert os.preadv(fd, [back], 4096) == 65536
        assert back[:] == buf[:]
    finally:
        os.close(fd)
    assert (mounted.source / "d.raw").read_bytes()[4096:4096 + 65536] == buf[:]
