"""Build the test guest: a Debian kernel and a busybox-static initramfs, cached.

The kernel comes from Debian's ``linux-image-cloud-amd64`` package (the smallest amd64 flavour:
26 MB to download, and its trimmed driver set boots fastest under TCG), fetched with
``apt-get download`` and unpacked with ``dpkg-deb -x``. Only ``vmlinuz`` and the virtio modules
the guest needs are kept. The initramfs holds ``/bin/busybox`` (must be the static one, from
``busybox-static``), ``/bin/guestrec`` (``guestrec.c`` compiled with ``gcc -static``), ``/init``
(``init.sh``) and the modules, named ``NN-name.ko`` so that the shell's glob order is a valid
load order.

Cache layout under ``.cache/guest/`` (gitignored)::

    current.json                      {"package": ..., "kernel_version": ...}
    debs/                             downloaded .deb files
    <kernel_version>/vmlinuz
    <kernel_version>/modules/NN-name.ko
    <kernel_version>/initrd-<hash>.img   hash of init.sh, guestrec.c, busybox and the modules

A second :func:`build` reads ``current.json`` and finds everything in place without asking apt
anything, so it costs milliseconds. ``force=True`` (``scripts/build-guest --force``) resolves
the newest kernel again. A file lock serialises concurrent builds (several test sessions share
the cache).
"""

from __future__ import annotations

import argparse
import fcntl
import gzip
import hashlib
import io
import json
import lzma
import os
import re
import shutil
import stat
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from . import GuestError

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
DEFAULT_CACHE = REPO / ".cache" / "guest"
#: The meta package whose dependency names the current kernel image package.
DEFAULT_META_PACKAGE = os.environ.get("MIRRORFS_GUEST_KERNEL", "linux-image-cloud-amd64")
#: Modules the guest loads (with their dependencies): PCI transport, disk, control port.
WANTED_MODULES = ("virtio_pci", "virtio_blk", "virtio_console")
BUSYBOX = Path("/bin/busybox")
#: Bump to force new initramfs images when the layout changes in a way the hash cannot see.
LAYOUT_VERSION = "1"


@dataclass(frozen=True)
class GuestImage:
    """A bootable guest: pass ``kernel`` to ``-kernel`` and ``initrd`` to ``-initrd``."""

    kernel: Path
    initrd: Path
    kernel_version: str


def build(cache_dir: Path = DEFAULT_CACHE, *, meta_package: str = DEFAULT_META_PACKAGE,
          force: bool = False, log: Callable[[str], None] | None = None) -> GuestImage:
    """Return the guest kernel and initramfs, building what is missing.

    Args:
        cache_dir: where downloads and results are kept.
        meta_package: Debian meta package naming the kernel (``linux-image-cloud-amd64``).
        force: resolve the kernel package again and rebuild the initramfs.
        log: called with one line per slow step; silent when None.

    Raises:
        GuestError: a tool is missing or failed (apt, dpkg-deb, gcc), or busybox is not static.
    """
    say = log or (lambda _msg: None)
    cache_dir.mkdir(parents=True, exist_ok=True)
    with _locked(cache_dir / "lock"):
        current = cache_dir / "current.json"
        kver = None
        if not force and current.exists():
            info = json.loads(current.read_text())
            if info.get("meta_package") == meta_package:
                kver = info["kernel_version"]
                if not _kernel_ready(cache_dir / kver):
                    kver = None
        if kver is None:
            try:
                package = _resolve_package(meta_package)
            except GuestError:
                if os.geteuid() != 0:
                    raise
                # A fresh machine may never have fetched the package lists.
                say("guest: apt-get update")
                _run(["apt-get", "update", "-qq"])
                package = _resolve_package(meta_package)
            kver = package.removeprefix("linux-image-")
            if force or not _kernel_ready(cache_dir / kver):
                _fetch_kernel(package, kver, cache_dir, say)
            _write_atomic(current, json.dumps(
                {"meta_package": meta_package, "package": package, "kernel_version": kver},
                indent=1).encode())
        kdir = cache_dir / kver
        initrd = _build_initrd(kdir, force=force, say=say)
        return GuestImage(kernel=kdir / "vmlinuz", initrd=initrd, kernel_version=kver)


# ---- kernel -----------------------------------------------------------------------------------

def _kernel_ready(kdir: Path) -> bool:
    return (kdir / "vmlinuz").is_file() and (kdir / "modules.done").is_file()


def _run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, check=True, capture_output=True, text=True, **kwargs)
    except FileNotFoundError as exc:
        raise GuestError(f"{cmd[0]} is not installed: run ./scripts/setup") from exc
    except subprocess.CalledProcessError as exc:
        detail = (exc.stderr or exc.stdout or "").strip().splitlines()
        raise GuestError(f"{' '.join(cmd)} failed: {detail[-1] if detail else exc}") from exc


def _resolve_package(meta_package: str) -> str:
    """Return the concrete kernel package a meta package depends on (apt's candidate)."""
    out = _run(["apt-cache", "depends", "--no-recommends", "--no-suggests", meta_package]).stdout
    for line in out.splitlines():
        m = re.match(r"\s*Depends:\s*(linux-image-\S+)", line)
        if m:
            return m.group(1)
    if meta_package.startswith("linux-image-") and re.search(r"\d", meta_package):
        return meta_package  # already a concrete package such as linux-image-6.1.0-56-amd64
    raise GuestError(f"cannot find the kernel package behind {meta_package}; "
                     "run apt-get update or set MIRRORFS_GUEST_KERNEL")


def _fetch_kernel(package: str, kver: str, cache_dir: Path, say: Callable[[str], None]) -> None:
    debs = cache_dir / "debs"
    debs.mkdir(exist_ok=True)
    found = sorted(debs.glob(f"{package}_*.deb"))
    if not found:
        say(f"guest: apt-get download {package}")
        t0 = time.monotonic()
        # apt warns that the _apt user cannot write here when run as root; that is harmless.
        _run(["apt-get", "download", "-q", package], cwd=debs)
        found = sorted(debs.glob(f"{package}_*.deb"))
        if not found:
            raise GuestError(f"apt-get download {package} produced no .deb in {debs}")
        say(f"guest: downloaded {found[-1].name} in {time.monotonic() - t0:.1f}s")
    deb = found[-1]
    kdir = cache_dir / kver
    with tempfile.TemporaryDirectory(dir=cache_dir, prefix="extract.") as tmp:
        say(f"guest: dpkg-deb -x {deb.name}")
        _run(["dpkg-deb", "-x", str(deb), tmp])
        root = Path(tmp)
        vmlinuz = root / "boot" / f"vmlinuz-{kver}"
        moddir = root / "lib" / "modules" / kver
        if not vmlinuz.is_file() or not moddir.is_dir():
            raise GuestError(f"{deb.name} has no boot/vmlinuz-{kver} or lib/modules/{kver}")
        staging = cache_dir / f"{kver}.new"
        shutil.rmtree(staging, ignore_errors=True)
        (staging / "modules").mkdir(parents=True)
        shutil.copy2(vmlinuz, staging / "vmlinuz")
        for i, (name, path) in enumerate(_module_load_order(moddir, WANTED_MODULES)):
            (staging / "modules" / f"{i:02d}-{name}.ko").write_bytes(_read_module(path))
        (staging / "modules.done").write_text("\n".join(WANTED_MODULES) + "\n")
        shutil.rmtree(kdir, ignore_errors=True)
        os.replace(staging, kdir)


def _module_load_order(moddir: Path, wanted: tuple[str, ...]) -> list[tuple[str, Path]]:
    """Modules to insmod, dependencies first; built-in ones are left out.

    ``modules.dep`` is produced by depmod at install time and is not in the .deb, so the
    dependencies are read from each module's ``.modinfo`` (``depends=a,b``).
    """
    builtin = set()
    builtin_file = moddir / "modules.builtin"
    if builtin_file.exists():
        builtin = {_modname(line) for line in builtin_file.read_text().split()}
    files = {_modname(p.name): p for p in (moddir / "kernel").rglob("*.ko*")}
    order: list[tuple[str, Path]] = []
    seen: set[str] = set()

    def visit(name: str) -> None:
        if name in seen or name in builtin:
            return
        seen.add(name)
        if name not in files:
            raise GuestError(f"kernel module {name} is neither built in nor in {moddir}")
        for dep in _module_depends(_read_module(files[name])):
            visit(dep)
        order.append((name, files[name]))

    for name in wanted:
        visit(name)
    return order


def _modname(path: str) -> str:
    base = path.rsplit("/", 1)[-1]
    return base.split(".ko", 1)[0].replace("-", "_")


def _read_module(path: Path) -> bytes:
    data = path.read_bytes()
    if path.name.endswith(".ko.xz"):
        return lzma.decompress(data)
    if path.name.endswith(".ko.zst"):
        return _run_bytes(["zstd", "-dc"], data)
    if path.name.endswith(".ko.gz"):
        return gzip.decompress(data)
    return data


def _run_bytes(cmd: list[str], data: bytes) -> bytes:
    try:
        return subprocess.run(cmd, input=data, check=True, capture_output=True).stdout
    except (FileNotFoundError, subprocess.CalledProcessError) as exc:
        raise GuestError(f"{' '.join(cmd)} failed: {exc}") from exc


def _module_depends(ko: bytes) -> list[str]:
    m = re.search(rb"\x00depends=([^\x00]*)\x00", ko)
    if not m or not m.group(1):
        return []
    return [d.decode().replace("-", "_") for d in m.group(1).split(b",") if d]


# ---- initramfs --------------------------------------------------------------------------------

def _build_initrd(kdir: Path, *, force: bool, say: Callable[[str], None]) -> Path:
    _check_static(BUSYBOX)
    modules = sorted((kdir / "modules").glob("*.ko"))
    digest = hashlib.sha256(LAYOUT_VERSION.encode())
    for path in [HERE / "init.sh", HERE / "guestrec.c", BUSYBOX, *modules]:
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    initrd = kdir / f"initrd-{digest.hexdigest()[:16]}.img"
    if initrd.exists() and not force:
        return initrd
    say(f"guest: building {initrd.name}")
    with tempfile.TemporaryDirectory(dir=kdir, prefix="initrd.") as tmp:
        guestrec = Path(tmp) / "guestrec"
        _run(["gcc", "-static", "-O2", "-Wall", "-s", "-o", str(guestrec),
              str(HERE / "guestrec.c")])
        _check_static(guestrec)
        archive = _Cpio()
        for d in ("bin", "dev", "lib", "lib/modules", "proc", "sys", "tmp", "sbin", "usr",
                  "usr/bin", "usr/sbin"):
            archive.add(d, stat.S_IFDIR | 0o755)
        # The kernel opens /dev/console before /init runs and before devtmpfs is mounted:
        # without this node the guest has no console at all.
        archive.add("dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1))
        archive.add("bin/busybox", stat.S_IFREG | 0o755, BUSYBOX.read_bytes())
        archive.add("bin/sh", stat.S_IFLNK | 0o777, b"busybox")
        archive.add("bin/guestrec", stat.S_IFREG | 0o755, guestrec.read_bytes())
        archive.add("init", stat.S_IFREG | 0o755, (HERE / "init.sh").read_bytes())
        for mod in modules:
            archive.add(f"lib/modules/{mod.name}", stat.S_IFREG | 0o644, mod.read_bytes())
        # Old initramfs images of this kernel are stale now; keep the directory small.
        for old in kdir.glob("initrd-*.img"):
            old.unlink()
        _write_atomic(initrd, gzip.compress(archive.finish(), compresslevel=6, mtime=0))
    return initrd


class _Cpio:
    """A cpio archive in the "newc" format the kernel unpacks into its initial rootfs."""

    def __init__(self) -> None:
        self._buf = io.BytesIO()
        self._ino = 1

    def add(self, name: str, mode: int, data: bytes = b"", *,
            rdev: tuple[int, int] = (0, 0)) -> None:
        """Append one entry (a directory, file, symlink (data = target) or device node)."""
        encoded = name.encode() + b"\0"
        fields = (self._ino, mode, 0, 0, 2 if stat.S_ISDIR(mode) else 1, 0, len(data), 0, 0,
                  rdev[0], rdev[1], len(encoded), 0)
        self._ino += 1
        self._buf.write(b"070701" + b"".join(b"%08X" % f for f in fields) + encoded)
        self._pad()
        self._buf.write(data)
        self._pad()

    def _pad(self) -> None:
        self._buf.write(b"\0" * (-self._buf.tell() % 4))

    def finish(self) -> bytes:
        """Append the trailer and return the archive."""
        self._ino = 0
        self.add("TRAILER!!!", 0)
        return self._buf.getvalue()


def _check_static(path: Path) -> None:
    """Refuse a dynamically linked executable: the initramfs has no libc to load."""
    with open(path, "rb") as f:
        head = f.read(64)
        if head[:4] != b"\x7fELF" or head[4] != 2:
            raise GuestError(f"{path} is not a 64-bit ELF executable")
        phoff, = struct.unpack_from("<Q", head, 0x20)
        phentsize, phnum = struct.unpack_from("<HH", head, 0x36)
        f.seek(phoff)
        table = f.read(phentsize * phnum)
    for i in range(phnum):
        p_type, = struct.unpack_from("<I", table, i * phentsize)
        if p_type == 3:  # PT_INTERP: needs a dynamic loader
            hint = " (install busybox-static)" if path == BUSYBOX else ""
            raise GuestError(f"{path} is dynamically linked{hint}")


# ---- helpers ----------------------------------------------------------------------------------

@contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    """``scripts/build-guest``: build (or find cached) and print the kernel and initrd paths."""
    parser = argparse.ArgumentParser(prog="build-guest", description=__doc__.splitlines()[0])
    parser.add_argument("--force", action="store_true", help="resolve the kernel again and rebuild")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--kernel-package", default=DEFAULT_META_PACKAGE,
                        help="Debian meta package naming the kernel (default: %(default)s)")
    args = parser.parse_args(argv)
    t0 = time.monotonic()
    try:
        image = build(args.cache_dir, meta_package=args.kernel_package, force=args.force,
                      log=lambda msg: print(msg, file=sys.stderr))
    except GuestError as exc:
        print(f"build-guest: {exc}", file=sys.stderr)
        return 2
    print(f"kernel {image.kernel}\ninitrd {image.initrd}\nversion {image.kernel_version}")
    print(f"build-guest: done in {time.monotonic() - t0:.2f}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
