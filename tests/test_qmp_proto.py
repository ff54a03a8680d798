"""Pure, synchronous tests of the sans-I/O QMP core (tier a): no sockets, no trio.

A ``ConnectionPair`` (as h11's test helper) joins a QMPClientConnection and a QMPServerConnection
with an in-memory link, so every test checks both what the server decides and what the client
then parses.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mirrorfs.control.qmp_proto import (CLOSED, NEED_DATA, NO_ID, Command, Error, Event, Greeting,
                                        QMPClientConnection, QMPServerConnection, Reply, Return)
from mirrorfs.errors import LocalProtocolError, RemoteProtocolError


class ConnectionPair:
    """A client and a server core; the test plays the server's command runner."""

    def __init__(self, **server_kwargs: Any) -> None:
        self.server = QMPServerConnection(package="mirrorfs test", version=(1, 2, 3), **server_kwargs)
        self.client = QMPClientConnection()
        self.client.receive_data(self.server.greeting())

    def client_events(self) -> list[Any]:
        out = []
        while (ev := self.client.next_event()) is not NEED_DATA:
            out.append(ev)
        return out

    def push(self, data: bytes) -> list[Any]:
        """Send raw bytes to the server; return the server events (Reply bytes forwarded)."""
        self.server.receive_data(data)
        events = []
        while (ev := self.server.next_event()) not in (NEED_DATA, CLOSED):
            events.append(ev)
            if isinstance(ev, Reply):
                self.client.receive_data(ev.data)
        return events

    def negotiate(self) -> None:
        assert isinstance(self.client_events()[0], Greeting)
        [reply] = self.push(self.client.send_command("qmp_capabilities", id="neg"))
        assert reply.error_class is None
        assert self.client_events() == [Return({}, "neg")]


@pytest.fixture
def pair() -> ConnectionPair:
    return ConnectionPair()


def test_greeting_has_qemu_shape(pair: ConnectionPair) -> None:
    raw = json.loads(QMPServerConnection(package="mirrorfs 9", version=(4, 5, 6)).greeting())
    assert raw == {"QMP": {"version": {"qemu": {"micro": 6, "minor": 5, "major": 4},
                                       "package": "mirrorfs 9"}, "capabilities": []}}
    [greeting] = pair.client_events()
    assert greeting == Greeting({"qemu": {"micro": 3, "minor": 2, "major": 1}, "package": "mirrorfs test"}, [])


def test_commands_before_negotiation_are_command_not_found(pair: ConnectionPair) -> None:
    pair.client_events()
    [reply] = pair.push(b'{"execute": "query-block-jobs", "id": 7}\n')
    assert isinstance(reply, Reply) and reply.error_class == "CommandNotFound"
    assert pair.client_events() == [Error("CommandNotFound",
                                          "Expecting capabilities negotiation with 'qmp_capabilities'", 7)]
    assert not pair.server.negotiated


def test_negotiation_then_commands_then_second_negotiation_refused(pair: ConnectionPair) -> None:
    pair.negotiate()
    assert pair.server.negotiated
    [cmd] = pair.push(pair.client.send_command("drive-mirror", {"device": "a.img", "target": "/t"}, id="x1"))
    assert cmd == Command("drive-mirror", {"device": "a.img", "target": "/t"}, "x1")
    pair.client.receive_data(pair.server.send_return(cmd.id, {}))
    assert pair.client_events() == [Return({}, "x1")]
    pair.push(b'{"execute": "qmp_capabilities", "id": 2}')
    assert pair.client_events() == [Error("CommandNotFound",
                                          "Capabilities negotiation is already complete, command ignored", 2)]


@pytest.mark.parametrize("msg_id", [0, -1, 1.5, "s", None, True, [1, {"a": None}], {"deep": {"er": [1]}}])
def test_id_is_echoed_verbatim(pair: ConnectionPair, msg_id: Any) -> None:
    pair.negotiate()
    [cmd] = pair.push(json.dumps({"execute": "x", "id": msg_id}).encode())
    assert cmd.id == msg_id and type(cmd.id) is type(msg_id)
    assert json.loads(pair.server.send_return(cmd.id, 5)) == {"return": 5, "id": msg_id}
    assert json.loads(pair.server.send_error(cmd.id, "DeviceNotFound", "no")) == \
        {"error": {"class": "DeviceNotFound", "desc": "no"}, "id": msg_id}


def test_no_id_means_no_id_in_reply(pair: ConnectionPair) -> None:
    pair.negotiate()
    [cmd] = pair.push(b'{"execute": "x"}')
    assert cmd.id is NO_ID
    assert json.loads(pair.server.send_return(cmd.id, [])) == {"return": []}


@pytest.mark.parametrize("data, desc", [
    (b'{"execute": 5, "id": 1}', "QMP input member 'execute' must be a string"),
    (b'{"id": 1}', "QMP input lacks member 'execute'"),
    (b'{"execute": "x", "arguments": [1], "id": 1}', "QMP input member 'arguments' must be an object"),
    (b'{"execute": "x", "argument": {}, "id": 1}', "QMP input member 'argument' is unexpected"),
    (b'[1, 2]', "QMP input must be a JSON object"),
    (b'"a string"', "QMP input must be a JSON object"),
    (b'42\n', "QMP input must be a JSON object"),
    (b'{"execute": "x", "execute": "y"}', "JSON parse error, duplicate key 'execute'"),
    (b'{"execute": "x", "arguments": {"a": NaN}}', "JSON parse error, invalid literal NaN"),
    (b'{"execute": x}', "JSON parse error, expecting value"),
    (b'}', "JSON parse error, unexpected '}'"),
    (b'{"execute": "\xff"}', "JSON parse error, invalid UTF-8 sequence at byte 13"),
    (b'{"execute": "a\nb"}', "JSON parse error, control character in string"),
    (b'\x00\n', "JSON parse error, invalid character 0x00"),
])
def test_malformed_input_gets_qemu_error(pair: ConnectionPair, data: bytes, desc: str) -> None:
    pair.negotiate()
    events = pair.push(data)
    assert events and all(isinstance(e, Reply) for e in events)
    replies = pair.client_events()
    assert replies[0].error_class == "GenericError" and replies[0].desc == desc
    has_id = isinstance(json.loads(events[0].data), dict) and "id" in json.loads(events[0].data)
    assert has_id == (b'"id": 1' in data)
    # ... and the connection stays usable: after the next newline a command comes through (the
    # rest of a line broken by a raw newline inside a string may first give its own errors).
    events = pair.push(b'\n{"execute": "still-alive", "id": "ok"}\n')
    assert events[-1] == Command("still-alive", {}, "ok")
    assert all(isinstance(e, Reply) and e.error_class == "GenericError" for e in events[:-1])


def test_framing_splits_on_balanced_braces_not_newlines(pair: ConnectionPair) -> None:
    pair.negotiate()
    stream = (b'{"execute": "a", "arguments": {"s": "}{][\\"\\\\", "l": [1, {"x": []}]}}'
              b'{"execute":"b"}  \r\n{\n "execute"\n:\n"c"\n}')
    # Byte by byte: the scanner keeps its position and emits exactly the same commands.
    events = []
    for i in range(len(stream)):
        events += pair.push(stream[i:i + 1])
    assert events == [Command("a", {"s": '}{]["\\', "l": [1, {"x": []}]}), Command("b"), Command("c")]


def test_huge_value_is_refused_and_stream_resyncs_at_newline() -> None:
    pair = ConnectionPair(max_value_size=1000)
    pair.negotiate()
    big = b'{"execute": "x", "arguments": {"pad": "' + b"a" * 5000 + b'"}}'
    events = []
    for i in range(0, len(big), 300):  # arriving in pieces: refused once the limit is passed
        events += pair.push(big[i:i + 300])
    assert [e.desc for e in events] == ["JSON parse error, value longer than 1000 bytes"]
    assert pair.server.pending < 1000, "a refused value must not stay buffered"
    events = pair.push(b'\n{"execute": "after", "id": 1}\n')
    assert events == [Command("after", {}, 1)]
    # The same value in one piece.
    events = pair.push(big + b'\n{"execute": "after2"}\n')
    assert [getattr(e, "desc", None) for e in events] == \
        ["JSON parse error, value longer than 1000 bytes", None]
    assert events[1] == Command("after2")


def test_deep_nesting_is_refused() -> None:
    pair = ConnectionPair(max_depth=50)
    pair.negotiate()
    events = pair.push(b"[" * 60 + b"]" * 60 + b"\n" + b'{"execute": "ok"}')
    assert events[0].desc == "JSON parse error, nesting deeper than 50"
    assert events[-1] == Command("ok")


def test_qmp_capabilities_arguments() -> None:
    pair = ConnectionPair()
    pair.client_events()
    pair.push(b'{"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}, "id": 1}')
    assert pair.client_events() == [Error("GenericError", "Capability 'oob' not available", 1)]
    pair.push(b'{"execute": "qmp_capabilities", "arguments": {"bogus": 1}, "id": 2}')
    assert pair.client_events() == [Error("GenericError", "Parameter 'bogus' is unexpected", 2)]
    assert not pair.server.negotiated
    pair.push(b'{"execute": "qmp_capabilities", "arguments": {"enable": []}, "id": 3}')
    assert pair.client_events() == [Return({}, 3)]
    assert pair.server.negotiated


def test_events_only_after_negotiation(pair: ConnectionPair) -> None:
    with pytest.raises(LocalProtocolError):
        pair.server.send_event("BLOCK_JOB_READY", {"device": "a"})
    pair.negotiate()
    pair.client.receive_data(pair.server.send_event("BLOCK_JOB_READY", {"device": "a"}, timestamp=12.25))
    assert pair.client_events() == [Event("BLOCK_JOB_READY", {"device": "a"},
                                          {"seconds": 12, "microseconds": 250000})]
    raw = json.loads(pair.server.send_event("X", {}))
    assert set(raw["timestamp"]) == {"seconds", "microseconds"} and raw["timestamp"]["seconds"] > 1.6e9


def test_unencodable_return_is_a_local_error(pair: ConnectionPair) -> None:
    with pytest.raises(LocalProtocolError):
        pair.server.send_return(1, {"x": object()})
    with pytest.raises(LocalProtocolError):
        pair.server.send_return(1, float("nan"))


def test_eof_after_partial_value(pair: ConnectionPair) -> None:
    pair.negotiate()
    pair.server.receive_data(b'{"execute": "x"}{"exec')
    pair.server.receive_data(b"")
    assert pair.server.next_event() == Command("x")
    assert pair.server.next_event() is CLOSED
    with pytest.raises(LocalProtocolError):
        pair.server.receive_data(b"more")


def test_client_rejects_non_qmp() -> None:
    client = QMPClientConnection()
    client.receive_data(b'{"hello": 1}\r\n')
    with pytest.raises(RemoteProtocolError, match="greeting"):
        client.next_event()
    client = QMPClientConnection()
    client.receive_data(QMPServerConnection().greeting() + b"not json\n")
    client.next_event()
    with pytest.raises(RemoteProtocolError, match="invalid JSON"):
        client.next_event()


# ---------------------------------------------------------------------------- fuzzing

_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12)

_wrong_commands = st.one_of(
    _json_values.map(lambda v: json.dumps(v).encode()),
    st.dictionaries(st.sampled_from(["execute", "arguments", "id", "exec-oob", "x", ""]), _json_values,
                    max_size=4).map(lambda d: json.dumps(d).encode()),
    st.binary(max_size=200),
    st.text(max_size=100).map(lambda s: s.encode("utf-8", "surrogatepass")),
    st.builds(lambda n: b"[" * n, st.integers(0, 3000)),
    st.builds(lambda n, c: b'{"execute": "' + c * n, st.integers(0, 3000), st.sampled_from([b"a", b"\\", b"{"])),
)

# Number texts at and past what a double or 64 bits hold, as a peer may write them.
_raw_numbers = st.one_of(
    st.sampled_from([b"1e999", b"-1e999", b"1E+309", b"1.8e308", b"-0", b"1e-999", b"18446744073709551615",
                     b"18446744073709551616", b"-9223372036854775808", b"-9223372036854775809", b"NaN",
                     b"Infinity", b"-Infinity"]),
    st.integers().map(lambda n: str(n).encode()),
    st.floats(allow_nan=False, allow_infinity=False).map(lambda f: repr(f).encode()),
    st.builds(lambda n, e: b"9" * n + e, st.integers(1, 6000), st.sampled_from([b"", b".5", b"e10", b"e-400"])),
)


@pytest.mark.parametrize("number, decoded", [
    (b"1e308", 1e308), (b"18446744073709551615", 2**64 - 1), (b"-9223372036854775808", -2**63),
    (b"18446744073709551616", 1.8446744073709552e19), (b"-9223372036854775809", -9.223372036854776e18),
    (b"1e-999", 0.0),
])
def test_numbers_follow_qemu_integers_past_64_bits_become_doubles(number: bytes, decoded: Any) -> None:
    pair = ConnectionPair()
    pair.negotiate()
    [cmd] = pair.push(b'{"execute": "x", "id": ' + number + b"}")
    assert cmd.id == decoded and type(cmd.id) is type(decoded)


@pytest.mark.parametrize("number", [b"1e999", b"-1e999", b"1E+309", b"9" * 5000, b"-" + b"9" * 400 + b".0"])
@pytest.mark.parametrize("negotiated", [False, True])
def test_numbers_no_double_holds_are_a_parse_error(number: bytes, negotiated: bool) -> None:
    pair = ConnectionPair()
    if negotiated:
        pair.negotiate()
    for where in (b'{"execute": "x", "id": %s}', b'{"execute": "x", "arguments": {"a": [%s]}}', b"%s\n"):
        [reply] = pair.push(where.replace(b"%s", number))
        assert isinstance(reply, Reply) and reply.error_class == "GenericError"
        assert reply.desc == "JSON parse error, number out of range"
        assert json.loads(reply.data) == {"error": {"class": "GenericError", "desc": reply.desc}}


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(msg_id=_raw_numbers, argument=_raw_numbers, negotiated=st.booleans())
def test_fuzz_every_accepted_command_can_be_answered(msg_id: bytes, argument: bytes, negotiated: bool) -> None:
    """Whatever numbers a command holds, the core answers it or hands over a Command whose id and
    arguments encode again: a reply can never fail to be written."""
    pair = ConnectionPair()
    if negotiated:
        pair.negotiate()
    [event] = pair.push(b'{"execute": "x", "arguments": {"a": ' + argument + b'}, "id": ' + msg_id + b"}")
    if isinstance(event, Command):
        assert json.loads(pair.server.send_return(event.id, event.arguments))["return"] == event.arguments
        pair.server.send_error(event.id, "GenericError", "no")
    else:
        assert isinstance(event, Reply) and json.loads(event.data)["error"]["class"] in (
            "GenericError", "CommandNotFound")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(junk=st.lists(_wrong_commands, min_size=1, max_size=4), chunk=st.integers(1, 500))
def test_fuzz_every_input_is_answered_and_connection_survives(junk: list[bytes], chunk: int) -> None:
    """Whatever arrives: no exception, every server event is a Command or a Reply whose bytes the
    client parses, and after a newline a well-formed command is recognised again."""
    pair = ConnectionPair(max_value_size=2048, max_depth=64)
    pair.negotiate()
    stream = b"\n".join(junk)
    events: list[Any] = []
    for i in range(0, len(stream), chunk):
        events += pair.push(stream[i:i + chunk])
    for ev in events:
        assert isinstance(ev, (Command, Reply))
        if isinstance(ev, Command):
            assert isinstance(ev.name, str) and isinstance(ev.arguments, dict)
    for parsed in pair.client_events():
        assert isinstance(parsed, (Return, Error))
    # Resync: whatever state the junk left, these close any open value, end the line, and then a
    # real command must come through. Closing brackets at depth 0 are errors, not hangs.
    tail = pair.push(b'"' + b"]}" * 3100 + b"\n")
    for ev in tail:
        assert isinstance(ev, (Command, Reply))
    pair.client_events()
    final = pair.push(b'{"execute": "sentinel", "id": "s"}\n')
    assert final == [Command("sentinel", {}, "s")]
