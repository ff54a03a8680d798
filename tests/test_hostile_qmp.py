"""Hostile QMP clients against the socket of a real mount: nothing a client sends may take the
daemon down. Every input gets a QMP error reply (or, for a broken client, a closed connection),
and afterwards the mount still serves I/O and answers ``query-block-jobs``.

The inputs are the ones that used to end the mount or that sit at a limit of the protocol core:
numbers JSON cannot carry back (``1e999``, ``NaN``), huge integers, nesting at and past the
limit, invalid UTF-8, messages split into single bytes, many clients at once. The fuzzer that
generates such inputs is ``tests/test_control_fuzz.py``; the in-process containment tests (an
exception injected into a handler) are in ``tests/test_qmp_server.py``.
"""

from __future__ import annotations

import json
import os
import socket
import threading
from pathlib import Path
from typing import Any

import pytest

from mounting import Mount, random_image
from test_control_fuzz import Connection as RawClient

MiB = 1 << 20


def qmp_socket(mount: Mount) -> str:
    return (mount.control / "socket").read_text().strip()


def assert_alive(mount: Mount) -> None:
    """The daemon still serves image I/O (bytes compared) and QMP."""
    data = os.urandom(256 * 1024)
    with open(mount.mountpoint / "alive.img", "wb") as f:
        f.write(data)
    assert (mount.mountpoint / "alive.img").read_bytes() == data
    c = RawClient(qmp_socket(mount))
    try:
        c.send(b'{"execute": "query-block-jobs", "id": "alive"}\n')
        assert c.recv() == {"return": [], "id": "alive"}
    finally:
        c.close()


def parse_error(desc_part: str) -> Any:
    class Match:
        def __eq__(self, reply: object) -> bool:
            return (isinstance(reply, dict) and set(reply) == {"error"}
                    and reply["error"].get("class") == "GenericError"
                    and desc_part in reply["error"].get("desc", ""))

        def __repr__(self) -> str:
            return f"<GenericError reply without id, desc containing {desc_part!r}>"
    return Match()


OUT_OF_RANGE = "number out of range"

# (name, raw message, expected reply). Each is sent alone on a line, then a sentinel command.
HOSTILE = [
    ("id-1e999", b'{"execute": "x", "id": 1e999}', parse_error(OUT_OF_RANGE)),
    ("id-minus-1e999", b'{"execute": "query-block-jobs", "id": -1e999}', parse_error(OUT_OF_RANGE)),
    ("argument-1e400", b'{"execute": "query-block-jobs", "arguments": {"a": [1E+400]}, "id": 1}',
     parse_error(OUT_OF_RANGE)),
    ("top-level-1e999", b"1e999", parse_error(OUT_OF_RANGE)),
    ("long-decimal", b'{"execute": "x", "id": 1' + b"0" * 400 + b'.5}', parse_error(OUT_OF_RANGE)),
    ("nan-literal", b'{"execute": "x", "id": NaN}', parse_error("invalid literal NaN")),
    ("infinity-literal", b'{"execute": "x", "id": Infinity}', parse_error("invalid literal Infinity")),
    ("minus-infinity-literal", b'{"execute": "x", "id": -Infinity}',
     parse_error("invalid literal -Infinity")),
    ("integer-5000-digits", b'{"execute": "x", "id": ' + b"9" * 5000 + b"}", parse_error(OUT_OF_RANGE)),
    ("integer-500k-digits", b'{"execute": "x", "arguments": {"speed": -' + b"7" * 500_000 + b"}}",
     parse_error(OUT_OF_RANGE)),
    ("nesting-past-limit", b'{"execute": "x", "id": ' + b"[" * 129 + b"]" * 129 + b"}",
     parse_error("nesting deeper than 128")),
    ("nesting-far-past-limit", b"[" * 100_000 + b"]" * 100_000, parse_error("nesting deeper than 128")),
    ("invalid-utf8", b'{"execute": "x\xff\xfe", "id": 1}', parse_error("invalid UTF-8")),
    ("overlong-utf8", b'{"execute": "\xc0\xaf", "id": 1}', parse_error("invalid UTF-8")),
    ("encoded-surrogate", b'{"execute": "\xed\xa0\x80", "id": 1}', parse_error("invalid UTF-8")),
]


@pytest.mark.parametrize("negotiated", [False, True], ids=["before-capabilities", "after-capabilities"])
def test_hostile_messages_get_an_error_reply_and_the_mount_lives(mounted: Mount, negotiated: bool) -> None:
    random_image(mounted, "a.img")
    path = qmp_socket(mounted)
    c = RawClient(path, negotiate=negotiated)
    try:
        for name, data, expected in HOSTILE:
            c.send(data + b'\n{"execute": "query-version", "id": "sentinel"}\n')
            assert c.recv() == expected, name
            sentinel = c.recv()
            assert sentinel["id"] == "sentinel", (name, sentinel)
            assert ("return" in sentinel) == negotiated, (name, sentinel)
    finally:
        c.close()
    assert_alive(mounted)


def test_largest_accepted_numbers_and_nesting_are_echoed(mounted: Mount) -> None:
    """What stays inside the limits is served: 128 levels, 64-bit integers, 1e308."""
    c = RawClient(qmp_socket(mounted))
    try:
        deep = b"[" * 127 + b"]" * 127  # plus the enclosing object: 128 levels
        c.send(b'{"execute": "query-block-jobs", "id": ' + deep + b"}\n")
        assert c.recv() == {"return": [], "id": json.loads(deep)}
        for number in (2**63 - 1, -2**63, 2**64 - 1, 1e308, -1e-320):
            c.send(json.dumps({"execute": "query-block-jobs", "id": number}).encode() + b"\n")
            assert c.recv() == {"return": [], "id": number}
        # Past 64 bits an integer is a double, as in QEMU's parser.
        c.send(b'{"execute": "query-block-jobs", "id": 123456789012345678901234567890}\n')
        assert c.recv() == {"return": [], "id": 1.2345678901234568e29}
    finally:
        c.close()
    assert_alive(mounted)


def test_hostile_message_split_into_single_bytes(mounted: Mount) -> None:
    c = RawClient(qmp_socket(mounted))
    try:
        data = (b'{"execute": "query-block-jobs", "id": 1e999}\n'
                b'{"execute": "query-block-jobs", "id": "\xff"}\n'
                b'{"execute": "query-block-jobs", "id": "ok"}\n')
        for i in range(len(data)):
            c.send(data[i:i + 1])
        assert c.recv() == parse_error(OUT_OF_RANGE)
        assert c.recv() == parse_error("invalid UTF-8")
        assert c.recv() == {"return": [], "id": "ok"}
    finally:
        c.close()
    assert_alive(mounted)


def test_many_hostile_clients_at_once(mounted: Mount) -> None:
    path = qmp_socket(mounted)
    failures: list[str] = []

    def client(i: int) -> None:
        try:
            c = RawClient(path, negotiate=bool(i % 2))
            try:
                for _ in range(5):
                    c.send(b'{"execute": "x", "id": 1e999}\n[NaN]\n'
                           + json.dumps({"execute": "query-block-jobs", "id": i}).encode() + b"\n")
                    assert c.recv() == parse_error(OUT_OF_RANGE)
                    assert c.recv() == parse_error("invalid literal NaN")
                    assert c.recv()["id"] == i
            finally:
                c.close()
        except Exception as exc:  # collected: an assert in a thread would be lost
            failures.append(f"client {i}: {exc!r}")

    threads = [threading.Thread(target=client, args=(i,)) for i in range(60)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not failures, failures[:5]
    assert_alive(mounted)


def test_client_that_vanishes_mid_message_or_never_reads(mounted: Mount, tmp_path: Path) -> None:
    path = qmp_socket(mounted)
    for tail in (b'{"execute": "query-block-jobs", "id": 1e99', b'{"execute": "query-block-jobs", "id": 1e999}\n'):
        c = RawClient(path)
        c.send(tail)
        c.sock.shutdown(socket.SHUT_RDWR)
        c.close()
    # Never reads its replies: the server blocks on that client only.
    greedy = RawClient(path)
    greedy.sock.setblocking(False)
    try:
        try:
            for _ in range(20000):
                greedy.sock.send(b'{"execute": "query-version", "id": 1e999}\n' * 64)
        except BlockingIOError:
            pass
        assert_alive(mounted)
    finally:
        greedy.close()
    assert_alive(mounted)


# Loaded by the mount daemon through Python's standard ``sitecustomize`` hook (PYTHONPATH set for
# this test only): the production code has no injection switch.
_INJECT_HANDLER_BUG = '''
import mirrorfs.control.commands as _commands

_original = _commands.CommandDispatcher.execute


async def _execute(self, name, arguments):
    if isinstance(arguments, dict) and arguments.get("inject-bug"):
        raise RuntimeError("bug injected into " + name)
    return await _original(self, name, arguments)


_commands.CommandDispatcher.execute = _execute
'''


def test_exception_injected_into_a_live_handler_closes_that_client_only(
        mount_factory: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    hook = tmp_path / "inject"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(_INJECT_HANDLER_BUG)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(hook), os.environ.get("PYTHONPATH")])))
    mount = mount_factory()
    mount.allow_log(r"^Traceback \(most recent call last\):$")
    mount.allow_log(r"ERROR: QMP command query-block-jobs failed with an internal error; closing client \d+$")
    data = random_image(mount, "a.img")
    path = qmp_socket(mount)
    bystander = RawClient(path)
    victim = RawClient(path)
    try:
        victim.send(b'{"execute": "query-block-jobs", "arguments": {"inject-bug": true}, "id": 7}\n')
        assert victim.recv() == {"error": {"class": "GenericError",
                                           "desc": "internal error: RuntimeError('bug injected into query-block-jobs')"},
                                 "id": 7}
        assert victim.file.readline() == b"", "the client whose command hit a bug is closed"
        bystander.send(b'{"execute": "query-block-jobs", "id": "b"}\n')
        assert bystander.recv() == {"return": [], "id": "b"}
    finally:
        victim.close()
        bystander.close()
    assert (mount.mountpoint / "a.img").read_bytes() == data
    assert_alive(mount)
    log = mount.read_log()
    assert log.count("Traceback") == 1 and "RuntimeError: bug injected into query-block-jobs" in log, log
