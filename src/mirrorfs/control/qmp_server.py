"""The QMP server: a thin trio adapter that moves bytes between UNIX-socket clients and the
sans-I/O core (:mod:`mirrorfs.control.qmp_proto`) and runs commands through a handler.

Ownership: :meth:`QMPServer.run` opens the only nursery, holding the listener and one task per
client; it returns (socket file removed) when cancelled or after :meth:`QMPServer.stop`.

Invariants:

* One client can never hurt another or the engine. Each client is served in its own task whose
  failures (disconnects, junk, a reply it never reads) end only that task. Events are broadcast
  with :meth:`QMPServer.emit`, which never blocks: each client has a bounded queue and a client
  whose queue overflows is disconnected (it would otherwise hold the engine hostage).
* Commands of one client run one at a time, in order, as QEMU's monitor does. Replies and
  events of one client are written under one lock so messages never interleave on the wire.
* The socket is created 0600 with no window: bound under a ``0o177`` umask. A stale socket file
  (nobody accepts on it) is replaced; a live one, or a file that is not a socket, is refused.

Failure containment: nothing a client does reaches the mount's service nursery. Two layers
enforce it:

1. The protocol core never raises on peer input (:mod:`~mirrorfs.control.qmp_proto`): junk,
   non-finite or huge numbers, deep nesting and invalid UTF-8 become error replies, and every
   value it accepts can be encoded again (an echoed ``id`` cannot fail).
2. :meth:`QMPServer._serve_client` is the boundary of one client. A peer that vanishes ends that
   task quietly; any other exception (a bug in a command handler, in the core or here) is logged
   once, with its traceback, and closes that client only. A command whose handler failed
   unexpectedly is answered ``GenericError`` "internal error: ..." before the connection is
   closed, so the client learns why; it reconnects and queries the state afresh, since an
   interrupted command may have done part of its work. Other clients, the engine and the mount
   keep running. Only cancellation (shutdown) crosses this boundary.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from typing import Any, Protocol

import trio

from .. import __version__
from ..errors import ControlError, LocalProtocolError, MirrorfsError, MountError
from .qmp_proto import CLOSED, NEED_DATA, Command, QMPServerConnection, Reply

log = logging.getLogger(__name__)

__all__ = ["CommandHandler", "QMPServer", "SERVER_COMMANDS"]

#: Commands the server answers itself (``qmp_capabilities`` inside the protocol core).
SERVER_COMMANDS = ("qmp_capabilities", "query-version", "query-commands")


class CommandHandler(Protocol):
    """What the server needs from the command dispatch (``control/commands.py``)."""

    async def execute(self, name: str, arguments: dict[str, Any]) -> Any:
        """Run command ``name``; return the JSON-serialisable ``return`` value.

        Raises:
            ControlError: the command failed; its ``qmp_class`` and message become the reply.
        """
        ...

    def command_names(self) -> list[str]:
        """The command names :meth:`execute` accepts."""
        ...


def _version_tuple() -> tuple[int, int, int]:
    parts = [int(p) if p.isdigit() else 0 for p in __version__.split(".")[:3]]
    return tuple((parts + [0, 0, 0])[:3])  # type: ignore[return-value]


class _Client:
    """One connected client: its stream, its protocol state and its event queue."""

    def __init__(self, server: "QMPServer", stream: trio.SocketStream, number: int) -> None:
        self.number = number
        self.stream = stream
        self.conn = QMPServerConnection(package=f"mirrorfs {__version__}", version=_version_tuple(),
                                        max_value_size=server.max_value_size)
        self.send_lock = trio.Lock()
        self.events_send, self.events_recv = trio.open_memory_channel[bytes](server.event_queue_size)
        self.cancel_scope = trio.CancelScope()
        self.dropped: str | None = None

    async def send(self, data: bytes) -> None:
        async with self.send_lock:
            await self.stream.send_all(data)

    def drop(self, reason: str) -> None:
        if self.dropped is None:
            self.dropped = reason
            log.warning("QMP client %d disconnected: %s", self.number, reason)
        self.cancel_scope.cancel()


class QMPServer:
    """Serves QMP on a UNIX socket for any number of clients at once.

    Args:
        path: where to create the socket. Its directory is created (0700) if missing.
        handler: runs every command but the server's own (:data:`SERVER_COMMANDS`).
        event_queue_size: events buffered per client before that client is dropped.
        max_value_size: longest JSON value accepted from a client, in bytes.
        receive_size: bytes asked for per read.

    Resource handling:
        ``run`` owns the listening socket, the socket file and every client connection; all are
        closed and the file removed (if it is still ours) when ``run`` returns or is cancelled.

    Error handling:
        A client that sends junk gets error replies; one that disconnects or breaks the stream
        ends its own task only. A handler exception that is not a ``MirrorfsError`` is a bug: it
        is logged with its traceback, answered ``GenericError`` "internal error: ..." and that
        client is disconnected (see "Failure containment" above).
    """

    def __init__(self, path: str, handler: CommandHandler, *, event_queue_size: int = 1024,
                 max_value_size: int = 1 << 20, receive_size: int = 65536) -> None:
        self.path = os.fspath(path)
        self.handler = handler
        self.event_queue_size = event_queue_size
        self.max_value_size = max_value_size
        self.receive_size = receive_size
        self._clients: dict[int, _Client] = {}
        self._next_number = 1
        self._stop = trio.Event()
        self._stats = {"connections": 0, "commands": 0, "errors": 0, "events": 0, "dropped": 0}

    # ------------------------------------------------------------------ public API

    def emit(self, event: str, data: dict[str, Any]) -> None:
        """Broadcast an event to every negotiated client, without blocking.

        Call it from the trio thread (the engine's tasks do), at any time, also before ``run``
        (no clients yet: nothing happens). A client whose queue is full is disconnected.

        Raises:
            LocalProtocolError: ``data`` is not JSON-serialisable (a bug in the caller).
        """
        self._stats["events"] += 1
        payload: bytes | None = None
        for client in list(self._clients.values()):
            if not client.conn.negotiated or client.dropped is not None:
                continue
            if payload is None:
                payload = client.conn.send_event(event, data)
            try:
                client.events_send.send_nowait(payload)
            except trio.WouldBlock:
                self._stats["dropped"] += 1
                client.drop(f"event queue overflow ({self.event_queue_size} events unread)")
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass

    def stop(self) -> None:
        """Ask ``run`` to close every connection, remove the socket and return."""
        self._stop.set()

    def statistics(self) -> dict[str, int]:
        """Counters: connections accepted, commands run, error replies, events, dropped clients;
        plus ``clients`` connected now."""
        return {**self._stats, "clients": len(self._clients)}

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Bind the socket, report started, serve until cancelled or :meth:`stop`.

        Raises:
            MountError: the socket cannot be created (path in use by a live server, not a
                socket, directory not writable).
        """
        sock = await self._bind()
        ident = os.stat(self.path)
        try:
            listener = trio.SocketListener(sock)
            async with listener, trio.open_nursery() as nursery:
                nursery.start_soon(self._accept_loop, listener, nursery)
                task_status.started()
                await self._stop.wait()
                nursery.cancel_scope.cancel()
        finally:
            sock.close()
            self._remove_socket_file(ident)

    # ------------------------------------------------------------------ socket file

    async def _bind(self) -> trio.socket.SocketType:
        directory = os.path.dirname(os.path.abspath(self.path))
        try:
            os.makedirs(directory, mode=0o700, exist_ok=True)
        except OSError as exc:
            raise MountError(f"cannot create the QMP socket directory {directory}: {exc.strerror}") from None
        await self._remove_stale()
        sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
        # umask is process-wide, but bind() is one syscall on the trio thread: the window in
        # which another thread could create a file with this mask is a few microseconds, and it
        # errs on the safe side (too private). Without it the socket would exist briefly 0755.
        old = os.umask(0o177)
        try:
            await sock.bind(self.path)
        except OSError as exc:
            sock.close()
            raise MountError(f"cannot create the QMP socket {self.path}: {exc.strerror}") from None
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)  # belt and braces: the mode must not depend on the mask
        sock.listen(64)
        return sock

    async def _remove_stale(self) -> None:
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise MountError(f"cannot create the QMP socket: {self.path} exists and is not a socket; "
                             f"remove it or choose another path with --socket")
        in_use = MountError(f"the QMP socket {self.path} is in use by a running server; "
                            f"unmount that mount or choose another path with --socket")
        probe = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
        try:
            with trio.fail_after(5):
                await probe.connect(self.path)
            raise in_use
        except trio.TooSlowError:
            raise in_use from None  # someone listens but does not accept: not stale
        except OSError as exc:
            if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT):
                raise MountError(f"cannot check the existing QMP socket {self.path}: {exc.strerror}") from None
        finally:
            probe.close()
        log.info("removing stale QMP socket %s", self.path)
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    def _remove_socket_file(self, ident: os.stat_result) -> None:
        # Remove only our own socket: if someone replaced it meanwhile, it is theirs.
        try:
            st = os.lstat(self.path)
            if (st.st_dev, st.st_ino) == (ident.st_dev, ident.st_ino):
                os.unlink(self.path)
        except FileNotFoundError:
            pass

    # ------------------------------------------------------------------ clients

    async def _accept_loop(self, listener: trio.SocketListener, nursery: trio.Nursery) -> None:
        while True:
            try:
                stream = await listener.accept()
            except OSError as exc:
                # EMFILE and friends: back off rather than spin or die (as serve_listeners does).
                log.error("QMP accept failed: %s", exc)
                await trio.sleep(0.1)
                continue
            number = self._next_number
            self._next_number += 1
            self._stats["connections"] += 1
            nursery.start_soon(self._serve_client, stream, number)

    async def _serve_client(self, stream: trio.SocketStream, number: int) -> None:
        client = _Client(self, stream, number)
        self._clients[number] = client
        try:
            with client.cancel_scope:
                async with stream, trio.open_nursery() as nursery:
                    await client.send(client.conn.greeting())
                    nursery.start_soon(self._event_writer, client)
                    await self._read_loop(client)
                    nursery.cancel_scope.cancel()
        except* (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as group:
            # The peer vanished mid-write or reset the connection: its business only.
            log.debug("QMP client %d gone: %s", number, group.exceptions[0])
        except* _CommandBug:
            pass  # logged and answered by _dispatch; leaving the task closes the connection
        except* Exception as group:
            # A bug while serving this client: it must not take the other clients or the mount
            # with it (see "Failure containment" in the module docstring).
            log.error("QMP client %d closed after an internal error", number,
                      exc_info=group.exceptions[0] if len(group.exceptions) == 1 else group)
        finally:
            del self._clients[number]
            client.events_send.close()

    async def _event_writer(self, client: _Client) -> None:
        async for data in client.events_recv:
            await client.send(data)

    async def _read_loop(self, client: _Client) -> None:
        conn = client.conn
        while True:
            event = conn.next_event()
            if event is NEED_DATA:
                data = await client.stream.receive_some(self.receive_size)
                conn.receive_data(data)
                continue
            if event is CLOSED:
                return
            if isinstance(event, Reply):
                if event.error_class is not None:
                    self._stats["errors"] += 1
                await client.send(event.data)
                continue
            assert isinstance(event, Command)
            self._stats["commands"] += 1
            reply, bug = await self._dispatch(client, event)
            await client.send(reply)
            if bug is not None:
                raise bug

    async def _dispatch(self, client: _Client, cmd: Command) -> tuple[bytes, "_CommandBug | None"]:
        """Run one command: its reply, and the bug that must close the client after it."""
        conn = client.conn
        try:
            value = await self._execute(conn, cmd)
            # LocalProtocolError here: the command returned something JSON cannot carry. A bug.
            return conn.send_return(cmd.id, value), None
        except LocalProtocolError as exc:
            bug: Exception = exc
            desc = f"internal error: {exc}"
        except MirrorfsError as exc:
            self._stats["errors"] += 1
            return conn.send_error(cmd.id, exc.qmp_class, str(exc), exit_code=exc.exit_code), None
        except Exception as exc:  # a bug in a command (see "Failure containment")
            bug = exc
            desc = f"internal error: {exc!r}"
        log.error("QMP command %s failed with an internal error; closing client %d",
                  cmd.name, client.number, exc_info=bug)
        self._stats["errors"] += 1
        return conn.send_error(cmd.id, "GenericError", desc), _CommandBug()

    async def _execute(self, conn: QMPServerConnection, cmd: Command) -> Any:
        if cmd.name in ("query-version", "query-commands"):
            for key in cmd.arguments:
                raise _generic(f"Parameter '{key}' is unexpected")
            if cmd.name == "query-version":
                return conn.version_info()
            names = list(SERVER_COMMANDS)
            names += [n for n in self.handler.command_names() if n not in names]
            return [{"name": n} for n in names]
        if cmd.name not in self.handler.command_names():
            raise _not_found(cmd.name)
        return await self.handler.execute(cmd.name, cmd.arguments)


class _CommandBug(Exception):
    """Closes a client whose command failed unexpectedly (already logged and answered)."""


def _generic(message: str) -> MirrorfsError:
    return ControlError(message, qmp_class="GenericError", exit_code=2)


def _not_found(name: str) -> MirrorfsError:
    return ControlError(f"The command {name} has not been found", qmp_class="CommandNotFound",
                        exit_code=2)
