"""The QMP wire protocol as a pure state machine (sans-I/O): bytes in, events and bytes out.

No sockets, no trio, no files: :class:`QMPServerConnection` is fed whatever arrived from the peer
(:meth:`~QMPServerConnection.receive_data`), hands back one event at a time
(:meth:`~QMPServerConnection.next_event`) and turns replies and events into bytes to send
(:meth:`~QMPServerConnection.send_return`, :meth:`~QMPServerConnection.send_error`,
:meth:`~QMPServerConnection.send_event`). :class:`QMPClientConnection` is the mirror image, used by
the synchronous CLI client and by the in-memory tests. The shape follows h11.

Rule 1 (as h11's ``_state.py``): every rule of the QMP session lives in this file. The server
adapter only moves bytes and runs commands.

Wire rules, as QEMU's monitor (``docs/interop/qmp-spec.rst``, ``qapi/qmp-dispatch.c``):

* The server speaks first: a greeting ``{"QMP": {"version": ..., "capabilities": []}}``.
* Until ``qmp_capabilities`` succeeds, every other command is answered ``CommandNotFound``
  "Expecting capabilities negotiation with 'qmp_capabilities'"; afterwards ``qmp_capabilities``
  itself is ``CommandNotFound`` "Capabilities negotiation is already complete, command ignored".
  Both, and ``qmp_capabilities`` itself, are answered by this core: they are session state.
* A command is ``{"execute": str, "arguments"?: object, "id"?: any}``; ``id`` is echoed verbatim.
  Everything else is a ``GenericError`` with QEMU's wording (see :func:`_check_command`).
* Events ``{"event", "data", "timestamp": {"seconds", "microseconds"}}`` go only to negotiated
  sessions; :meth:`QMPServerConnection.send_event` refuses otherwise.

Framing: like QEMU's JSON streamer, a value ends where its braces/brackets balance, not at a
newline (``qemu.qmp`` happens to send one object per line; other clients may not). A byte that
cannot appear where it stands (a control character inside a string, a non-ASCII or stray byte
outside one), a value longer than ``max_value_size`` or nested deeper than ``max_depth`` gets
one ``GenericError`` reply, and the rest of that *line* is discarded: we resynchronise at the next
newline, which is where every line-oriented client starts its next command. Binary junk can thus
never raise out of the core: it always becomes a :class:`Reply` carrying an error.
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass, field
from typing import Any, Union

from ..errors import LocalProtocolError, RemoteProtocolError

__all__ = [
    "NEED_DATA", "CLOSED", "NO_ID", "Command", "Reply", "Greeting", "Return", "Error", "Event",
    "QMPServerConnection", "QMPClientConnection", "DEFAULT_MAX_VALUE_SIZE", "DEFAULT_MAX_DEPTH",
]

#: Longest JSON value accepted from a peer (QEMU's streamer limit is 64 MiB; commands are tiny).
DEFAULT_MAX_VALUE_SIZE = 1 << 20
#: Deepest nesting accepted (QEMU allows 1024; Python's json recursion would give up near 1000).
DEFAULT_MAX_DEPTH = 128


#: Extension member of QMP error objects carrying the CLI exit code (see send_error).
EXIT_CODE_MEMBER = "__org.mirrorfs_exit-code"

class _Sentinel:
    def __init__(self, name: str) -> None:
        self._name = name

    def __repr__(self) -> str:
        return self._name


#: :meth:`next_event` has nothing complete: feed more bytes with :meth:`receive_data`.
NEED_DATA: Any = _Sentinel("NEED_DATA")
#: The peer closed its side (``receive_data(b"")``) and every complete value has been returned.
CLOSED: Any = _Sentinel("CLOSED")
#: The ``id`` of a command that carried none: replies to it carry none either.
NO_ID: Any = _Sentinel("NO_ID")


@dataclass(frozen=True)
class Command:
    """A well-formed command from a negotiated peer, for the server to run and answer.

    ``id`` is :data:`NO_ID` when the peer sent none; pass it unchanged to ``send_return`` or
    ``send_error``.
    """

    name: str
    arguments: dict[str, Any] = field(default_factory=dict)
    id: Any = NO_ID


@dataclass(frozen=True)
class Reply:
    """A reply the core produced itself (malformed input, negotiation): send ``data`` as is.

    ``error_class``/``desc`` are None for a successful reply (``qmp_capabilities``).
    """

    data: bytes
    error_class: str | None = None
    desc: str | None = None


@dataclass(frozen=True)
class Greeting:
    """The server's greeting, as the client saw it."""

    version: dict[str, Any]
    capabilities: list[Any]


@dataclass(frozen=True)
class Return:
    """A successful reply, as the client saw it."""

    value: Any
    id: Any = NO_ID


@dataclass(frozen=True)
class Error:
    """An error reply, as the client saw it."""

    error_class: str
    desc: str
    id: Any = NO_ID
    #: the ``__org.mirrorfs_exit-code`` member, when a mirrorfs server sent one
    exit_code: int | None = None


@dataclass(frozen=True)
class Event:
    """An asynchronous event, as the client saw it."""

    name: str
    data: dict[str, Any]
    timestamp: dict[str, int]


ClientEvent = Union[Greeting, Return, Error, Event]


# --------------------------------------------------------------------------------------------
# Framing: split a byte stream into JSON values (or framing errors)
# --------------------------------------------------------------------------------------------

_WS = b" \t\r\n"
# Bytes allowed outside strings inside a value besides structure: numbers and keywords.
_TOKEN = frozenset(b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ+-.")
# Where scanning outside a string must stop and look: anything but whitespace, ',', ':' and tokens.
_OUTSIDE_STOP = re.compile(rb"[^ \t\r\n,:0-9a-zA-Z+\-.]")
# Where scanning inside a string must stop: its end, an escape, or a forbidden control byte.
_INSIDE_STOP = re.compile(rb'["\\\x00-\x1f]')
# End of a top-level scalar token.
_SCALAR_END = re.compile(rb'[ \t\r\n{}\[\]",:]')

_START, _VALUE, _SCALAR, _RECOVER = range(4)


class _Framer:
    """Incremental splitter of a byte stream into JSON texts, in the manner of QEMU's streamer.

    ``next()`` returns ``("value", bytes)``, ``("error", message)`` or None (need more data).
    The scan position is kept between calls so feeding a value byte by byte stays linear.
    """

    def __init__(self, max_value_size: int, max_depth: int) -> None:
        self._buf = bytearray()
        self._pos = 0            # next byte of _buf to look at
        self._mode = _START
        self._depth = 0
        self._in_string = False
        self._max_size = max_value_size
        self._max_depth = max_depth

    def feed(self, data: bytes) -> None:
        self._buf += data

    @property
    def pending(self) -> int:
        """Bytes received but not yet returned or discarded."""
        return len(self._buf)

    def _consume(self, n: int) -> bytes:
        chunk = bytes(self._buf[:n])
        del self._buf[:n]
        self._pos = 0
        return chunk

    def _fail(self, at: int, message: str) -> tuple[str, str]:
        """Drop the value up to and including byte ``at``; resync at the next newline."""
        newline = at < len(self._buf) and self._buf[at] == 0x0A
        self._consume(min(at + 1, len(self._buf)))
        self._mode = _START if newline else _RECOVER
        self._depth = 0
        self._in_string = False
        return "error", message

    def next(self) -> tuple[str, Any] | None:
        buf = self._buf
        while True:
            if self._mode == _RECOVER:
                nl = buf.find(b"\n")
                if nl < 0:
                    self._consume(len(buf))
                    return None
                self._consume(nl + 1)
                self._mode = _START
            if self._mode == _START:
                i = 0
                while i < len(buf) and buf[i] in _WS:
                    i += 1
                if i:
                    self._consume(i)
                if not buf:
                    return None
                c = buf[0]
                if c in b"{[":
                    self._mode, self._depth, self._in_string, self._pos = _VALUE, 1, False, 1
                elif c == 0x22:  # a top-level string: scan it like a value at depth 0
                    self._mode, self._depth, self._in_string, self._pos = _VALUE, 0, True, 1
                elif c in _TOKEN:
                    self._mode, self._pos = _SCALAR, 1
                elif c in b"}],:":
                    return self._fail(0, f"JSON parse error, unexpected '{chr(c)}'")
                else:
                    return self._fail(0, f"JSON parse error, invalid character 0x{c:02x}")
            if self._mode == _SCALAR:
                m = _SCALAR_END.search(buf, self._pos)
                if m is None:
                    self._pos = len(buf)
                    if len(buf) > self._max_size:
                        return self._fail(len(buf) - 1, self._too_long())
                    return None
                self._mode = _START
                return "value", self._consume(m.start())
            # _VALUE: inside an object/array (or a top-level string)
            result = self._scan_value()
            if result is not None:
                return result
            if len(buf) > self._max_size:
                return self._fail(len(buf) - 1, self._too_long())
            return None

    def _too_long(self) -> str:
        return f"JSON parse error, value longer than {self._max_size} bytes"

    def _scan_value(self) -> tuple[str, Any] | None:
        buf = self._buf
        pos = self._pos
        while pos < len(buf):
            m = (_INSIDE_STOP if self._in_string else _OUTSIDE_STOP).search(buf, pos)
            if m is None:
                pos = len(buf)
                break
            pos = m.start()
            c = buf[pos]
            if self._in_string:
                if c == 0x5C:  # backslash: the next byte is escaped (json.loads checks which)
                    if pos + 1 >= len(buf):
                        break
                    if buf[pos + 1] < 0x20:
                        return self._fail(pos + 1, "JSON parse error, control character in string")
                    pos += 2
                    continue
                if c == 0x22:
                    self._in_string = False
                    pos += 1
                    if self._depth == 0:
                        self._mode = _START
                        return self._emit(pos)
                    continue
                return self._fail(pos, "JSON parse error, control character in string")
            if c == 0x22:
                self._in_string = True
            elif c in b"{[":
                self._depth += 1
                if self._depth > self._max_depth:
                    return self._fail(pos, f"JSON parse error, nesting deeper than {self._max_depth}")
            elif c in b"}]":
                self._depth -= 1
                if self._depth == 0:
                    self._mode = _START
                    return self._emit(pos + 1)
            else:
                return self._fail(pos, f"JSON parse error, invalid character 0x{c:02x}")
            pos += 1
        self._pos = pos
        return None

    def _emit(self, end: int) -> tuple[str, Any]:
        if end > self._max_size:
            self._consume(end)
            return "error", self._too_long()
        return "value", self._consume(end)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"invalid literal {name}")


# QEMU's parser keeps an integer that fits int64 or uint64 and makes any other one a double.
_INT_MIN, _UINT_MAX = -(1 << 63), (1 << 64) - 1
# Longest integer text that can still fit 64 bits ("-9223372036854775808" is 20 characters).
_INT_DIGITS = 20


def _finite_float(text: str) -> float:
    # Python turns 1e999 into inf, which no JSON reply can carry back (an echoed id, say):
    # refuse it here so every value that enters the server is one it can encode.
    value = float(text)
    if not math.isfinite(value):
        raise ValueError("number out of range")
    return value


def _bounded_int(text: str) -> int | float:
    # The length test first: int() of thousands of digits is refused (or slow), float() is not.
    if len(text) <= _INT_DIGITS:
        value = int(text)
        if _INT_MIN <= value <= _UINT_MAX:
            return value
    return _finite_float(text)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key '{key}'")
        result[key] = value
    return result


def _decode(text: bytes) -> Any:
    """Parse one framed JSON value strictly (UTF-8, no NaN, no duplicate keys, finite numbers).

    Numbers follow QEMU's parser: an integer outside int64/uint64 becomes a double, and a number
    no double can hold (``1e999``) is refused, so whatever this returns can be encoded again.

    Raises:
        ValueError: the text is not valid JSON; the message says why.
    """
    try:
        s = text.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"invalid UTF-8 sequence at byte {exc.start}") from None
    try:
        return json.loads(s, parse_constant=_reject_constant, parse_float=_finite_float,
                          parse_int=_bounded_int, object_pairs_hook=_no_duplicates)
    except json.JSONDecodeError as exc:
        raise ValueError(exc.msg.lower()) from None
    except RecursionError:
        raise ValueError("nesting too deep") from None


def _encode(obj: dict[str, Any]) -> bytes:
    """One QMP message on the wire: compact JSON and CRLF, as QEMU sends it.

    Raises:
        LocalProtocolError: ``obj`` holds something JSON cannot carry (a bug on our side).
    """
    try:
        return json.dumps(obj, allow_nan=False, separators=(", ", ": ")).encode("ascii") + b"\r\n"
    except (TypeError, ValueError) as exc:
        raise LocalProtocolError(f"cannot encode QMP message: {exc}") from exc


def _with_id(obj: dict[str, Any], id: Any) -> dict[str, Any]:
    if id is not NO_ID:
        obj["id"] = id
    return obj


def _check_command(msg: Any) -> tuple[str, dict[str, Any]]:
    """Validate a parsed command object the way ``qmp_dispatch_check_obj`` does.

    Raises:
        RemoteProtocolError: the object is not a well-formed command; the message is QEMU's.
    """
    if not isinstance(msg, dict):
        raise RemoteProtocolError("QMP input must be a JSON object")
    for key, value in msg.items():
        if key == "execute":
            if not isinstance(value, str):
                raise RemoteProtocolError("QMP input member 'execute' must be a string")
        elif key == "arguments":
            if not isinstance(value, dict):
                raise RemoteProtocolError("QMP input member 'arguments' must be an object")
        elif key == "id":
            pass
        elif key == "exec-oob":
            raise RemoteProtocolError("QMP input member 'exec-oob' is unexpected: "
                                      "out-of-band execution is not supported")
        else:
            raise RemoteProtocolError(f"QMP input member '{key}' is unexpected")
    if "execute" not in msg:
        raise RemoteProtocolError("QMP input lacks member 'execute'")
    return msg["execute"], msg.get("arguments", {})


class QMPServerConnection:
    """The server side of one QMP session.

    Feed bytes with :meth:`receive_data` and loop on :meth:`next_event`:

    * :class:`Command`: run it and answer with :meth:`send_return` or :meth:`send_error`;
    * :class:`Reply`: the core already answered (malformed input, negotiation): send its ``data``;
    * :data:`NEED_DATA`: read more; :data:`CLOSED`: the peer is gone.

    Args:
        package: the ``package`` string of the greeting and of ``query-version``.
        version: ``(major, minor, micro)``.
        max_value_size: longest accepted JSON value in bytes.
        max_depth: deepest accepted nesting.
    """

    def __init__(self, *, package: str = "mirrorfs", version: tuple[int, int, int] = (0, 0, 0),
                 max_value_size: int = DEFAULT_MAX_VALUE_SIZE,
                 max_depth: int = DEFAULT_MAX_DEPTH) -> None:
        self.package = package
        self.version = version
        self._framer = _Framer(max_value_size, max_depth)
        self._negotiated = False
        self._eof = False

    @property
    def negotiated(self) -> bool:
        """True once ``qmp_capabilities`` succeeded: commands run and events may be sent."""
        return self._negotiated

    def version_info(self) -> dict[str, Any]:
        """The ``version`` member of the greeting, also the value of ``query-version``."""
        major, minor, micro = self.version
        return {"qemu": {"micro": micro, "minor": minor, "major": major}, "package": self.package}

    def greeting(self) -> bytes:
        """The first message of the session, QEMU's shape so ``qemu.qmp`` accepts it."""
        return _encode({"QMP": {"version": self.version_info(), "capabilities": []}})

    def receive_data(self, data: bytes) -> None:
        """Hand over bytes from the peer; ``b""`` means the peer closed its side.

        Raises:
            LocalProtocolError: data after end of stream.
        """
        if self._eof:
            raise LocalProtocolError("receive_data() after end of stream")
        if not data:
            self._eof = True
            return
        self._framer.feed(bytes(data))

    @property
    def pending(self) -> int:
        """Bytes received and not yet consumed (a partial value)."""
        return self._framer.pending

    def next_event(self) -> Command | Reply | Any:
        """The next thing to act on: a :class:`Command`, a :class:`Reply`, ``NEED_DATA`` or ``CLOSED``.

        Never raises on peer input: whatever the bytes, a malformed value becomes a ``Reply``
        with a ``GenericError``.
        """
        item = self._framer.next()
        if item is None:
            return CLOSED if self._eof else NEED_DATA
        kind, payload = item
        if kind == "error":
            return self._error_reply(NO_ID, "GenericError", payload)
        try:
            msg = _decode(payload)
        except ValueError as exc:
            return self._error_reply(NO_ID, "GenericError", f"JSON parse error, {exc}")
        msg_id = msg.get("id", NO_ID) if isinstance(msg, dict) else NO_ID
        try:
            name, arguments = _check_command(msg)
        except RemoteProtocolError as exc:
            return self._error_reply(msg_id, "GenericError", str(exc))
        if name == "qmp_capabilities":
            if self._negotiated:
                return self._error_reply(msg_id, "CommandNotFound",
                                         "Capabilities negotiation is already complete, command ignored")
            return self._negotiate(arguments, msg_id)
        if not self._negotiated:
            return self._error_reply(msg_id, "CommandNotFound",
                                     "Expecting capabilities negotiation with 'qmp_capabilities'")
        return Command(name, arguments, msg_id)

    def _negotiate(self, arguments: dict[str, Any], msg_id: Any) -> Reply:
        for key, value in arguments.items():
            if key != "enable":
                return self._error_reply(msg_id, "GenericError", f"Parameter '{key}' is unexpected")
            if not isinstance(value, list):
                return self._error_reply(msg_id, "GenericError",
                                         "Invalid parameter type for 'enable', expected: array")
            for cap in value:
                # QEMU offers 'oob'; we offer none (the greeting's list is empty).
                return self._error_reply(msg_id, "GenericError",
                                         f"Capability '{cap}' not available")
        self._negotiated = True
        return Reply(_encode(_with_id({"return": {}}, msg_id)))

    def _error_reply(self, msg_id: Any, qmp_class: str, desc: str) -> Reply:
        return Reply(self.send_error(msg_id, qmp_class, desc), qmp_class, desc)

    def send_return(self, id: Any, value: Any) -> bytes:
        """Bytes of a successful reply to the command that carried ``id``.

        Raises:
            LocalProtocolError: ``value`` is not JSON-serialisable.
        """
        return _encode(_with_id({"return": value}, id))

    def send_error(self, id: Any, qmp_class: str, desc: str, *, exit_code: int | None = None) -> bytes:
        """Bytes of an error reply ``{"error": {"class", "desc"}, "id"}``.

        Args:
            exit_code: the mirrorfs CLI exit code the error stands for (1 refused by state, 2 bad
                input), sent as the extension member ``__org.mirrorfs_exit-code`` of the error
                object: QMP's classes alone cannot tell a malformed value from a refusal (QEMU
                reports both as GenericError), and QMP clients ignore members they do not know.
        """
        error: dict[str, Any] = {"class": qmp_class, "desc": desc}
        if exit_code is not None:
            error[EXIT_CODE_MEMBER] = exit_code
        return _encode(_with_id({"error": error}, id))

    def send_event(self, name: str, data: dict[str, Any], *, timestamp: float | None = None) -> bytes:
        """Bytes of an event, stamped with ``timestamp`` (default: now).

        Raises:
            LocalProtocolError: the session is not negotiated (QEMU sends no events before), or
                ``data`` is not JSON-serialisable.
        """
        if not self._negotiated:
            raise LocalProtocolError("events are only sent after capabilities negotiation")
        if timestamp is None:
            timestamp = time.time()
        seconds = int(timestamp)
        micro = int(round((timestamp - seconds) * 1_000_000))
        if micro >= 1_000_000:
            seconds, micro = seconds + 1, micro - 1_000_000
        return _encode({"event": name, "data": data,
                        "timestamp": {"seconds": seconds, "microseconds": micro}})


class QMPClientConnection:
    """The client side of one QMP session: the inverse of :class:`QMPServerConnection`.

    The server sends one message per line, so this side splits on newlines. The first message
    must be the greeting; then returns, errors and events in any interleaving.

    Args:
        max_line: longest accepted line from the server.
    """

    def __init__(self, *, max_line: int = 64 << 20) -> None:
        self._buf = bytearray()
        self._greeted = False
        self._eof = False
        self._max_line = max_line

    def receive_data(self, data: bytes) -> None:
        """Hand over bytes from the server; ``b""`` means it closed the connection."""
        if not data:
            self._eof = True
        self._buf += data

    def send_command(self, name: str, arguments: dict[str, Any] | None = None, id: Any = NO_ID) -> bytes:
        """Bytes of ``{"execute": name, "arguments": ..., "id": ...}``.

        Raises:
            LocalProtocolError: ``arguments`` is not JSON-serialisable.
        """
        msg: dict[str, Any] = {"execute": name}
        if arguments:
            msg["arguments"] = arguments
        return _encode(_with_id(msg, id))

    def next_event(self) -> ClientEvent | Any:
        """The next message from the server, ``NEED_DATA`` or ``CLOSED``.

        Raises:
            RemoteProtocolError: the server sent something that is not QMP.
        """
        while True:
            nl = self._buf.find(b"\n")
            if nl < 0:
                if len(self._buf) > self._max_line:
                    raise RemoteProtocolError("QMP server sent an over-long line")
                if self._eof:
                    if self._buf.strip():
                        raise RemoteProtocolError("QMP server closed the connection mid-message")
                    return CLOSED
                return NEED_DATA
            line = bytes(self._buf[:nl])
            del self._buf[:nl + 1]
            if line.strip():
                break
        try:
            msg = _decode(line.strip())
        except ValueError as exc:
            raise RemoteProtocolError(f"QMP server sent invalid JSON: {exc}") from None
        if not isinstance(msg, dict):
            raise RemoteProtocolError("QMP server sent a message that is not a JSON object")
        if not self._greeted:
            qmp = msg.get("QMP")
            if not isinstance(qmp, dict) or not isinstance(qmp.get("version"), dict):
                raise RemoteProtocolError("QMP server did not start with a greeting")
            self._greeted = True
            return Greeting(qmp["version"], list(qmp.get("capabilities", [])))
        msg_id = msg.get("id", NO_ID)
        if "return" in msg:
            return Return(msg["return"], msg_id)
        if "error" in msg:
            err = msg["error"]
            if not isinstance(err, dict) or not isinstance(err.get("class"), str) \
                    or not isinstance(err.get("desc"), str):
                raise RemoteProtocolError("QMP server sent a malformed error reply")
            exit_code = err.get(EXIT_CODE_MEMBER)
            return Error(err["class"], err["desc"], msg_id,
                         exit_code if isinstance(exit_code, int) else None)
        if "event" in msg and isinstance(msg["event"], str):
            return Event(msg["event"], msg.get("data", {}) or {}, msg.get("timestamp", {}) or {})
        raise RemoteProtocolError(f"QMP server sent an unknown message: {line[:200]!r}")
