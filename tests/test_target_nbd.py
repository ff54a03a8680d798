"""NBDTarget: the Target contract over real qemu-nbd / nbdkit servers, including reconnects."""

from __future__ import annotations

import errno
import hashlib
import os
import random
import signal

import pytest
import trio

from mirrorfs.errors import (
    TargetError,
    TargetFatalError,
    TargetNoSpaceError,
    TargetRetryableError,
    UsageError,
)
from mirrorfs.targets.base import Target
from mirrorfs.targets.nbd import NBDTarget
from nbdservers import make_tls_certs, nbdkit, qemu_nbd

MiB = 1 << 20
SIZE = 8 * MiB


def make_image(path, size=SIZE):
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def digest(path) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


async def test_target_contract(tmp_path):
    image = make_image(tmp_path / "t.img")
    data = random.Random(5).randbytes(3 * MiB)
    with qemu_nbd(image) as server:
        target = NBDTarget(server.uri)
        assert isinstance(target, Target)
        assert target.description == server.uri
        assert not target.connected
        with pytest.raises(TargetRetryableError, match="not connected"):
            await target.pwrite(0, b"x")
        await target.connect()
        try:
            assert target.connected and target.size == SIZE
            await target.pwrite(MiB, data)
            await target.write_zeroes(2 * MiB, 4096)
            await target.flush()
            expected = bytearray(data)
            expected[MiB:MiB + 4096] = bytes(4096)
            assert await target.pread(MiB, len(data)) == expected
            # reads are clipped at the end of the device; writes past it are refused
            assert len(await target.pread(SIZE - 10, 100)) == 10
            with pytest.raises(TargetError, match="outside") as info:
                await target.pwrite(SIZE - 1, b"xy")
            assert info.value.errno == errno.EINVAL
            assert target.connected
        finally:
            await target.close()
            await target.close()  # idempotent
        assert not target.connected
    with open(image, "rb") as f:
        f.seek(MiB)
        assert hashlib.sha256(f.read(len(data))).digest() == hashlib.sha256(expected).digest()


def test_bad_uri_is_a_usage_error():
    with pytest.raises(UsageError, match="needs \\?socket=PATH"):
        NBDTarget("nbd+unix:///disk")


@pytest.mark.parametrize("transport", ["unix", "tcp"])
async def test_reconnect_to_restarted_server_on_same_file(tmp_path, transport):
    image = make_image(tmp_path / "t.img")
    with qemu_nbd(image, transport=transport) as server:
        target = NBDTarget(server.uri, timeout=5)
        await target.connect()
        try:
            await target.pwrite(0, b"before")
            await target.flush()
            server.kill()
            with trio.fail_after(2):
                with pytest.raises(TargetRetryableError):
                    await target.pwrite(4096, b"lost")
            assert not target.connected
            with pytest.raises(TargetRetryableError, match="cannot connect"):
                await target.connect()
            server.start()  # same socket, same file
            await target.connect()
            assert target.connected
            assert await target.pread(0, 6) == b"before"
            await target.pwrite(8192, b"after")
            await target.flush()
        finally:
            await target.close()
    with open(image, "rb") as f:
        assert f.read(6) == b"before"
        f.seek(8192)
        assert f.read(5) == b"after"


async def test_reconnect_to_different_size_is_refused_and_writes_nothing(tmp_path):
    image = make_image(tmp_path / "t.img")
    other = make_image(tmp_path / "other.img", SIZE * 2)
    with qemu_nbd(image) as server:
        target = NBDTarget(server.uri)
        await target.connect()
        server.kill()
        server.argv[-1] = str(other)  # the server comes back exporting another file
        server.start()
        before = digest(other)
        with pytest.raises(TargetFatalError, match=f"is {SIZE * 2} bytes but the target was {SIZE}"):
            await target.connect()
        assert not target.connected
        with pytest.raises(TargetRetryableError):
            await target.pwrite(0, b"must not land")
        await target.close()
    assert digest(other) == before


async def test_reconnect_to_different_export_is_refused(tmp_path):
    image = make_image(tmp_path / "t.img")
    with qemu_nbd(image, extra=["--description", "vm1 disk"]) as server:
        target = NBDTarget(server.uri)
        await target.connect()
        server.kill()
        server.argv[server.argv.index("vm1 disk")] = "vm2 disk"
        server.start()
        with pytest.raises(TargetFatalError, match="refusing to write to a different export"):
            await target.connect()
        await target.close()


async def test_expected_size_checked_on_first_connect(tmp_path):
    image = make_image(tmp_path / "t.img")
    with nbdkit(image) as server:
        target = NBDTarget(server.uri, expected_size=SIZE + 512)
        with pytest.raises(TargetFatalError, match=f"is {SIZE} bytes, but {SIZE + 512} bytes are "
                                                   f"needed: give a target of the image's size"):
            await target.connect()
        assert not target.connected


async def test_enospc_and_eio_from_the_server(tmp_path):
    image = make_image(tmp_path / "t.img")
    with nbdkit(image, filters=["error"],
                params=["error-pwrite-rate=100%", "error=ENOSPC",
                        "error-zero-rate=100%"]) as server:
        target = NBDTarget(server.uri)
        await target.connect()
        try:
            with pytest.raises(TargetNoSpaceError):
                await target.pwrite(0, b"x" * 512)
            with pytest.raises(TargetNoSpaceError):
                await target.write_zeroes(0, 4096)
            assert target.connected
            await target.flush()
        finally:
            await target.close()
    with nbdkit(image, filters=["error"], params=["error-pread-rate=100%", "error=EIO"]) as server:
        target = NBDTarget(server.uri)
        await target.connect()
        try:
            with pytest.raises(TargetError) as info:
                await target.pread(0, 512)
            assert type(info.value) is TargetError and info.value.errno == errno.EIO
        finally:
            await target.close()
    assert digest(image) == hashlib.sha256(bytes(SIZE)).hexdigest()


async def test_slow_target_times_out_then_reconnects(tmp_path):
    image = make_image(tmp_path / "t.img")
    with nbdkit(image, filters=["delay"], params=["delay-write=3"]) as server:
        target = NBDTarget(server.uri, timeout=0.5)
        await target.connect()
        start = trio.current_time()
        with pytest.raises(TargetRetryableError, match="within 0.5 s"):
            await target.pwrite(0, b"x")
        assert trio.current_time() - start < 1.5
        assert not target.connected
        await target.connect()  # the server itself is fine: reconnecting works
        assert await target.pread(0, 1) in (b"x", b"\0")
        await target.close()


async def test_tls_target(tmp_path):
    certs = make_tls_certs(tmp_path / "pki")
    image = make_image(tmp_path / "t.img")
    with qemu_nbd(image, transport="unix", tls_dir=certs) as server:
        target = NBDTarget(server.uri)
        assert "tls-certificates" not in target.description
        await target.connect()
        try:
            await target.pwrite(0, b"secret")
            await target.flush()
        finally:
            await target.close()
    with open(image, "rb") as f:
        assert f.read(6) == b"secret"


async def test_frozen_server_times_out_and_comes_back(tmp_path):
    """A server that stops answering (SIGSTOP: no EOF, no reset) costs at most the timeout."""
    image = make_image(tmp_path / "t.img")
    with qemu_nbd(image) as server:
        target = NBDTarget(server.uri, timeout=0.5)
        await target.connect()
        try:
            os.kill(server.proc.pid, signal.SIGSTOP)
            try:
                start = trio.current_time()
                with pytest.raises(TargetRetryableError, match="within 0.5 s"):
                    await target.pwrite(0, b"frozen")
                assert trio.current_time() - start < 1.5
                with pytest.raises(TargetRetryableError, match="no NBD handshake"):
                    await target.connect()
                assert trio.current_time() - start < 2.5
            finally:
                os.kill(server.proc.pid, signal.SIGCONT)
            with trio.fail_after(5):
                await target.connect()
            await target.pwrite(0, b"thawed")
            await target.flush()
        finally:
            await target.close()
    with open(image, "rb") as f:
        assert f.read(6) == b"thawed"
