"""Replication to real NBD servers through a real mount (issue 6, Done when 1 and 5).

qemu-nbd on a UNIX socket and on TCP 127.0.0.1 and ``nbdkit file``: mirror, ready, complete with
and without pivot; the server's file compares identical with ``qemu-img compare``. After a pivot
the mount forwards reads and writes to the NBD server: a write then lands in the server's file and
not in the source. TLS: qemu-nbd with ``tls-creds-x509`` and certificates made here; a client
holding another CA is refused with one clear line and exit code 2.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import pytest

from compare import assert_identical
from nbdservers import make_tls_certs, nbdkit, qemu_nbd
from test_replication_support import make_blank, make_image, qmp, wait_ready

SIZE = 8 << 20


def _server(kind: str, path: Path, **kw: Any) -> contextlib.AbstractContextManager:
    if kind == "qemu-nbd-unix":
        return qemu_nbd(path, transport="unix", **kw)
    if kind == "qemu-nbd-tcp":
        return qemu_nbd(path, transport="tcp", **kw)
    assert kind == "nbdkit-file"
    return nbdkit(path, transport="unix", **kw)


@pytest.mark.parametrize("pivot", [False, True], ids=["no-pivot", "pivot"])
@pytest.mark.parametrize("kind", ["qemu-nbd-unix", "qemu-nbd-tcp", "nbdkit-file"])
def test_mirror_to_nbd_then_complete(mount_factory: Any, tmp_path: Path, kind: str, pivot: bool) -> None:
    mount = mount_factory()
    source = mount.source / "vm.raw"
    make_image(source, SIZE)
    served = tmp_path / "served.raw"
    make_blank(served, SIZE)
    with _server(kind, served) as server:
        try:
            mount.cli("mirror", mount.mountpoint, "vm.raw", server.uri)
            with qmp(mount) as client:
                job = wait_ready(client, "vm.raw")
                assert job["target"] == server.uri
                assert job["offset"] == job["len"] == SIZE and job["dirty-bytes"] == 0
                # nothing was lost on the way: the bytes the job counted cover the whole image
                moved = job["__org.mirrorfs_copied-bytes"] + job["__org.mirrorfs_zeroed-bytes"]
                assert moved >= SIZE
            args = ["complete", mount.mountpoint, "vm.raw"] + ([] if pivot else ["--no-pivot"])
            mount.cli(*args)
            assert mount.cli("status", mount.mountpoint).stdout == "no jobs\n"
            assert_identical(source, served)
            before = source.read_bytes()
            marker = os.urandom(65536)
            with open(mount.mountpoint / "vm.raw", "r+b", buffering=0) as f:
                f.seek(1 << 20)
                f.write(marker)
                os.fsync(f.fileno())
                f.seek(1 << 20)
                assert f.read(len(marker)) == marker
            with open(served, "rb") as f:
                f.seek(1 << 20)
                on_server = f.read(len(marker))
            if pivot:
                # the image now lives on the NBD server: the write went there, not to the source
                assert on_server == marker
                assert source.read_bytes() == before
            else:
                # the mount stayed on the source: the write went there only
                assert on_server != marker
                assert source.read_bytes()[1 << 20:(1 << 20) + len(marker)] == marker
        finally:
            mount.unmount()  # before the server goes: a pivoted image still talks to it


def test_mirror_over_tls(mount_factory: Any, tmp_path: Path) -> None:
    certs = make_tls_certs(tmp_path / "pki")
    mount = mount_factory()
    source = mount.source / "vm.raw"
    make_image(source, SIZE)
    served = tmp_path / "served.raw"
    make_blank(served, SIZE)
    with qemu_nbd(served, transport="unix", tls_dir=certs) as server:
        try:
            assert server.uri.startswith("nbds+unix://") and f"tls-certificates={certs}" in server.uri
            mount.cli("mirror", mount.mountpoint, "vm.raw", server.uri)
            with qmp(mount) as client:
                wait_ready(client, "vm.raw")
            mount.cli("complete", mount.mountpoint, "vm.raw", "--no-pivot")
            assert_identical(source, served)
        finally:
            mount.unmount()


def _wrong_ca_attempt(mount_factory: Any, tmp_path: Path) -> tuple[Any, Path]:
    """Mirror to a TLS qemu-nbd with another CA's certificates; returns (CLI result, served file)."""
    certs = make_tls_certs(tmp_path / "pki")
    other = make_tls_certs(tmp_path / "other-pki")  # another CA, and client certs it signed
    mount = mount_factory()
    make_image(mount.source / "vm.raw", SIZE)
    served = tmp_path / "served.raw"
    make_blank(served, SIZE)
    with qemu_nbd(served, transport="tcp", tls_dir=certs) as server:
        try:
            bad_uri = server.uri.replace(str(certs), str(other))
            assert bad_uri.startswith("nbds://127.0.0.1:") and str(other) in bad_uri
            r = mount.cli("mirror", mount.mountpoint, "vm.raw", bad_uri, check=False)
            assert mount.cli("status", mount.mountpoint).stdout == "no jobs\n"
        finally:
            mount.unmount()
    return r, served


def test_tls_with_a_wrong_ca_is_refused(mount_factory: Any, tmp_path: Path) -> None:
    r, served = _wrong_ca_attempt(mount_factory, tmp_path)
    assert r.returncode == 2, (r.returncode, r.stderr)  # bad input: the CA given is not the server's
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert lines[0].startswith("mirrorfs mirror: cannot use target nbds://127.0.0.1:"), lines
    assert "is not trusted" in lines[0] and "check the CA in tls-certificates" in lines[0], lines
    assert served.read_bytes() == bytes(SIZE)  # nothing was written to the server


def test_documented_timeout_and_backoff_match_the_code() -> None:
    """docs/replication.md promises users a timeout and a backoff: they are the code's."""
    import re

    from mirrorfs.mirror.copy import COMMIT_INTERVAL
    from mirrorfs.mirror.failures import RECONNECT_BACKOFF
    from mirrorfs.nbd.client import DEFAULT_TIMEOUT

    doc = (Path(__file__).parent.parent / "docs" / "replication.md").read_text()
    assert re.search(rf"within \*\*{DEFAULT_TIMEOUT:g} s\*\*", doc), "timeout"
    first, cap = RECONNECT_BACKOFF
    assert f"first after {first:g} s, then" in doc and f"{cap:g}, {cap:g}, {cap:g} ... s" in doc, "backoff"
    assert f"at least every {'second' if COMMIT_INTERVAL == 1 else f'{COMMIT_INTERVAL:g} s'}" in doc
