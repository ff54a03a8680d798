"""The trio NBD client against real servers: qemu-nbd (UNIX socket, TCP, TLS) and nbdkit.

Every server is started by the test (tests/nbdservers.py) and stopped in ``finally``.
Contents are checked against the exported file on disk (after a flush).
"""

from __future__ import annotations

import errno
import hashlib
import os
import random
import socket

import pytest
import trio
import trio.testing

from mirrorfs.errors import (
    TargetError,
    TargetFatalError,
    TargetNoSpaceError,
    TargetRetryableError,
    UsageError,
)
from mirrorfs.nbd import proto
from mirrorfs.nbd.client import NBDClient
from nbdservers import make_tls_certs, nbdkit, qemu_nbd

MiB = 1 << 20
SIZE = 16 * MiB


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "export.img"
    with open(path, "wb") as f:
        f.truncate(SIZE)
    return path


def sha(data) -> str:
    return hashlib.sha256(data).hexdigest()


def file_bytes(path, offset=0, length=None) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length if length is not None else -1)


def allocated(path) -> int:
    return os.stat(path).st_blocks * 512


SERVERS = {
    "qemu-nbd-unix": lambda img: qemu_nbd(img, transport="unix"),
    "qemu-nbd-tcp": lambda img: qemu_nbd(img, transport="tcp"),
    "nbdkit-unix": lambda img: nbdkit(img, transport="unix"),
}


@pytest.mark.parametrize("kind", SERVERS)
async def test_round_trip_with_many_requests_in_flight(kind, image):
    rng = random.Random(kind)
    with SERVERS[kind](image) as server:
        with trio.fail_after(30):
            client = await NBDClient.connect(server.uri, timeout=10)
            try:
                assert client.size == SIZE
                for flag in (proto.NBD_FLAG_SEND_FLUSH, proto.NBD_FLAG_SEND_WRITE_ZEROES,
                             proto.NBD_FLAG_SEND_TRIM, proto.NBD_FLAG_SEND_FUA):
                    assert client.flags & flag
                assert client.info.structured_replies
                # 64 writes of 64 KiB..192 KiB at shuffled offsets, all in flight together
                blocks = {i * 256 * 1024: rng.randbytes(rng.choice((64, 128, 192)) * 1024)
                          for i in range(64)}
                async with trio.open_nursery() as nursery:
                    for off, data in blocks.items():
                        nursery.start_soon(client.pwrite, off, data)
                assert client.statistics() == {"in_flight": 0, "closed": False}
                got: dict[int, bytes] = {}

                async def read(off, n):
                    got[off] = bytes(await client.pread(off, n))

                async with trio.open_nursery() as nursery:
                    for off, data in blocks.items():
                        nursery.start_soon(read, off, len(data))
                assert all(sha(got[off]) == sha(data) for off, data in blocks.items())
                await client.pwrite(SIZE - 3, b"end", fua=True)
                await client.flush()
            finally:
                await client.close()
    assert client.closed
    for off, data in blocks.items():
        assert sha(file_bytes(image, off, len(data))) == sha(data)
    assert file_bytes(image, SIZE - 3) == b"end"


async def test_requests_larger_than_max_block_are_split(image):
    data = random.Random(1).randbytes(40 * MiB)
    with open(image, "r+b") as f:
        f.truncate(48 * MiB)
    with qemu_nbd(image) as server:
        with trio.fail_after(30):
            client = await NBDClient.connect(server.uri)
            try:
                assert client.max_request == 32 * MiB
                await client.pwrite(4 * MiB, data)
                assert sha(await client.pread(4 * MiB, len(data))) == sha(data)
                await client.flush()
            finally:
                await client.close()
    assert sha(file_bytes(image, 4 * MiB, len(data))) == sha(data)


async def test_server_block_size_limits_are_honoured(image):
    data = random.Random(2).randbytes(MiB + 4096)
    with nbdkit(image, filters=["blocksize-policy"],
                params=["blocksize-minimum=512", "blocksize-maximum=65536"]) as server:
        with trio.fail_after(20):
            client = await NBDClient.connect(server.uri)
            try:
                assert (client.info.min_block, client.max_request) == (512, 65536)
                await client.pwrite(8192, data)
                assert sha(await client.pread(8192, len(data))) == sha(data)
                with pytest.raises(TargetError, match="not aligned") as info:
                    await client.pwrite(100, b"x" * 512)
                assert info.value.errno == errno.EINVAL
                assert not client.closed  # refused locally, connection fine
                await client.flush()
            finally:
                await client.close()
    assert sha(file_bytes(image, 8192, len(data))) == sha(data)


@pytest.mark.parametrize("kind", ["qemu-nbd", "nbdkit"])
async def test_write_zeroes_punches_holes(kind, image):
    data = random.Random(3).randbytes(4 * MiB)
    ctx = qemu_nbd(image, discard=True) if kind == "qemu-nbd" else nbdkit(image)
    with ctx as server:
        with trio.fail_after(20):
            client = await NBDClient.connect(server.uri)
            try:
                await client.pwrite(MiB, data)
                await client.flush()
                before = allocated(image)
                assert before >= 4 * MiB
                await client.write_zeroes(MiB, 4 * MiB)
                await client.flush()
                assert await client.pread(MiB, 4 * MiB) == bytes(4 * MiB)
            finally:
                await client.close()
    assert file_bytes(image, MiB, 4 * MiB) == bytes(4 * MiB)
    assert allocated(image) <= before - 3 * MiB, "the server did not punch a hole"


async def test_write_zeroes_falls_back_to_zero_writes(image):
    with open(image, "r+b") as f:
        f.write(b"\xff" * (12 * MiB))
    with nbdkit(image, filters=["nozero"]) as server:
        with trio.fail_after(20):
            client = await NBDClient.connect(server.uri)
            try:
                assert not client.flags & proto.NBD_FLAG_SEND_WRITE_ZEROES
                await client.write_zeroes(4096, 10 * MiB + 1)
                await client.flush()
            finally:
                await client.close()
    assert file_bytes(image, 0, 4096) == b"\xff" * 4096
    assert file_bytes(image, 4096, 10 * MiB + 1) == bytes(10 * MiB + 1)
    assert file_bytes(image, 4096 + 10 * MiB + 1, 100) == b"\xff" * 100


async def test_trim(image):
    with qemu_nbd(image) as server:
        client = await NBDClient.connect(server.uri)
        try:
            await client.pwrite(0, b"\1" * MiB)
            assert await client.trim(0, MiB) is True
        finally:
            await client.close()


async def test_read_only_export_is_refused(image):
    with qemu_nbd(image, read_only=True) as server:
        with pytest.raises(TargetFatalError, match="export 'disk' is read-only"):
            await NBDClient.connect(server.uri)
        # for reading it is fine
        client = await NBDClient.connect(server.uri, allow_read_only=True)
        try:
            assert client.flags & proto.NBD_FLAG_READ_ONLY
            with pytest.raises(TargetError, match="read-only"):
                await client.pwrite(0, b"x")
            assert await client.pread(0, 4) == bytes(4)
        finally:
            await client.close()


async def test_unknown_export_is_refused_clearly(image):
    with qemu_nbd(image, export="disk") as server:
        uri = server.uri.replace("/disk?", "/nosuch?")
        with pytest.raises(TargetFatalError) as info:
            await NBDClient.connect(uri)
    message = str(info.value)
    assert "export 'nosuch' refused: no such export on the server" in message
    assert "\n" not in message


async def test_unreachable_server_is_retryable(tmp_path):
    with trio.fail_after(5):
        with pytest.raises(TargetRetryableError, match="cannot connect to nbd\\+unix:///x"):
            await NBDClient.connect(f"nbd+unix:///x?socket={tmp_path}/none")
    with pytest.raises(UsageError):
        await NBDClient.connect("nbd://")


async def test_silent_server_handshake_times_out(tmp_path):
    # a listener that accepts (in the kernel backlog) but never greets
    path = str(tmp_path / "silent.sock")
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(path)
        listener.listen(1)
        start = trio.current_time()
        with pytest.raises(TargetRetryableError, match="no NBD handshake with .* within 0.3 s"):
            await NBDClient.connect(f"nbd+unix:///x?socket={path}", timeout=0.3)
        assert trio.current_time() - start < 1


async def test_server_killed_fails_pending_requests_quickly(image):
    # rdelay keeps the reads pending at the server when it dies
    with nbdkit(image, filters=["delay"], params=["rdelay=3"]) as server:
        client = await NBDClient.connect(server.uri, timeout=10)
        errors: list[BaseException] = []

        async def read(off):
            try:
                await client.pread(off, 4096)
            except TargetError as exc:
                errors.append(exc)

        with trio.fail_after(2):  # far below both rdelay and the timeout
            async with trio.open_nursery() as nursery:
                for i in range(8):
                    nursery.start_soon(read, i * 4096)
                await trio.testing.wait_all_tasks_blocked()
                while client.statistics()["in_flight"] < 8:
                    await trio.sleep(0.01)
                server.kill()
        assert len(errors) == 8
        assert all(type(e) is TargetRetryableError for e in errors)
        assert client.closed
        with pytest.raises(TargetRetryableError, match="is closed"):
            await client.pwrite(0, b"x")
        await client.close()


async def test_no_reply_within_timeout_is_retryable(image):
    with nbdkit(image, filters=["delay"], params=["wdelay=5"]) as server:
        client = await NBDClient.connect(server.uri, timeout=1)
        start = trio.current_time()
        with pytest.raises(TargetRetryableError, match="no reply from .* within 1 s"):
            await client.pwrite(0, b"slow")
        assert 0.9 <= trio.current_time() - start < 2.5
        assert client.closed
        await client.close()


async def test_cancelled_caller_leaves_connection_usable(image):
    with open(image, "r+b") as f:
        f.write(b"0123456789")
    with nbdkit(image, filters=["delay"], params=["rdelay=300ms"]) as server:
        client = await NBDClient.connect(server.uri, timeout=5)
        try:
            with trio.move_on_after(0.05) as scope:
                await client.pread(0, 4)
            assert scope.cancelled_caught
            assert not client.closed
            with trio.fail_after(3):
                assert await client.pread(2, 6) == b"234567"
                assert await client.pread(0, 2) == b"01"
            assert client.statistics()["in_flight"] == 0
        finally:
            await client.close()


@pytest.mark.parametrize("error, exc", [("EIO", TargetError), ("ENOSPC", TargetNoSpaceError),
                                         ("EPERM", TargetError)])
async def test_server_errors_map_to_errno(image, error, exc):
    with nbdkit(image, filters=["error"], params=["error-pwrite-rate=100%", f"error={error}"]) as server:
        client = await NBDClient.connect(server.uri)
        try:
            with pytest.raises(exc) as info:
                await client.pwrite(0, b"x" * 4096)
            assert type(info.value) is exc
            assert info.value.errno == getattr(errno, error)
            assert "NBD write on" in str(info.value)
            # one failed request does not break the connection
            assert not client.closed
            assert await client.pread(0, 4) == bytes(4)
        finally:
            await client.close()


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    base = tmp_path_factory.mktemp("pki")
    return make_tls_certs(base / "good"), make_tls_certs(base / "other")


@pytest.mark.parametrize("transport", ["tcp", "unix"])
async def test_tls_round_trip(certs, image, transport):
    good, _ = certs
    data = random.Random(4).randbytes(3 * MiB)
    with qemu_nbd(image, transport=transport, tls_dir=good) as server:
        assert server.uri.startswith("nbds")
        with trio.fail_after(20):
            client = await NBDClient.connect(server.uri)
            try:
                await client.pwrite(MiB, data)
                assert sha(await client.pread(MiB, len(data))) == sha(data)
                await client.flush()
            finally:
                await client.close()
    assert sha(file_bytes(image, MiB, len(data))) == sha(data)


async def test_tls_wrong_ca_and_plain_text_refused(certs, image):
    good, other = certs
    with qemu_nbd(image, transport="tcp", tls_dir=good) as server:
        wrong = server.uri.replace(str(good), str(other))
        with pytest.raises(TargetFatalError, match="TLS certificate of nbds://127.0.0.1:.* is not trusted"):
            await NBDClient.connect(wrong)
        wrong_name = server.uri + "&tls-hostname=elsewhere.example"
        with pytest.raises(TargetFatalError, match="not trusted"):
            await NBDClient.connect(wrong_name)
        plain = server.uri.replace("nbds://", "nbd://").split("?")[0]
        with pytest.raises(TargetFatalError, match="requires TLS"):
            await NBDClient.connect(plain)
        # the server requires a client certificate (qemu's verify-peer=yes default)
        no_client_cert = good.parent / "ca-only"
        no_client_cert.mkdir(exist_ok=True)
        (no_client_cert / "ca-cert.pem").write_bytes((good / "ca-cert.pem").read_bytes())
        with pytest.raises(TargetRetryableError, match="requires a client certificate, put "
                                                      "client-cert.pem and client-key.pem"):
            client = await NBDClient.connect(server.uri.replace(str(good), str(no_client_cert)))
            await client.pread(0, 512)
        # and the server still serves a correct client afterwards
        client = await NBDClient.connect(server.uri)
        await client.close()
    assert file_bytes(image) == bytes(SIZE)


async def test_random_cancellations_never_desynchronise(image):
    """Readers and waiters cancelled at random points (the reader role changes hands all the
    time): every request that is not cancelled gets exactly its own bytes."""
    rng = random.Random(7)
    content = rng.randbytes(SIZE)
    with open(image, "wb") as f:
        f.write(content)
    with nbdkit(image, filters=["delay"], params=["rdelay=20ms", "wdelay=20ms"]) as server:
        client = await NBDClient.connect(server.uri, timeout=5)
        results = {"ok": 0, "cancelled": 0}

        async def worker(seed):
            r = random.Random(seed)
            for _ in range(15):
                off = r.randrange(0, SIZE - 65536)
                n = r.randrange(1, 65536)
                with trio.move_on_after(r.choice((0, 0.005, 0.015, 0.03, 1))) as scope:
                    if r.random() < 0.2:
                        await client.pwrite(off, content[off:off + n])  # same bytes: no change
                    else:
                        data = await client.pread(off, n)
                        assert data == content[off:off + n]
                results["cancelled" if scope.cancelled_caught else "ok"] += 1

        try:
            with trio.fail_after(30):
                async with trio.open_nursery() as nursery:
                    for seed in range(24):
                        nursery.start_soon(worker, seed)
            assert not client.closed
            assert client.statistics()["in_flight"] == 0
            assert results["ok"] > 50 and results["cancelled"] > 50, results
            assert await client.pread(0, 4096) == content[:4096]
        finally:
            await client.close()


@pytest.mark.parametrize("kind", ["qemu-nbd-unix", "nbdkit-unix"])
async def test_random_operations_match_a_model(kind, image):
    """Random writes (unaligned too, some FUA), zeroes and reads from 6 tasks on
    disjoint regions, checked against an in-memory model and finally against the file."""
    model = bytearray(SIZE)
    region = SIZE // 6
    with SERVERS[kind](image) as server:
        client = await NBDClient.connect(server.uri)

        async def worker(i):
            r = random.Random(100 + i)
            base = i * region
            for _ in range(60):
                off = base + r.randrange(0, region - 1)
                n = r.randrange(1, min(region - (off - base), 300 * 1024) + 1)
                op = r.random()
                if op < 0.5:
                    data = r.randbytes(n)
                    await client.pwrite(off, data, fua=r.random() < 0.1)
                    model[off:off + n] = data
                elif op < 0.7:
                    await client.write_zeroes(off, n)
                    model[off:off + n] = bytes(n)
                else:
                    assert await client.pread(off, n) == model[off:off + n]

        try:
            with trio.fail_after(30):
                async with trio.open_nursery() as nursery:
                    for i in range(6):
                        nursery.start_soon(worker, i)
                assert sha(await client.pread(0, SIZE)) == sha(model)
                await client.flush()
        finally:
            await client.close()
    assert sha(file_bytes(image)) == sha(model)


async def test_flush_behind_an_unread_reply_is_not_delayed(image):
    """qemu-nbd leaves Nagle on: a FLUSH reply waits for the ACK of the WRITE reply before it,
    which a delayed ACK holds for 40 ms unless the client acknowledges at once."""
    with qemu_nbd(image, transport="tcp") as server:
        with trio.fail_after(60):
            client = await NBDClient.connect(server.uri, timeout=10)
            try:
                took = []
                for i in range(30):
                    start = trio.current_time()
                    # As a guest's flush behind a background duplicate: the flush is sent while
                    # the write's reply is still on its way.
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(client.pwrite, i * 4096, os.urandom(4096))
                        await trio.sleep(0)
                        nursery.start_soon(client.flush)
                    took.append(trio.current_time() - start)
            finally:
                await client.close()
    took.sort()
    assert took[len(took) // 2] < 0.02, f"median write+flush {took[len(took) // 2] * 1e3:.1f} ms"
