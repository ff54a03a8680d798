"""The NBD protocol, client side, without any I/O (in the manner of h11).

Role: turn the bytes a server sends into events, and the client's requests into bytes. It never
touches a socket, a clock or a file; :mod:`mirrorfs.nbd.client` moves the bytes.

Usage::

    conn = ClientConnection("export", tls=False)
    while True:                                   # the handshake
        event = conn.next_event()
        if event is NEED_DATA:
            send(conn.data_to_send()); conn.receive_data(recv())
        elif isinstance(event, StartTLS):
            wrap the socket in TLS; conn.tls_started()
        elif isinstance(event, Ready):
            break                                  # transmission phase
    cookie, chunks = conn.send_request(NBD_CMD_WRITE, offset, len(data), data=data)
    ... Reply(cookie, error, data, message) events come out of next_event() in any order.

Invariants:
- Fixed newstyle negotiation only: the client sends ``NBD_FLAG_C_FIXED_NEWSTYLE`` (and
  ``NBD_FLAG_C_NO_ZEROES`` when offered), ``NBD_OPT_STARTTLS`` first when TLS is wanted,
  ``NBD_OPT_STRUCTURED_REPLY`` (the server may refuse it), then ``NBD_OPT_GO`` with the export
  name, requesting ``NBD_INFO_BLOCK_SIZE``, ``NBD_INFO_NAME`` and ``NBD_INFO_DESCRIPTION``.
  One option is in flight at a time, as the protocol demands.
- Every request carries a fresh cookie; exactly one :class:`Reply` event comes out for it (after
  the ``NBD_REPLY_FLAG_DONE`` chunk of a structured reply, or the simple reply). A read reply is
  assembled into one buffer: ``OFFSET_DATA`` chunks are copied in, ``OFFSET_HOLE`` chunks read as
  zeroes, and the chunks must cover the request exactly once.
- Requests are checked against what the server offered (flags, size, block sizes) before they are
  encoded: a violation raises ``LocalProtocolError`` and changes no state. Anything malformed
  from the server raises ``RemoteProtocolError``; after that the connection is unusable.
- Refusals during the handshake (``NBD_REP_ERR_*``) raise ``TargetFatalError`` (or
  ``TargetRetryableError`` for ``NBD_REP_ERR_SHUTDOWN``) with a message that says what to do.
"""

from __future__ import annotations

import bisect
import dataclasses
import errno as _errno
import struct

from mirrorfs.errors import (
    LocalProtocolError,
    RemoteProtocolError,
    TargetFatalError,
    TargetRetryableError,
)

# --- magic numbers -------------------------------------------------------------------------
NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
NBD_OPT_REPLY_MAGIC = 0x3E889045565A9
NBD_REQUEST_MAGIC = 0x25609513
NBD_SIMPLE_REPLY_MAGIC = 0x67446698
NBD_STRUCTURED_REPLY_MAGIC = 0x668E33EF

# --- handshake flags (server) and client flags -----------------------------------------------
NBD_FLAG_FIXED_NEWSTYLE = 1 << 0
NBD_FLAG_NO_ZEROES = 1 << 1
NBD_FLAG_C_FIXED_NEWSTYLE = 1 << 0
NBD_FLAG_C_NO_ZEROES = 1 << 1

# --- options ---------------------------------------------------------------------------------
NBD_OPT_EXPORT_NAME = 1
NBD_OPT_ABORT = 2
NBD_OPT_LIST = 3
NBD_OPT_STARTTLS = 5
NBD_OPT_INFO = 6
NBD_OPT_GO = 7
NBD_OPT_STRUCTURED_REPLY = 8

# --- option reply types ----------------------------------------------------------------------
NBD_REP_ACK = 1
NBD_REP_SERVER = 2
NBD_REP_INFO = 3
NBD_REP_FLAG_ERROR = 1 << 31
NBD_REP_ERR_UNSUP = NBD_REP_FLAG_ERROR | 1
NBD_REP_ERR_POLICY = NBD_REP_FLAG_ERROR | 2
NBD_REP_ERR_INVALID = NBD_REP_FLAG_ERROR | 3
NBD_REP_ERR_PLATFORM = NBD_REP_FLAG_ERROR | 4
NBD_REP_ERR_TLS_REQD = NBD_REP_FLAG_ERROR | 5
NBD_REP_ERR_UNKNOWN = NBD_REP_FLAG_ERROR | 6
NBD_REP_ERR_SHUTDOWN = NBD_REP_FLAG_ERROR | 7
NBD_REP_ERR_BLOCK_SIZE_REQD = NBD_REP_FLAG_ERROR | 8
NBD_REP_ERR_TOO_BIG = NBD_REP_FLAG_ERROR | 9

# --- NBD_REP_INFO types ----------------------------------------------------------------------
NBD_INFO_EXPORT = 0
NBD_INFO_NAME = 1
NBD_INFO_DESCRIPTION = 2
NBD_INFO_BLOCK_SIZE = 3

# --- transmission flags ----------------------------------------------------------------------
NBD_FLAG_HAS_FLAGS = 1 << 0
NBD_FLAG_READ_ONLY = 1 << 1
NBD_FLAG_SEND_FLUSH = 1 << 2
NBD_FLAG_SEND_FUA = 1 << 3
NBD_FLAG_ROTATIONAL = 1 << 4
NBD_FLAG_SEND_TRIM = 1 << 5
NBD_FLAG_SEND_WRITE_ZEROES = 1 << 6
NBD_FLAG_SEND_DF = 1 << 7
NBD_FLAG_CAN_MULTI_CONN = 1 << 8
NBD_FLAG_SEND_RESIZE = 1 << 9
NBD_FLAG_SEND_CACHE = 1 << 10
NBD_FLAG_SEND_FAST_ZERO = 1 << 11

# --- commands and command flags --------------------------------------------------------------
NBD_CMD_READ = 0
NBD_CMD_WRITE = 1
NBD_CMD_DISC = 2
NBD_CMD_FLUSH = 3
NBD_CMD_TRIM = 4
NBD_CMD_CACHE = 5
NBD_CMD_WRITE_ZEROES = 6
NBD_CMD_BLOCK_STATUS = 7

NBD_CMD_FLAG_FUA = 1 << 0
NBD_CMD_FLAG_NO_HOLE = 1 << 1
NBD_CMD_FLAG_DF = 1 << 2

CMD_NAMES = {
    NBD_CMD_READ: "read", NBD_CMD_WRITE: "write", NBD_CMD_DISC: "disconnect",
    NBD_CMD_FLUSH: "flush", NBD_CMD_TRIM: "trim", NBD_CMD_CACHE: "cache",
    NBD_CMD_WRITE_ZEROES: "write-zeroes", NBD_CMD_BLOCK_STATUS: "block-status",
}

# --- structured reply chunks -----------------------------------------------------------------
NBD_REPLY_FLAG_DONE = 1 << 0
NBD_REPLY_TYPE_NONE = 0
NBD_REPLY_TYPE_OFFSET_DATA = 1
NBD_REPLY_TYPE_OFFSET_HOLE = 2
NBD_REPLY_TYPE_BLOCK_STATUS = 5
NBD_REPLY_TYPE_ERROR = (1 << 15) | 1
NBD_REPLY_TYPE_ERROR_OFFSET = (1 << 15) | 2

# --- error values on the wire ----------------------------------------------------------------
# The protocol fixes these numbers (they happen to equal Linux's); map them explicitly so the
# local errno is right on any platform. Unknown values are reported as EIO.
NBD_EPERM = 1
NBD_EIO = 5
NBD_ENOMEM = 12
NBD_EINVAL = 22
NBD_ENOSPC = 28
NBD_EOVERFLOW = 75
NBD_ENOTSUP = 95
NBD_ESHUTDOWN = 108
_NBD_TO_ERRNO = {
    NBD_EPERM: _errno.EPERM, NBD_EIO: _errno.EIO, NBD_ENOMEM: _errno.ENOMEM,
    NBD_EINVAL: _errno.EINVAL, NBD_ENOSPC: _errno.ENOSPC, NBD_EOVERFLOW: _errno.EOVERFLOW,
    NBD_ENOTSUP: _errno.ENOTSUP, NBD_ESHUTDOWN: _errno.ESHUTDOWN,
}


def nbd_error_to_errno(value: int) -> int:
    """Translate an NBD error value from a reply to the local errno (unknown values → EIO)."""
    return _NBD_TO_ERRNO.get(value, _errno.EIO)


#: default and upper bound of one data request when the server announces no maximum
DEFAULT_MAX_BLOCK = 32 * 1024 * 1024
#: cap on non-payload request lengths (WRITE_ZEROES, TRIM): the length field is 32 bits
MAX_NONPAYLOAD_REQUEST = 1 << 30
#: option replies longer than this are a broken server, not a real answer
_MAX_OPTION_REPLY = 64 * 1024

_GREETING = struct.Struct(">QQH")
_OPTION = struct.Struct(">QII")
_OPT_REPLY = struct.Struct(">QIII")
_REQUEST = struct.Struct(">IHHQQI")
_SIMPLE = struct.Struct(">IIQ")
_STRUCTURED = struct.Struct(">IHHQI")


class _NeedData:
    def __repr__(self) -> str:
        return "NEED_DATA"


#: returned by :meth:`ClientConnection.next_event` when more bytes must be received first
NEED_DATA = _NeedData()


@dataclasses.dataclass(frozen=True)
class StartTLS:
    """The server accepted ``NBD_OPT_STARTTLS``: wrap the transport in TLS, then call
    :meth:`ClientConnection.tls_started`. No byte may pass in clear text in between."""


@dataclasses.dataclass(frozen=True)
class Ready:
    """The handshake is done; the transmission phase starts.

    Attributes:
        size: export size in bytes.
        flags: transmission flags (``NBD_FLAG_*``).
        structured_replies: whether the server agreed to structured replies.
        min_block, preferred_block, max_block: block size constraints (defaults 1, 4096, 32 MiB
            when the server sent none).
        name: canonical export name if the server sent ``NBD_INFO_NAME``.
        description: export description if the server sent ``NBD_INFO_DESCRIPTION``.
    """

    size: int
    flags: int
    structured_replies: bool
    min_block: int = 1
    preferred_block: int = 4096
    max_block: int = DEFAULT_MAX_BLOCK
    name: str | None = None
    description: str | None = None


@dataclasses.dataclass(frozen=True)
class Reply:
    """The complete reply to one request.

    Attributes:
        cookie: the request's cookie.
        command: the request's ``NBD_CMD_*``.
        error: the local errno of the failure, 0 on success.
        data: for a successful read, exactly the requested bytes (``bytes``); otherwise ``None``.
        message: the server's error text from a structured error chunk, if any.
    """

    cookie: int
    command: int
    error: int = 0
    data: bytes | None = None
    message: str = ""


@dataclasses.dataclass(frozen=True)
class ConnectionClosed:
    """The server closed the connection (EOF) between messages."""


Event = StartTLS | Ready | Reply | ConnectionClosed


def _cover(pending: _Pending, start: int, end: int) -> bool:
    """Add [start, end) to the ranges the reply covers; False if it overlaps one of them.

    Servers send chunks in order almost always, so the list stays one merged range and each
    call is a bisect over at most two numbers.
    """
    ranges = pending.ranges
    if ranges is None:
        pending.ranges = [start, end]
        return True
    # An odd count of bounds at or before ``start`` means it lies inside a range; an even one
    # that ranges[i] is the start of the next range, which ``end`` must not pass.
    i = bisect.bisect_right(ranges, start)
    if i & 1 or (i < len(ranges) and ranges[i] < end):
        return False
    joins_left = i > 0 and ranges[i - 1] == start
    joins_right = i < len(ranges) and ranges[i] == end
    if joins_left and joins_right:
        del ranges[i - 1:i + 1]
    elif joins_left:
        ranges[i - 1] = end
    elif joins_right:
        ranges[i] = start
    else:
        ranges[i:i] = [start, end]
    return True


@dataclasses.dataclass
class _Pending:
    command: int
    offset: int
    length: int
    buffer: bytes | bytearray | None = None
    #: bytes of the request the chunks so far have covered (each byte at most once)
    covered: int = 0
    #: the covered ranges, relative to ``offset``, disjoint and with adjacent ones merged:
    #: ``[start0, end0, start1, end1, ...]`` in order; None until a chunk covers part of it
    ranges: list[int] | None = None
    error: int = 0
    message: str = ""
    discard: bool = False


# handshake states
_S_GREETING = "greeting"
_S_STARTTLS = "starttls"
_S_TLS_WAIT = "tls-wait"
_S_STRUCTURED = "structured"
_S_GO = "go"
_S_TRANSMISSION = "transmission"
_S_CLOSED = "closed"

_REP_ERR_TEXT = {
    NBD_REP_ERR_UNSUP: "the server does not support this option",
    NBD_REP_ERR_POLICY: "the server's policy forbids it",
    NBD_REP_ERR_INVALID: "the server says the request is invalid",
    NBD_REP_ERR_PLATFORM: "the server does not support it on this platform",
    NBD_REP_ERR_TLS_REQD: "the server requires TLS (use nbds:// or nbds+unix://)",
    NBD_REP_ERR_UNKNOWN: "no such export on the server",
    NBD_REP_ERR_SHUTDOWN: "the server is shutting down",
    NBD_REP_ERR_BLOCK_SIZE_REQD: "the server requires block size negotiation",
    NBD_REP_ERR_TOO_BIG: "the request is too big for the server",
}


def _option_error(export_name: str, option: int, reply: int, message: str) -> Exception:
    """The error that reports the server's refusal ``reply`` of ``option``."""
    text = _REP_ERR_TEXT.get(reply, f"unknown error reply 0x{reply:x}")
    detail = f": {message}" if message else ""
    if option == NBD_OPT_GO:
        what = f"export {export_name!r} refused"
    elif option == NBD_OPT_STARTTLS:
        what = "TLS refused"
    else:
        what = f"option {option} refused"
    err = f"{what}: {text}{detail}"
    if reply == NBD_REP_ERR_SHUTDOWN:
        return TargetRetryableError(err)
    return TargetFatalError(err)


def _parse_info(info: dict[str, object], payload: bytes) -> None:
    """Record what one ``NBD_REP_INFO`` reply tells about the export in ``info``."""
    if len(payload) < 2:
        raise RemoteProtocolError("NBD_REP_INFO without an info type")
    (kind,) = struct.unpack_from(">H", payload)
    if kind == NBD_INFO_EXPORT:
        if len(payload) != 12:
            raise RemoteProtocolError("NBD_INFO_EXPORT of the wrong length")
        info["size"], info["flags"] = struct.unpack_from(">QH", payload, 2)
    elif kind == NBD_INFO_BLOCK_SIZE:
        if len(payload) != 14:
            raise RemoteProtocolError("NBD_INFO_BLOCK_SIZE of the wrong length")
        mn, pref, mx = struct.unpack_from(">III", payload, 2)
        if not (mn and mn & (mn - 1) == 0 and mn <= 65536 and pref >= mn
                and pref & (pref - 1) == 0 and mx >= pref):
            raise RemoteProtocolError(f"invalid block sizes {mn}/{pref}/{mx}")
        info["blocks"] = (mn, pref, mx)
    elif kind == NBD_INFO_NAME:
        info["name"] = payload[2:].decode("utf-8", "replace")
    elif kind == NBD_INFO_DESCRIPTION:
        info["description"] = payload[2:].decode("utf-8", "replace")
    # other info types are ignored, as the protocol asks


def _ready_from_info(info: dict[str, object], structured: bool) -> Ready:
    """The :class:`Ready` event for what the ``NBD_REP_INFO`` replies told."""
    if "size" not in info:
        raise RemoteProtocolError("NBD_OPT_GO acknowledged without NBD_INFO_EXPORT")
    flags = int(info["flags"])  # type: ignore[call-overload]
    if not flags & NBD_FLAG_HAS_FLAGS:
        flags = NBD_FLAG_HAS_FLAGS  # flags field invalid: assume nothing is offered
    mn, pref, mx = info.get("blocks", (1, 4096, DEFAULT_MAX_BLOCK))  # type: ignore[misc]
    return Ready(size=int(info["size"]),  # type: ignore[call-overload]
                 flags=flags, structured_replies=structured,
                 min_block=mn, preferred_block=pref, max_block=min(mx, DEFAULT_MAX_BLOCK),
                 name=info.get("name"),  # type: ignore[arg-type]
                 description=info.get("description"))  # type: ignore[arg-type]


class _Wire:
    """The byte buffers under a connection: what came in and is not parsed yet, what is to go out.

    Parsing advances ``_inpos``; the consumed bytes are dropped in batches (``_compact``), so a
    reply is not copied once per field.
    """

    def __init__(self) -> None:
        self._inbuf = bytearray()
        self._inpos = 0
        self._eof = False
        self._out: list[bytes] = []

    def data_to_send(self) -> bytes:
        """Bytes to send to the server now (possibly ``b""``); for requests prefer the chunks
        :meth:`send_request` returns."""
        out = b"".join(self._out)
        self._out.clear()
        return out

    def _available(self) -> int:
        return len(self._inbuf) - self._inpos

    def _take(self, n: int) -> bytes:
        # Small fields only (headers, option payloads): a copy, so no buffer export is left
        # behind that would stop the input buffer from being resized.
        start = self._inpos
        self._inpos += n
        return bytes(self._inbuf[start:start + n])

    def _take_bytes(self, n: int) -> bytes:
        # Bulk data as an immutable result: one copy out of the input buffer.
        view = memoryview(self._inbuf)
        try:
            out = bytes(view[self._inpos:self._inpos + n])
        finally:
            view.release()
        self._inpos += n
        return out

    def _copy_into(self, dst: bytearray, dst_offset: int, n: int) -> None:
        # Bulk data: copy straight from the input buffer into the read buffer (one copy).
        view = memoryview(self._inbuf)
        try:
            dst[dst_offset:dst_offset + n] = view[self._inpos:self._inpos + n]
        finally:
            view.release()
        self._inpos += n

    def _compact(self) -> None:
        # Drop consumed bytes. Deleting from the front of a bytearray is cheap in CPython,
        # but doing it once per next_event() keeps memoryviews from pinning the buffer.
        if self._inpos:
            del self._inbuf[:self._inpos]
            self._inpos = 0

    def _need(self, n: int) -> bool:
        return self._available() >= n


class ClientConnection(_Wire):
    """The client side of one NBD connection, as a sans-I/O state machine.

    Args:
        export_name: the export to ask for with ``NBD_OPT_GO``.
        tls: negotiate ``NBD_OPT_STARTTLS`` first (the adapter then wraps the transport).
        structured_replies: ask for ``NBD_OPT_STRUCTURED_REPLY``.
        allow_read_only: accept an export flagged ``NBD_FLAG_READ_ONLY`` (reads only); mirrors
            never do.
    """

    def __init__(self, export_name: str = "", *, tls: bool = False,
                 structured_replies: bool = True, allow_read_only: bool = False) -> None:
        self.export_name = export_name
        self._export_bytes = export_name.encode("utf-8")
        if len(self._export_bytes) > 4096:
            raise LocalProtocolError("export name longer than 4096 bytes")
        self._want_tls = tls
        self._want_structured = structured_replies
        self._allow_read_only = allow_read_only
        super().__init__()
        self._state = _S_GREETING
        self._next_cookie = 1
        self._pending: dict[int, _Pending] = {}
        # filled during the handshake
        self._structured = False
        self._info: dict[str, object] = {}
        self.ready: Ready | None = None

    # ---- generic byte plumbing ---------------------------------------------------------------
    @property
    def state(self) -> str:
        """The current phase: greeting, starttls, tls-wait, structured, go, transmission, closed."""
        return self._state

    @property
    def pending(self) -> int:
        """Number of requests sent whose reply is not complete yet."""
        return len(self._pending)

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Feed bytes received from the server; ``b""`` means the server closed the connection.

        Raises:
            LocalProtocolError: data after EOF, or in clear text while TLS is being set up.
        """
        if self._eof:
            raise LocalProtocolError("data received after end of stream")
        if not data:
            self._eof = True
            return
        if self._state == _S_TLS_WAIT:
            raise LocalProtocolError("clear-text data received while TLS is being set up")
        self._inbuf += data

    # ---- the handshake -----------------------------------------------------------------------
    def _send_option(self, option: int, payload: bytes = b"") -> None:
        self._out.append(_OPTION.pack(IHAVEOPT, option, len(payload)) + payload)

    def _send_go(self) -> None:
        infos = (NBD_INFO_BLOCK_SIZE, NBD_INFO_NAME, NBD_INFO_DESCRIPTION)
        payload = (struct.pack(">I", len(self._export_bytes)) + self._export_bytes
                   + struct.pack(">H", len(infos)) + b"".join(struct.pack(">H", i) for i in infos))
        self._send_option(NBD_OPT_GO, payload)
        self._state = _S_GO

    def _after_tls(self) -> None:
        if self._want_structured:
            self._send_option(NBD_OPT_STRUCTURED_REPLY)
            self._state = _S_STRUCTURED
        else:
            self._send_go()

    def tls_started(self) -> None:
        """Tell the machine that the transport is now TLS; option haggling goes on inside it.

        Raises:
            LocalProtocolError: no :class:`StartTLS` event was pending.
        """
        if self._state != _S_TLS_WAIT:
            raise LocalProtocolError(f"tls_started() in state {self._state}")
        self._after_tls()

    def abort_bytes(self) -> bytes:
        """Bytes of a polite goodbye for the current phase (``NBD_OPT_ABORT`` while haggling,
        ``NBD_CMD_DISC`` in transmission); moves to the closed state."""
        if self._state in (_S_STARTTLS, _S_STRUCTURED, _S_GO, _S_GREETING) and not self._eof:
            out = b"" if self._state == _S_GREETING else _OPTION.pack(IHAVEOPT, NBD_OPT_ABORT, 0)
        elif self._state == _S_TRANSMISSION:
            out = _REQUEST.pack(NBD_REQUEST_MAGIC, 0, NBD_CMD_DISC, 0, 0, 0)
        else:
            out = b""
        self._state = _S_CLOSED
        return out

    def _handshake_event(self) -> Event | _NeedData:
        if self._state == _S_GREETING:
            if not self._need(_GREETING.size):
                return self._eof_or_need("greeting")
            magic, opt, hflags = _GREETING.unpack(self._take(_GREETING.size))
            if magic != NBDMAGIC:
                raise RemoteProtocolError("not an NBD server (bad greeting magic)")
            if opt != IHAVEOPT:
                raise RemoteProtocolError("the server speaks oldstyle NBD, which is not supported")
            if not hflags & NBD_FLAG_FIXED_NEWSTYLE:
                raise RemoteProtocolError("the server does not support fixed newstyle negotiation")
            cflags = NBD_FLAG_C_FIXED_NEWSTYLE | (hflags & NBD_FLAG_NO_ZEROES and NBD_FLAG_C_NO_ZEROES)
            self._out.append(struct.pack(">I", cflags))
            if self._want_tls:
                self._send_option(NBD_OPT_STARTTLS)
                self._state = _S_STARTTLS
            else:
                self._after_tls()
            return self._handshake_event()
        # an option reply
        if not self._need(_OPT_REPLY.size):
            return self._eof_or_need("option reply")
        magic, option, reply, length = _OPT_REPLY.unpack(
            self._inbuf[self._inpos:self._inpos + _OPT_REPLY.size])
        if magic != NBD_OPT_REPLY_MAGIC:
            raise RemoteProtocolError(f"bad option reply magic 0x{magic:x}")
        if length > _MAX_OPTION_REPLY:
            raise RemoteProtocolError(f"option reply of {length} bytes is too long")
        if not self._need(_OPT_REPLY.size + length):
            return self._eof_or_need("option reply")
        self._take(_OPT_REPLY.size)
        payload = self._take(length)
        expected = {_S_STARTTLS: NBD_OPT_STARTTLS, _S_STRUCTURED: NBD_OPT_STRUCTURED_REPLY,
                    _S_GO: NBD_OPT_GO}[self._state]
        if option != expected:
            raise RemoteProtocolError(f"reply to option {option} while waiting for {expected}")
        if reply & NBD_REP_FLAG_ERROR:
            message = payload.decode("utf-8", "replace")
            if self._state == _S_STRUCTURED and reply in (NBD_REP_ERR_UNSUP, NBD_REP_ERR_POLICY):
                self._structured = False  # fine: simple replies only
                self._send_go()
                return self._handshake_event()
            if self._state == _S_GO and reply == NBD_REP_ERR_UNSUP:
                raise TargetFatalError("the NBD server is too old: it does not support NBD_OPT_GO")
            raise _option_error(self.export_name, option, reply, message)
        if self._state == _S_STARTTLS:
            if reply != NBD_REP_ACK:
                raise RemoteProtocolError(f"unexpected reply {reply} to NBD_OPT_STARTTLS")
            if self._available():
                raise RemoteProtocolError("clear-text data after the STARTTLS acknowledgement")
            self._state = _S_TLS_WAIT
            return StartTLS()
        if self._state == _S_STRUCTURED:
            if reply != NBD_REP_ACK:
                raise RemoteProtocolError(f"unexpected reply {reply} to NBD_OPT_STRUCTURED_REPLY")
            self._structured = True
            self._send_go()
            return self._handshake_event()
        # NBD_OPT_GO
        if reply == NBD_REP_INFO:
            _parse_info(self._info, payload)
            return self._handshake_event()
        if reply != NBD_REP_ACK:
            raise RemoteProtocolError(f"unexpected reply {reply} to NBD_OPT_GO")
        return self._finish_go()

    def _finish_go(self) -> Ready:
        ready = _ready_from_info(self._info, self._structured)
        self.ready = ready
        self._state = _S_TRANSMISSION
        if ready.flags & NBD_FLAG_READ_ONLY and not self._allow_read_only:
            raise TargetFatalError(f"export {self.export_name!r} is read-only: "
                                   f"a mirror target must be writable")
        return ready

    def _eof_or_need(self, what: str) -> _NeedData:
        if self._eof:
            raise TargetRetryableError(f"the NBD server closed the connection during the "
                                       f"handshake (waiting for the {what})")
        return NEED_DATA

    # ---- transmission ------------------------------------------------------------------------
    def send_request(self, command: int, offset: int = 0, length: int = 0, *, flags: int = 0,
                     data: bytes | bytearray | memoryview | None = None) -> tuple[int, list]:
        """Encode one request and remember it until its reply.

        Args:
            command: ``NBD_CMD_READ``, ``NBD_CMD_WRITE``, ``NBD_CMD_FLUSH``, ``NBD_CMD_TRIM``,
                ``NBD_CMD_WRITE_ZEROES`` (``NBD_CMD_DISC``: use :meth:`abort_bytes`).
            offset: byte offset in the export.
            length: byte count (must equal ``len(data)`` for a write).
            flags: ``NBD_CMD_FLAG_*``.
            data: the payload of a write; sent as is, not copied.

        Returns:
            ``(cookie, chunks)``: the cookie that the :class:`Reply` will carry, and the byte
            chunks to send in order.

        Raises:
            LocalProtocolError: not in transmission, a command or flag the server did not offer,
                a range outside the export, a misaligned or oversized request.
        """
        ready = self.ready
        if self._state != _S_TRANSMISSION or ready is None:
            raise LocalProtocolError(f"cannot send a request in state {self._state}")
        name = CMD_NAMES.get(command, str(command))
        sflags = ready.flags
        if command in (NBD_CMD_WRITE, NBD_CMD_TRIM, NBD_CMD_WRITE_ZEROES) and \
                sflags & NBD_FLAG_READ_ONLY:
            raise LocalProtocolError(f"{name} on a read-only export")
        needed = {NBD_CMD_FLUSH: NBD_FLAG_SEND_FLUSH, NBD_CMD_TRIM: NBD_FLAG_SEND_TRIM,
                  NBD_CMD_WRITE_ZEROES: NBD_FLAG_SEND_WRITE_ZEROES}.get(command)
        if command not in (NBD_CMD_READ, NBD_CMD_WRITE) and needed is None:
            raise LocalProtocolError(f"unsupported command {name}")
        if needed is not None and not sflags & needed:
            raise LocalProtocolError(f"the server does not offer {name}")
        if flags & NBD_CMD_FLAG_FUA and not sflags & NBD_FLAG_SEND_FUA:
            raise LocalProtocolError("the server does not offer FUA")
        if flags & ~(NBD_CMD_FLAG_FUA | NBD_CMD_FLAG_NO_HOLE):
            raise LocalProtocolError(f"unsupported command flags 0x{flags:x}")
        if command == NBD_CMD_WRITE:
            if data is None or len(data) != length:
                raise LocalProtocolError("write length does not match its data")
        elif data is not None:
            raise LocalProtocolError(f"{name} carries no data")
        if command == NBD_CMD_FLUSH:
            if offset or length:
                raise LocalProtocolError("flush takes no range")
        else:
            if offset < 0 or length <= 0 or offset + length > ready.size:
                raise LocalProtocolError(f"{name} of {length} bytes at {offset} is outside the "
                                         f"export of {ready.size} bytes")
            if command in (NBD_CMD_READ, NBD_CMD_WRITE) and length > ready.max_block:
                raise LocalProtocolError(f"{name} of {length} bytes exceeds the server's maximum "
                                         f"of {ready.max_block}")
            if length > 0xFFFFFFFF:
                raise LocalProtocolError(f"{name} of {length} bytes does not fit the length field")
            # only the tail of an export whose size is not a multiple may end unaligned
            mn = ready.min_block
            if offset % mn or (length % mn and offset + length != ready.size):
                raise LocalProtocolError(f"{name} at {offset}+{length} is not aligned to the "
                                         f"server's minimum block size {ready.min_block}")
        cookie = self._next_cookie
        self._next_cookie = (cookie + 1) & 0xFFFFFFFFFFFFFFFF or 1
        header = _REQUEST.pack(NBD_REQUEST_MAGIC, flags, command, cookie, offset, length)
        self._pending[cookie] = _Pending(command, offset, length)
        return cookie, [header, data] if command == NBD_CMD_WRITE else [header]

    def forget(self, cookie: int) -> None:
        """Drop a request whose reply is no longer wanted; its reply is still parsed, then
        discarded (the connection stays in sync)."""
        pending = self._pending.get(cookie)
        if pending is not None:
            pending.discard = True

    def next_event(self) -> Event | _NeedData:
        """Parse the next event out of the received bytes.

        Returns:
            A :class:`StartTLS`, :class:`Ready`, :class:`Reply` or :class:`ConnectionClosed`
            event, or :data:`NEED_DATA`.

        Raises:
            RemoteProtocolError: the server broke the protocol.
            TargetFatalError / TargetRetryableError: the server refused the handshake.
        """
        try:
            if self._state in (_S_GREETING, _S_STARTTLS, _S_STRUCTURED, _S_GO):
                return self._handshake_event()
            if self._state == _S_TLS_WAIT:
                return NEED_DATA
            if self._state == _S_TRANSMISSION:
                return self._transmission_event()
            if self._eof and not self._available():
                return ConnectionClosed()
            raise LocalProtocolError("the connection is closed")
        except (RemoteProtocolError, TargetFatalError, TargetRetryableError):
            self._state = _S_CLOSED
            raise
        finally:
            if self._inpos > 65536 or self._inpos == len(self._inbuf):
                self._compact()

    def _transmission_event(self) -> Event | _NeedData:
        while True:
            if not self._need(4):
                return self._end_or_need()
            (magic,) = struct.unpack_from(">I", self._inbuf, self._inpos)
            if magic == NBD_SIMPLE_REPLY_MAGIC:
                event = self._simple_reply()
            elif magic == NBD_STRUCTURED_REPLY_MAGIC:
                event = self._structured_chunk()
            else:
                raise RemoteProtocolError(f"bad reply magic 0x{magic:08x}")
            if event is NEED_DATA:
                return self._end_or_need()
            if event is not None:
                return event

    def _end_or_need(self) -> Event | _NeedData:
        if self._eof:
            self._state = _S_CLOSED
            if self._available():
                raise RemoteProtocolError("the server closed the connection in the middle of a reply")
            return ConnectionClosed()
        return NEED_DATA

    def _lookup(self, cookie: int) -> _Pending:
        pending = self._pending.get(cookie)
        if pending is None:
            raise RemoteProtocolError(f"reply for unknown cookie {cookie}")
        return pending

    def _complete(self, cookie: int, pending: _Pending) -> Reply | None:
        del self._pending[cookie]
        if pending.discard:
            return None
        data = None
        if pending.command == NBD_CMD_READ and not pending.error:
            if pending.covered != pending.length:
                raise RemoteProtocolError(f"read reply covers {pending.covered} of "
                                          f"{pending.length} bytes")
            data = bytes(pending.buffer) if isinstance(pending.buffer, bytearray) else pending.buffer
        return Reply(cookie, pending.command, pending.error, data, pending.message)

    def _simple_reply(self) -> Reply | None | _NeedData:
        if not self._need(_SIMPLE.size):
            return NEED_DATA
        _, error, cookie = _SIMPLE.unpack_from(self._inbuf, self._inpos)
        pending = self._lookup(cookie)
        payload = pending.length if pending.command == NBD_CMD_READ and not error else 0
        if not self._need(_SIMPLE.size + payload):
            return NEED_DATA
        self._inpos += _SIMPLE.size
        if payload:
            pending.buffer = self._take_bytes(payload)
            pending.covered = payload
        if error:
            pending.error = nbd_error_to_errno(error)
        return self._complete(cookie, pending)

    def _structured_chunk(self) -> Reply | None | _NeedData:
        if not self._need(_STRUCTURED.size):
            return NEED_DATA
        _, flags, kind, cookie, length = _STRUCTURED.unpack_from(self._inbuf, self._inpos)
        if not self._structured:
            raise RemoteProtocolError("structured reply chunk that was not negotiated")
        pending = self._lookup(cookie)
        if length > pending.length + 64 * 1024 + 16:
            raise RemoteProtocolError(f"reply chunk of {length} bytes for a request of "
                                      f"{pending.length}")
        if not self._need(_STRUCTURED.size + length):
            return NEED_DATA
        self._inpos += _STRUCTURED.size
        # read data is copied straight into the request's buffer; everything else is small
        is_data = kind == NBD_REPLY_TYPE_OFFSET_DATA
        payload = self._take(8 if is_data and length >= 8 else length)
        is_read = pending.command == NBD_CMD_READ
        if kind == NBD_REPLY_TYPE_NONE:
            if length or not flags & NBD_REPLY_FLAG_DONE:
                raise RemoteProtocolError("malformed NBD_REPLY_TYPE_NONE chunk")
        elif kind in (NBD_REPLY_TYPE_OFFSET_DATA, NBD_REPLY_TYPE_OFFSET_HOLE):
            if not is_read:
                raise RemoteProtocolError("data chunk in the reply to a non-read request")
            if kind == NBD_REPLY_TYPE_OFFSET_DATA:
                if length < 9:
                    raise RemoteProtocolError("NBD_REPLY_TYPE_OFFSET_DATA without data")
                (offset,) = struct.unpack_from(">Q", payload)
                count = length - 8
            else:
                if length != 12:
                    raise RemoteProtocolError("NBD_REPLY_TYPE_OFFSET_HOLE of the wrong length")
                offset, count = struct.unpack_from(">QI", payload)
                if count == 0:
                    raise RemoteProtocolError("NBD_REPLY_TYPE_OFFSET_HOLE of zero length")
            start = offset - pending.offset
            if start < 0 or start + count > pending.length:
                raise RemoteProtocolError("read chunk outside the requested range")
            if pending.covered + count > pending.length or not _cover(pending, start, start + count):
                raise RemoteProtocolError("read chunks overlap")
            if pending.buffer is None and count == pending.length:
                # the common case, one chunk for the whole request: build the result directly
                if kind == NBD_REPLY_TYPE_OFFSET_DATA:
                    pending.buffer = self._take_bytes(count)
                else:
                    pending.buffer = bytes(count)
            else:
                if pending.buffer is None:
                    # zero-filled, so holes need no copy
                    pending.buffer = bytearray(pending.length)
                if kind == NBD_REPLY_TYPE_OFFSET_DATA:
                    self._copy_into(pending.buffer, start, count)  # type: ignore[arg-type]
            pending.covered += count
        elif kind in (NBD_REPLY_TYPE_ERROR, NBD_REPLY_TYPE_ERROR_OFFSET):
            if length < 6:
                raise RemoteProtocolError("error chunk too short")
            error, mlen = struct.unpack_from(">IH", payload)
            extra = 8 if kind == NBD_REPLY_TYPE_ERROR_OFFSET else 0
            if 6 + mlen + extra != length or error == 0:
                raise RemoteProtocolError("malformed error chunk")
            if not pending.error:
                pending.error = nbd_error_to_errno(error)
                pending.message = payload[6:6 + mlen].decode("utf-8", "replace")
                if extra:
                    (where,) = struct.unpack_from(">Q", payload, 6 + mlen)
                    pending.message = (pending.message + f" (at offset {where})").strip()
        elif kind & 0x8000:
            # an unknown error type: the protocol says treat as an error with its value
            error = struct.unpack_from(">I", payload)[0] if length >= 4 else NBD_EIO
            pending.error = pending.error or nbd_error_to_errno(error)
        else:
            raise RemoteProtocolError(f"unexpected reply chunk type {kind}")
        if flags & NBD_REPLY_FLAG_DONE:
            return self._complete(cookie, pending)
        return None
