"""The trio QMP server on a real UNIX socket (tiers b and c).

Conformance oracle: QEMU's own client library ``qemu.qmp`` (asyncio, run in a thread so the
server keeps running in the test's trio loop) and its ``qmp-shell`` console script. Raw socket
clients check what the library hides: several clients at once, junk, slow readers, bugs.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import socket
import stat
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qmp_thread import QMPServerThread
from mirrorfs.control.qmp_server import QMPServer
from mirrorfs.errors import ControlError, MountError

QMP_SHELL = Path(sys.executable).with_name("qmp-shell")


class FakeHandler:
    """A handler with a few commands that exercise every path of the server."""

    def __init__(self) -> None:
        self.server: QMPServer | None = None
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def command_names(self) -> list[str]:
        return ["echo", "fail", "refuse", "crash", "emit", "slow", "bad-return"]

    async def execute(self, name: str, arguments: dict[str, Any]) -> Any:
        self.calls.append((name, arguments))
        if name == "echo":
            return arguments
        if name == "fail":
            raise ControlError(f"Block job '{arguments.get('device')}' not found", qmp_class="DeviceNotFound")
        if name == "refuse":
            raise ControlError("The active block job 'a' cannot be completed", qmp_class="GenericError")
        if name == "crash":
            raise ZeroDivisionError("boom")
        if name == "emit":
            assert self.server is not None
            for _ in range(arguments.get("count", 1)):
                self.server.emit(arguments["event"], arguments.get("data", {}))
            return {}
        if name == "slow":
            await trio.sleep(arguments["seconds"])
            return {"slept": arguments["seconds"]}
        if name == "bad-return":
            return {"x": object()}
        raise AssertionError(name)


@pytest.fixture
def sockdir() -> Iterator[str]:
    # Short: UNIX socket paths are limited to 108 bytes, pytest's tmp_path can be longer.
    d = tempfile.mkdtemp(prefix="qmp", dir="/tmp")
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
async def served(nursery: trio.Nursery, sockdir: str) -> Any:
    handler = FakeHandler()
    server = QMPServer(os.path.join(sockdir, "qmp.sock"), handler, event_queue_size=8)
    handler.server = server
    await nursery.start(server.run)
    yield server, handler
    server.stop()


class RawClient:
    """A raw trio socket client: bytes in, decoded JSON lines out."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buf = b""

    @classmethod
    async def connect(cls, path: str, negotiate: bool = True) -> "RawClient":
        client = cls(await trio.open_unix_socket(path))
        greeting = await client.recv()
        assert "QMP" in greeting
        if negotiate:
            assert await client.command("qmp_capabilities") == {"return": {}}
        return client

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def recv(self) -> dict[str, Any]:
        while b"\n" not in self.buf:
            data = await self.stream.receive_some(65536)
            if not data:
                raise EOFError("server closed the connection")
            self.buf += data
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    async def command(self, name: str, arguments: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
        msg: dict[str, Any] = {"execute": name, **extra}
        if arguments is not None:
            msg["arguments"] = arguments
        await self.send(json.dumps(msg).encode() + b"\n")
        while True:
            reply = await self.recv()
            if "event" not in reply:
                return reply


# ---------------------------------------------------------------------------- qemu.qmp oracle

def _qemu_qmp_session(path: str) -> dict[str, Any]:
    """Drive the server with qemu.qmp.QMPClient (asyncio) and collect what it saw."""
    from qemu.qmp import ExecuteError, QMPClient

    async def main() -> dict[str, Any]:
        seen: dict[str, Any] = {}
        client = QMPClient("mirrorfs-test")
        await client.connect(path)
        seen["greeting"] = client.greeting._asdict() if client.greeting else None
        seen["version"] = await client.execute("query-version")
        seen["commands"] = await client.execute("query-commands")
        seen["echo"] = await client.execute("echo", {"device": "disk.img", "n": [1, 2]})
        try:
            await client.execute("fail", {"device": "nope.img"})
        except ExecuteError as exc:
            seen["fail"] = (exc.error_class, exc.error.error.desc)
        try:
            await client.execute("no-such-command")
        except ExecuteError as exc:
            seen["unknown"] = (exc.error_class, exc.error.error.desc)
        await client.execute("emit", {"event": "BLOCK_JOB_READY",
                                      "data": {"device": "disk.img", "type": "mirror"}})
        event = await asyncio.wait_for(client.events.get(), 10)
        seen["event"] = (event["event"], dict(event["data"]), set(event["timestamp"]))
        await client.disconnect()
        return seen

    return asyncio.run(main())


async def test_qemu_qmp_client_conformance(served: Any) -> None:
    server, handler = served
    with trio.fail_after(30):
        seen = await trio.to_thread.run_sync(_qemu_qmp_session, server.path)
    assert seen["greeting"]["QMP"]["version"]["package"].startswith("mirrorfs ")
    assert seen["greeting"]["QMP"]["capabilities"] == []
    assert seen["version"] == seen["greeting"]["QMP"]["version"]
    names = [c["name"] for c in seen["commands"]]
    assert names[:3] == ["qmp_capabilities", "query-version", "query-commands"]
    assert set(names[3:]) == set(handler.command_names())
    assert seen["echo"] == {"device": "disk.img", "n": [1, 2]}
    assert seen["fail"] == ("DeviceNotFound", "Block job 'nope.img' not found")
    assert seen["unknown"] == ("CommandNotFound", "The command no-such-command has not been found")
    assert seen["event"] == ("BLOCK_JOB_READY", {"device": "disk.img", "type": "mirror"},
                             {"seconds", "microseconds"})
    assert ("echo", {"device": "disk.img", "n": [1, 2]}) in handler.calls


async def test_qmp_shell_runs_one_command(served: Any) -> None:
    server, _ = served
    with trio.fail_after(60):
        result = await trio.run_process([str(QMP_SHELL), server.path], stdin=b"echo device=vda n=3\n",
                                        capture_stdout=True, capture_stderr=True, check=False)
    out = result.stdout.decode()
    assert result.returncode == 0, result.stderr.decode()
    assert "Connected to QEMU 0.1.0" in out
    replies = [json.loads(line[line.index("{"):]) for line in out.splitlines() if '"return"' in line]
    assert replies == [{"return": {"device": "vda", "n": 3}}]


# ---------------------------------------------------------------------------- socket file

async def test_socket_is_0600_and_removed_on_stop(sockdir: str) -> None:
    path = os.path.join(sockdir, "sub", "qmp.sock")
    server = QMPServer(path, FakeHandler())
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        st_ = os.lstat(path)
        assert stat.S_ISSOCK(st_.st_mode) and stat.S_IMODE(st_.st_mode) == 0o600
        assert stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode) == 0o700
        server.stop()
    assert not os.path.exists(path)


async def test_cancelled_server_removes_socket(sockdir: str) -> None:
    path = os.path.join(sockdir, "qmp.sock")
    server = QMPServer(path, FakeHandler())
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        client = await RawClient.connect(path)  # a client connected while we shut down
        nursery.cancel_scope.cancel()
    assert not os.path.exists(path)
    with pytest.raises((EOFError, trio.BrokenResourceError)):
        await client.command("echo")


async def test_stale_socket_replaced_live_or_foreign_refused(sockdir: str) -> None:
    path = os.path.join(sockdir, "qmp.sock")
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(path)
    stale.close()  # the file stays, nobody listens: what a SIGKILLed mount leaves behind
    server = QMPServer(path, FakeHandler())
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        client = await RawClient.connect(path)
        assert (await client.command("echo", {"a": 1}))["return"] == {"a": 1}
        # A second server on the same path must not steal the live socket.
        with pytest.raises(MountError, match="in use by a running server"):
            await QMPServer(path, FakeHandler()).run()
        assert (await client.command("echo", {"a": 2}))["return"] == {"a": 2}
        server.stop()
    foreign = os.path.join(sockdir, "notasocket")
    Path(foreign).write_text("precious")
    with pytest.raises(MountError, match="exists and is not a socket"):
        await QMPServer(foreign, FakeHandler()).run()
    assert Path(foreign).read_text() == "precious"


# ---------------------------------------------------------------------------- commands and errors

async def test_server_commands_and_errors(served: Any, caplog: pytest.LogCaptureFixture) -> None:
    server, handler = served
    c = await RawClient.connect(server.path, negotiate=False)
    assert await c.command("echo", id=1) == {"error": {"class": "CommandNotFound", "desc":
                                             "Expecting capabilities negotiation with 'qmp_capabilities'"}, "id": 1}
    assert handler.calls == [], "nothing may run before negotiation"
    assert await c.command("qmp_capabilities", id="n") == {"return": {}, "id": "n"}
    assert await c.command("query-version", {"x": 1}, id=2) == \
        {"error": {"class": "GenericError", "desc": "Parameter 'x' is unexpected",
                   "__org.mirrorfs_exit-code": 2}, "id": 2}
    assert await c.command("nope", id=3) == \
        {"error": {"class": "CommandNotFound", "desc": "The command nope has not been found",
                   "__org.mirrorfs_exit-code": 2}, "id": 3}
    assert await c.command("refuse", id=4) == \
        {"error": {"class": "GenericError", "desc": "The active block job 'a' cannot be completed",
                   "__org.mirrorfs_exit-code": 1}, "id": 4}
    with caplog.at_level(logging.ERROR, logger="mirrorfs.control.qmp_server"):
        reply = await c.command("crash", id=5)
        assert reply == {"error": {"class": "GenericError", "desc": "internal error: ZeroDivisionError('boom')"},
                         "id": 5}
        with pytest.raises(EOFError):  # a bug closes that client, after its reply
            await c.recv()
        c = await RawClient.connect(server.path)
        reply = await c.command("bad-return", id=6)
        assert reply["error"]["desc"].startswith("internal error: cannot encode QMP message")
        with pytest.raises(EOFError):
            await c.recv()
    assert any("ZeroDivisionError: boom" in (r.exc_text or "") for r in caplog.records), "traceback must be logged"
    # The server survived both bugs.
    c = await RawClient.connect(server.path)
    assert await c.command("echo", {"k": "v"}, id=7) == {"return": {"k": "v"}, "id": 7}


# ---------------------------------------------------------------------------- failure containment

def _tracebacks(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.exc_info or r.exc_text]


async def _assert_contained(server: QMPServer, bystander: "RawClient", victim: "RawClient",
                            caplog: pytest.LogCaptureFixture, marker: str) -> None:
    """The victim is disconnected, the bug logged once with its traceback, everyone else served."""
    with trio.fail_after(10):
        with pytest.raises((EOFError, trio.BrokenResourceError)):
            while True:
                await victim.recv()
        assert (await bystander.command("echo", {"still": "here"}, id="b"))["return"] == {"still": "here"}
        fresh = await RawClient.connect(server.path)
        assert (await fresh.command("echo", {"n": 1}))["return"] == {"n": 1}
        while server.statistics()["clients"] != 2:
            await trio.sleep(0.01)
    logged = _tracebacks(caplog)
    assert len(logged) == 1, [r.getMessage() for r in logged]
    assert marker in logging.Formatter().format(logged[0]), logged[0]


async def test_exception_injected_into_a_handler_closes_that_client_only(
        served: Any, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    server, handler = served
    bystander = await RawClient.connect(server.path)
    victim = await RawClient.connect(server.path)
    original = handler.execute

    async def poisoned(name: str, arguments: dict[str, Any]) -> Any:
        if arguments.get("poison"):
            raise KeyError("injected into the handler")
        return await original(name, arguments)

    monkeypatch.setattr(handler, "execute", poisoned)
    with caplog.at_level(logging.DEBUG, logger="mirrorfs.control.qmp_server"):
        assert await victim.command("echo", {"poison": True}, id=9) == \
            {"error": {"class": "GenericError", "desc": "internal error: KeyError('injected into the handler')"},
             "id": 9}
        await _assert_contained(server, bystander, victim, caplog, "injected into the handler")


async def test_exception_injected_into_the_protocol_core_closes_that_client_only(
        served: Any, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever raises while a client is served (here: the core, which promises never to) ends
    that client's task only; nothing reaches the server's nursery."""
    import mirrorfs.control.qmp_proto as proto

    server, handler = served
    bystander = await RawClient.connect(server.path)
    victim = await RawClient.connect(server.path)
    original = proto._check_command

    def poisoned(msg: Any) -> Any:
        if isinstance(msg, dict) and "poison" in msg.get("arguments", {}):
            raise RuntimeError("injected into the core")
        return original(msg)

    monkeypatch.setattr(proto, "_check_command", poisoned)
    with caplog.at_level(logging.DEBUG, logger="mirrorfs.control.qmp_server"):
        await victim.send(b'{"execute": "echo", "arguments": {"poison": 1}}\n')
        await _assert_contained(server, bystander, victim, caplog, "injected into the core")


async def test_exception_injected_into_the_event_writer_closes_that_client_only(
        served: Any, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    server, handler = served
    bystander = await RawClient.connect(server.path)
    victim = await RawClient.connect(server.path)
    [victim_client] = [c for n, c in server._clients.items() if n == max(server._clients)]
    original = victim_client.send

    async def poisoned(data: bytes) -> None:
        if b'"event"' in data:
            raise ValueError("injected into the event writer")
        await original(data)

    monkeypatch.setattr(victim_client, "send", poisoned)
    with caplog.at_level(logging.DEBUG, logger="mirrorfs.control.qmp_server"):
        server.emit("SOME_EVENT", {"n": 1})
        with trio.fail_after(10):
            assert (await bystander.recv())["event"] == "SOME_EVENT"
        await _assert_contained(server, bystander, victim, caplog, "injected into the event writer")


async def test_many_clients_at_once_and_a_misbehaving_one(served: Any) -> None:
    server, handler = served
    results: dict[int, Any] = {}

    async def worker(i: int) -> None:
        c = await RawClient.connect(server.path)
        # Each asks the server to sleep, so the commands overlap in time.
        assert (await c.command("slow", {"seconds": 0.2}, id=i))["return"] == {"slept": 0.2}
        results[i] = (await c.command("echo", {"i": i}, id=i))["return"]

    async def vandal() -> None:
        c = await RawClient.connect(server.path)
        await c.send(b'\x00\xff{"execute": ' + os.urandom(300) + b"\n")
        await c.send(b'{"execute": "slow", "arguments": {"seconds": 5}}')
        await c.stream.aclose()  # disconnects while its command runs

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(vandal)
            for i in range(12):
                nursery.start_soon(worker, i)
    assert results == {i: {"i": i} for i in range(12)}
    with trio.fail_after(10):
        while server.statistics()["clients"]:
            await trio.sleep(0.01)
    assert server.statistics()["connections"] == 13


async def test_huge_line_refused_then_connection_usable(served: Any) -> None:
    server, handler = served
    c = await RawClient.connect(server.path)
    with trio.fail_after(20):
        await c.send(b'{"execute": "echo", "arguments": {"pad": "' + b"z" * (3 << 20) + b'"}, "id": 1}\n')
        reply = await c.recv()
        assert reply == {"error": {"class": "GenericError",
                                   "desc": "JSON parse error, value longer than 1048576 bytes"}}
        assert await c.command("echo", {"after": 1}, id=2) == {"return": {"after": 1}, "id": 2}
    assert [name for name, _ in handler.calls] == ["echo"]


async def test_events_broadcast_to_negotiated_clients_only_and_slow_client_dropped(served: Any) -> None:
    server, _ = served
    fast = await RawClient.connect(server.path)
    unnegotiated = await RawClient.connect(server.path, negotiate=False)
    slow = await RawClient.connect(server.path)
    # Ask for a final reply from `slow` and then never read again: its socket buffers fill up.
    await slow.send(b'{"execute": "echo", "arguments": {"pad": "' + b"x" * 100 + b'"}}\n')
    with trio.fail_after(20):
        total = 0
        # Enough events with big payloads to fill the kernel buffers and then slow's queue (8).
        while server.statistics()["dropped"] == 0:
            server.emit("BIG", {"pad": "y" * 65536, "n": total})
            total += 1
            seen = await fast.recv()
            assert seen["event"] == "BIG" and seen["data"]["n"] == total - 1
            await trio.sleep(0)
            assert total < 10000, "the slow client was never dropped"
        # The engine never blocked; the fast client keeps getting everything.
        server.emit("JOB_STATUS_CHANGE", {"id": "a", "status": "ready"})
        ev = await fast.recv()
        assert ev["event"] == "JOB_STATUS_CHANGE" and ev["data"] == {"id": "a", "status": "ready"}
        assert (await fast.command("echo", {"still": True}))["return"] == {"still": True}
        # The unnegotiated client got no event: its next message is the reply to its command.
        assert await unnegotiated.command("qmp_capabilities", id=1) == {"return": {}, "id": 1}
        # The slow one was disconnected: reading through its backlog ends with EOF.
        with pytest.raises((EOFError, trio.BrokenResourceError)):
            while True:
                await slow.recv()


async def test_emit_without_clients_and_before_run(sockdir: str) -> None:
    server = QMPServer(os.path.join(sockdir, "q.sock"), FakeHandler())
    server.emit("BLOCK_JOB_READY", {"device": "a"})  # no clients yet: nothing happens
    assert server.statistics()["events"] == 1


# ---------------------------------------------------------------------------- socket fuzz

class ServerThread(QMPServerThread):
    """A QMPServer in its own thread and trio loop, for blocking (sync) clients."""

    def __init__(self, path: str) -> None:
        self.handler = FakeHandler()
        super().__init__(path, self.handler)


def _blocking_session(path: str) -> tuple[socket.socket, Any]:
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(10)
    s.connect(path)
    f = s.makefile("rb")
    assert "QMP" in json.loads(f.readline())
    s.sendall(b'{"execute": "qmp_capabilities"}\n')
    assert json.loads(f.readline()) == {"return": {}}
    return s, f


@pytest.fixture(scope="module")
def threaded_server() -> Iterator[ServerThread]:
    d = tempfile.mkdtemp(prefix="qmpf", dir="/tmp")
    try:
        with ServerThread(os.path.join(d, "qmp.sock")) as st_:
            yield st_
    finally:
        shutil.rmtree(d, ignore_errors=True)


_junk = st.one_of(
    st.binary(max_size=300),
    st.text(max_size=80).map(lambda s: s.encode("utf-8", "surrogatepass")),
    st.dictionaries(st.sampled_from(["execute", "arguments", "id", "x"]),
                    st.one_of(st.none(), st.integers(), st.text(max_size=10), st.lists(st.integers(), max_size=3),
                              st.sampled_from(["nope", "echo", "fail", "qmp_capabilities", "query-commands"])),
                    max_size=4).map(lambda d: json.dumps(d).encode()),
    st.builds(lambda n: b"{" * n, st.integers(1, 500)),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow])
@given(junk=st.lists(_junk, min_size=1, max_size=3), huge=st.booleans())
def test_socket_fuzz_every_input_answered_others_unaffected(threaded_server: ServerThread, junk: list[bytes],
                                                            huge: bool) -> None:
    path = threaded_server.server.path
    bystander, bf = _blocking_session(path)
    s, f = _blocking_session(path)
    try:
        payload = b"\n".join(junk)
        if huge:
            payload += b'\n{"execute": "echo", "arguments": {"pad": "' + b"z" * (1 << 20) + b'"}}'
        # Close any open string/value, end the line, then the sentinel.
        s.sendall(payload + b'"' + b"}" * 600 + b'\n{"execute": "echo", "arguments": {"s": 1}, "id": "sentinel"}\n')
        replies = []
        while True:
            msg = json.loads(f.readline())
            if msg.get("id") == "sentinel":
                assert msg == {"return": {"s": 1}, "id": "sentinel"}
                break
            replies.append(msg)
        assert replies, "the junk got no reply at all"
        for msg in replies:
            # Junk that happens to be a valid command (echo, query-commands) is fine; no event ever.
            assert set(msg) <= {"error", "return", "id"}, msg
        if huge:
            # Refused (as too long, or as part of a broken value): never executed.
            assert not any("pad" in m.get("return", {}) for m in replies)
        # The bystander never noticed.
        bystander.sendall(b'{"execute": "echo", "arguments": {"b": 2}, "id": "b"}\n')
        assert json.loads(bf.readline()) == {"return": {"b": 2}, "id": "b"}
    finally:
        for sock in (s, bystander):
            sock.close()
