"""A trio NBD client: moves the bytes of :mod:`mirrorfs.nbd.proto` over TCP, UNIX sockets and TLS.

Design (why there is no background task): a connection is opened by ``await
NBDClient.connect(...)`` and used by whichever tasks call its methods, possibly from a reconnect
loop that outlives any one connection. A reader task would need a nursery that outlives
``connect()``, i.e. a nursery passed in from elsewhere, which breaks trio's causality rule. So
the receive side is owned, at any instant, by at most one of the tasks that wait for a reply
(the *reader*): it receives and dispatches every reply (its own and the others', matched by
cookie) until its own reply is complete, then hands the role to another waiting task. The send
side is serialised by a ``trio.Lock``; each request is sent inside a shielded cancel scope with
its own deadline, so a cancelled caller never leaves half a request on the wire. A caller
cancelled while waiting just abandons its reply; the connection stays in sync (the next reader
parses and drops it). Known limit of the design: replies nobody waits for are read only when
some request is waited for again; if abandoned read replies fill the socket buffers while a
large write is being sent, that send hits its deadline and the connection counts as lost
(retryable) rather than hanging.

Resource handling: the client owns its socket; :meth:`NBDClient.close` (idempotent) sends
``NBD_CMD_DISC`` when it can and closes the socket.

Error handling: every failure is a :class:`~mirrorfs.errors.TargetError`:

- the connection is lost (EOF, reset, a protocol violation by the server, or no reply within
  ``timeout`` seconds of a request being sent; default :data:`DEFAULT_TIMEOUT` = 10 s): every
  pending request fails with ``TargetRetryableError`` and the client closes itself for good
  (reconnect = a new client);
- the server refuses the export, TLS verification fails, the export is read-only:
  ``TargetFatalError``;
- the server fails one request: ``TargetNoSpaceError`` for ENOSPC, else ``TargetError`` with
  its ``errno``; the connection stays usable;
- a request the server cannot take (outside the export, misaligned, a command not offered):
  ``TargetError`` with ``errno`` EINVAL, nothing is sent.
"""

from __future__ import annotations

import dataclasses
import errno as _errno
import os
import socket
import ssl

import trio

from mirrorfs.errors import (
    LocalProtocolError,
    RemoteProtocolError,
    TargetError,
    TargetFatalError,
    TargetNoSpaceError,
    TargetRetryableError,
    reason_of,
)
from mirrorfs.nbd import proto
from mirrorfs.nbd.uri import NBDAddress, parse_nbd_uri

#: seconds without a reply after which the connection is declared lost (also the handshake limit)
DEFAULT_TIMEOUT = 10.0
#: bytes asked of the socket per receive
_RECEIVE_SIZE = 1024 * 1024
#: requests of one call in flight at once when a call is split at the server's maximum
_SPLIT_WINDOW = 4
#: size of the zero buffer used when the server does not offer WRITE_ZEROES
_ZERO_CHUNK = 4 * 1024 * 1024


@dataclasses.dataclass(eq=False)
class _Slot:
    """One request in flight: the reply or the error that ends it, and who waits for it."""

    cookie: int
    command: int
    deadline: float
    reply: proto.Reply | None = None
    error: TargetError | None = None
    wakeup: trio.Event | None = None

    @property
    def finished(self) -> bool:
        return self.reply is not None or self.error is not None


def make_ssl_context(address: NBDAddress) -> ssl.SSLContext:
    """Build the TLS client context for an ``nbds`` address.

    The server certificate is verified against ``ca-cert.pem`` from ``tls-certificates=DIR``
    (the system CAs when no directory is given) and against ``address.server_hostname``. A
    ``client-cert.pem`` + ``client-key.pem`` pair in the directory is presented to the server.

    Args:
        address: a parsed address.

    Raises:
        TargetFatalError: the certificate files cannot be loaded.
    """
    directory = address.tls_certificates
    try:
        if directory is None:
            return ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
        ca = os.path.join(directory, "ca-cert.pem")
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca)
        cert = os.path.join(directory, "client-cert.pem")
        key = os.path.join(directory, "client-key.pem")
        if os.path.exists(cert) and os.path.exists(key):
            ctx.load_cert_chain(cert, key)
        return ctx
    except (OSError, ssl.SSLError) as exc:
        raise TargetFatalError(f"cannot load TLS certificates from {directory}: "
                               f"{reason_of(exc)}") from None


def _describe_tls_failure(uri: str, exc: BaseException) -> TargetError:
    cause = exc.__cause__ or exc
    if isinstance(cause, ssl.SSLCertVerificationError):
        return TargetFatalError(f"TLS certificate of {uri} is not trusted: "
                                f"{cause.verify_message or cause.reason} (check the CA in "
                                f"tls-certificates and tls-hostname)")
    hint = (" (if the server requires a client certificate, put client-cert.pem and "
            "client-key.pem in the tls-certificates directory)")
    if isinstance(cause, ssl.SSLEOFError) or "UNEXPECTED_EOF" in str(cause):
        # A crash and a refused client certificate look the same (GnuTLS servers just hang
        # up): retryable, with the likely cause named.
        return TargetRetryableError(f"{uri} closed the TLS connection during the "
                                    f"handshake{hint}")
    if isinstance(cause, ssl.SSLError):
        reason = str(cause.reason or cause)
        return TargetFatalError(f"TLS handshake with {uri} failed: {reason}"
                                f"{hint if 'CERTIFICATE' in reason else ''}")
    return TargetRetryableError(f"connection to {uri} lost during the TLS handshake: {cause}")


class NBDClient:
    """One connection to one NBD export. Create with :meth:`connect`.

    Many requests may be in flight at once, from any number of tasks.

    Attributes (fixed for the connection's life):
        info: everything the handshake told: size, flags, block sizes, name, description.
        size: export size in bytes.
        flags: transmission flags the server sent (``proto.NBD_FLAG_*``).
        max_request: largest read or write sent as one request; bigger ones are split.
        timeout: seconds a request may go without a reply before the connection counts as lost.
    """

    def __init__(self, *, address: NBDAddress, transport: trio.SocketStream,
                 stream: trio.abc.Stream, conn: proto.ClientConnection, ready: proto.Ready,
                 timeout: float) -> None:
        self.address = address
        self._transport = transport
        self._stream = stream
        self._conn = conn
        self.info = ready
        self.size = ready.size
        self.flags = ready.flags
        self.max_request = ready.max_block
        self.timeout = timeout
        self._send_lock = trio.Lock()
        self._slots: dict[int, _Slot] = {}
        self._reading = False
        self._broken: str | None = None
        self._quickack = address.transport != "unix" and hasattr(socket, "TCP_QUICKACK")

    # ---- opening -----------------------------------------------------------------------------
    @classmethod
    async def connect(cls, target: str | NBDAddress, *, timeout: float = DEFAULT_TIMEOUT,
                      tls: ssl.SSLContext | None = None, allow_read_only: bool = False,
                      structured_replies: bool = True) -> NBDClient:
        """Connect and complete the handshake.

        Args:
            target: an NBD URI (see :mod:`mirrorfs.nbd.uri`) or a parsed address.
            timeout: seconds for connecting plus the whole handshake, and afterwards the longest
                wait for any reply before the connection is declared lost.
            tls: a TLS context to use instead of the one the URI describes; TLS is negotiated
                when the URI is ``nbds``/``nbds+unix`` or when this is given.
            allow_read_only: accept a read-only export (for reading only).
            structured_replies: ask the server for structured replies.

        Raises:
            UsageError: the URI is malformed.
            TargetRetryableError: the server cannot be reached, closed the connection or did not
                answer within ``timeout``.
            TargetFatalError: the server refused the export or TLS, or the export is read-only.
        """
        address = parse_nbd_uri(target) if isinstance(target, str) else target
        want_tls = address.tls or tls is not None
        uri = address.uri
        if want_tls and tls is None:
            tls = make_ssl_context(address)
        transport: trio.SocketStream | None = None
        with trio.move_on_after(timeout) as scope:
            try:
                if address.transport == "unix":
                    transport = await trio.open_unix_socket(address.socket_path)
                else:
                    transport = await trio.open_tcp_stream(address.host, address.port)
            except OSError as exc:
                raise TargetRetryableError(f"cannot connect to {uri}: "
                                           f"{exc.strerror or exc}") from None
            conn = proto.ClientConnection(address.export, tls=want_tls,
                                          structured_replies=structured_replies,
                                          allow_read_only=allow_read_only)
            stream: trio.abc.Stream = transport
            try:
                while True:
                    event = conn.next_event()
                    if event is proto.NEED_DATA:
                        out = conn.data_to_send()
                        if out:
                            await stream.send_all(out)
                        conn.receive_data(await stream.receive_some(_RECEIVE_SIZE))
                    elif isinstance(event, proto.StartTLS):
                        stream = trio.SSLStream(transport, tls,
                                                server_hostname=address.server_hostname)
                        try:
                            await stream.do_handshake()
                        except trio.BrokenResourceError as exc:
                            raise _describe_tls_failure(uri, exc) from None
                        conn.tls_started()
                    elif isinstance(event, proto.Ready):
                        return cls(address=address, transport=transport, stream=stream,
                                   conn=conn, ready=event, timeout=timeout)
                    else:  # pragma: no cover - the handshake emits nothing else
                        raise RemoteProtocolError(f"unexpected {event!r} during the handshake")
            except TargetFatalError as exc:
                await cls._abort(stream, conn)
                transport.socket.close()
                raise TargetFatalError(f"{uri}: {exc}") from None
            except RemoteProtocolError as exc:
                transport.socket.close()
                raise TargetFatalError(f"{uri} does not speak NBD as expected: {exc}") from None
            except TargetRetryableError as exc:
                transport.socket.close()
                raise TargetRetryableError(f"{uri}: {exc}") from None
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                transport.socket.close()
                if isinstance(exc.__cause__, ssl.SSLError):
                    # e.g. the server wants a client certificate: TLS 1.3 tells only after
                    # the client's side of the handshake is done
                    raise _describe_tls_failure(uri, exc) from None
                raise TargetRetryableError(f"connection to {uri} lost during the handshake: "
                                           f"{exc.__cause__ or exc}") from None
            except BaseException:
                transport.socket.close()
                raise
        if transport is not None:
            transport.socket.close()
        assert scope.cancelled_caught
        raise TargetRetryableError(f"no NBD handshake with {uri} within {timeout:g} s")

    @staticmethod
    async def _abort(stream: trio.abc.Stream, conn: proto.ClientConnection) -> None:
        # A soft disconnect, as the protocol asks of a client that gives up; best effort.
        out = conn.abort_bytes()
        if out:
            with trio.move_on_after(1):
                try:
                    await stream.send_all(out)
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    pass

    # ---- state -------------------------------------------------------------------------------
    @property
    def closed(self) -> bool:
        """True once the connection was lost or closed; a closed client stays closed."""
        return self._broken is not None

    def statistics(self) -> dict[str, int | bool]:
        """Requests in flight and whether the connection is up (for status output and tests)."""
        return {"in_flight": len(self._slots), "closed": self.closed}

    def _has(self, flag: int) -> bool:
        return bool(self.flags & flag)

    # ---- losing the connection ---------------------------------------------------------------
    def _lose(self, reason: str) -> None:
        """Declare the connection dead: fail every pending request, close the socket."""
        if self._broken is not None:
            return
        self._broken = reason
        for slot in self._slots.values():
            if not slot.finished:
                slot.error = TargetRetryableError(reason)
                if slot.wakeup is not None:
                    slot.wakeup.set()
        # Synchronous close: wakes a task blocked in receive/send with ClosedResourceError.
        self._transport.socket.close()

    def _check_usable(self) -> None:
        if self._broken is not None:
            raise TargetRetryableError(f"the connection to {self.address.uri} is closed "
                                       f"({self._broken})")

    # ---- requests ----------------------------------------------------------------------------
    async def _submit(self, command: int, offset: int = 0, length: int = 0, *, flags: int = 0,
                      data: bytes | bytearray | memoryview | None = None) -> _Slot:
        self._check_usable()
        async with self._send_lock:
            self._check_usable()
            try:
                cookie, chunks = self._conn.send_request(command, offset, length, flags=flags,
                                                         data=data)
            except LocalProtocolError as exc:
                raise TargetError(f"{self.address.uri}: {exc}", errno=_errno.EINVAL) from None
            slot = _Slot(cookie, command, deadline=trio.current_time() + self.timeout)
            self._slots[cookie] = slot
            # Shielded: a half-sent request would desynchronise the stream for everyone.
            with trio.CancelScope(shield=True, deadline=slot.deadline) as scope:
                try:
                    for chunk in chunks:
                        await self._stream.send_all(chunk)
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                    self._lose(f"connection to {self.address.uri} lost while sending: "
                               f"{exc.__cause__ or exc}")
            if scope.cancelled_caught:
                self._lose(f"sending to {self.address.uri} took longer than {self.timeout:g} s")
            slot.deadline = trio.current_time() + self.timeout
        return slot

    def _hand_over(self) -> None:
        # The reader role is free: wake one waiting task to take it.
        if self._reading:
            return
        for slot in self._slots.values():
            if not slot.finished and slot.wakeup is not None:
                slot.wakeup.set()
                return

    async def _receive_once(self, mine: _Slot) -> None:
        """Dispatch every complete reply, then, unless ``mine`` is now complete, receive once
        from the socket (reader only)."""
        try:
            while True:
                event = self._conn.next_event()
                if event is proto.NEED_DATA:
                    break
                if isinstance(event, proto.Reply):
                    slot = self._slots.get(event.cookie)
                    if slot is not None and not slot.finished:
                        slot.reply = event
                        if slot.wakeup is not None:
                            slot.wakeup.set()
                elif isinstance(event, proto.ConnectionClosed):
                    self._lose(f"{self.address.uri} closed the connection")
                    return
        except RemoteProtocolError as exc:
            self._lose(f"{self.address.uri} broke the NBD protocol: {exc}")
            return
        if mine.finished:
            return  # never block in receive for replies nobody may be waiting for
        try:
            data = await self._stream.receive_some(_RECEIVE_SIZE)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            self._lose(f"connection to {self.address.uri} lost: {exc.__cause__ or exc}")
            return
        self._conn.receive_data(data)
        if self._quickack:
            # Servers that leave Nagle on (qemu-nbd) hold a reply until the one before it is
            # acknowledged; a delayed ACK would stall it 40 ms. The kernel drops quickack mode
            # on its own, so it is asked for again after every receive.
            try:
                self._transport.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
            except OSError:
                pass  # closed meanwhile (``_lose``): the next receive reports it

    async def _wait(self, slot: _Slot) -> proto.Reply:
        try:
            with trio.move_on_at(slot.deadline):
                while not slot.finished:
                    if self._reading:
                        slot.wakeup = trio.Event()
                        await slot.wakeup.wait()
                        continue
                    self._reading = True
                    try:
                        while not slot.finished:
                            await self._receive_once(slot)
                    finally:
                        self._reading = False
            if not slot.finished:
                self._lose(f"no reply from {self.address.uri} within {self.timeout:g} s")
        finally:
            self._slots.pop(slot.cookie, None)
            if not slot.finished and self._broken is None:
                self._conn.forget(slot.cookie)  # we were cancelled; drop the reply when it comes
            self._hand_over()
        if slot.error is not None:
            raise slot.error
        assert slot.reply is not None
        return self._check_reply(slot.reply)

    def _abandon(self, slots: list[_Slot]) -> None:
        for slot in slots:
            self._slots.pop(slot.cookie, None)
            if not slot.finished and self._broken is None:
                self._conn.forget(slot.cookie)
        self._hand_over()

    def _check_reply(self, reply: proto.Reply) -> proto.Reply:
        if not reply.error:
            return reply
        what = proto.CMD_NAMES.get(reply.command, str(reply.command))
        message = f"NBD {what} on {self.address.uri} failed: {os.strerror(reply.error)}"
        if reply.message:
            message += f" ({reply.message})"
        if reply.error == _errno.ENOSPC:
            raise TargetNoSpaceError(message)
        raise TargetError(message, errno=reply.error)

    async def _run_split(self, command: int, offset: int, length: int, step: int, *,
                         flags: int = 0, data: memoryview | None = None,
                         out: bytearray | None = None) -> None:
        """Send ``[offset, offset+length)`` as requests of at most ``step`` bytes, at most
        :data:`_SPLIT_WINDOW` in flight, so every part is answered well within its deadline."""
        in_flight: list[tuple[int, _Slot]] = []
        try:
            pos = 0
            while pos < length or in_flight:
                if pos < length and len(in_flight) < _SPLIT_WINDOW:
                    n = min(step, length - pos)
                    chunk = data[pos:pos + n] if data is not None else None
                    slot = await self._submit(command, offset + pos, n, flags=flags, data=chunk)
                    in_flight.append((pos, slot))
                    pos += n
                    continue
                start, slot = in_flight[0]
                reply = await self._wait(slot)
                in_flight.pop(0)
                if out is not None and reply.data is not None:
                    out[start:start + len(reply.data)] = reply.data
        finally:
            self._abandon([slot for _, slot in in_flight])

    async def pread(self, offset: int, length: int) -> bytes:
        """Read ``length`` bytes at ``offset`` (the range must lie inside the export).

        Raises:
            TargetError: see the module docstring.
        """
        if length == 0:
            self._check_usable()
            return b""
        if length <= self.max_request:
            reply = await self._wait(await self._submit(proto.NBD_CMD_READ, offset, length))
            assert reply.data is not None
            return reply.data
        out = bytearray(length)
        await self._run_split(proto.NBD_CMD_READ, offset, length, self.max_request, out=out)
        return bytes(out)

    async def pwrite(self, offset: int, data: bytes | bytearray | memoryview, *,
                     fua: bool = False) -> None:
        """Write all of ``data`` at ``offset``.

        Args:
            offset: byte offset.
            data: the bytes; not copied, must not change until this returns.
            fua: the write is durable when this returns (``NBD_CMD_FLAG_FUA`` when offered,
                else a flush afterwards).

        Raises:
            TargetError: see the module docstring.
        """
        view = memoryview(data).cast("B") if not isinstance(data, bytes) else memoryview(data)
        if not len(view):
            self._check_usable()
            return
        flags = proto.NBD_CMD_FLAG_FUA if fua and self._has(proto.NBD_FLAG_SEND_FUA) else 0
        if len(view) <= self.max_request:
            await self._wait(await self._submit(proto.NBD_CMD_WRITE, offset, len(view),
                                                flags=flags, data=view))
        else:
            await self._run_split(proto.NBD_CMD_WRITE, offset, len(view), self.max_request,
                                  flags=flags, data=view)
        if fua and not flags:
            await self.flush()

    def _nonpayload_step(self) -> int:
        mn = self.info.min_block
        return proto.MAX_NONPAYLOAD_REQUEST - proto.MAX_NONPAYLOAD_REQUEST % mn

    async def write_zeroes(self, offset: int, length: int, *, fua: bool = False) -> None:
        """Make the range read as zeroes, letting the server punch holes.

        Uses ``NBD_CMD_WRITE_ZEROES`` without ``NBD_CMD_FLAG_NO_HOLE`` when offered, else writes
        zero buffers.

        Raises:
            TargetError: see the module docstring.
        """
        if length == 0:
            self._check_usable()
            return
        if self._has(proto.NBD_FLAG_SEND_WRITE_ZEROES):
            flags = proto.NBD_CMD_FLAG_FUA if fua and self._has(proto.NBD_FLAG_SEND_FUA) else 0
            await self._run_split(proto.NBD_CMD_WRITE_ZEROES, offset, length,
                                  self._nonpayload_step(), flags=flags)
            if fua and not flags:
                await self.flush()
            return
        chunk = min(_ZERO_CHUNK, self.max_request, length)
        zeroes = memoryview(bytes(chunk))
        pos = 0
        while pos < length:
            n = min(chunk, length - pos)
            # one window of zero writes at a time, all sharing the one buffer
            window = min(n * _SPLIT_WINDOW, length - pos)
            await self._run_split(proto.NBD_CMD_WRITE, offset + pos, window, chunk,
                                  data=_Repeat(zeroes, window))  # type: ignore[arg-type]
            pos += window
        if fua:
            await self.flush()

    async def trim(self, offset: int, length: int) -> bool:
        """Tell the server the range is no longer needed (its contents become unspecified).

        Returns:
            False if the server does not offer TRIM (nothing was sent), else True.

        Raises:
            TargetError: see the module docstring.
        """
        self._check_usable()
        if length == 0 or not self._has(proto.NBD_FLAG_SEND_TRIM):
            return False
        await self._run_split(proto.NBD_CMD_TRIM, offset, length, self._nonpayload_step())
        return True

    async def flush(self) -> None:
        """Make every write the server has answered durable (a no-op if it offers no flush).

        Raises:
            TargetError: see the module docstring.
        """
        self._check_usable()
        if self._has(proto.NBD_FLAG_SEND_FLUSH):
            await self._wait(await self._submit(proto.NBD_CMD_FLUSH))

    async def close(self) -> None:
        """Disconnect (``NBD_CMD_DISC`` when the connection is healthy) and close. Idempotent;
        requests still pending fail with ``TargetRetryableError``."""
        if self._broken is not None:
            return
        with trio.CancelScope(shield=True):
            with trio.move_on_after(min(1.0, self.timeout)):
                async with self._send_lock:
                    if self._broken is None:
                        try:
                            await self._stream.send_all(self._conn.abort_bytes())
                        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                            pass
        self._lose("closed by the client")


class _Repeat:
    """A read-only sequence that looks like ``length`` bytes of ``block`` repeated; slices at
    ``block`` boundaries give ``block`` itself, so zero writes share one buffer."""

    def __init__(self, block: memoryview, length: int) -> None:
        self._block = block
        self._length = length

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, s: slice) -> memoryview:
        start, stop, _ = s.indices(self._length)
        return self._block[:stop - start]
