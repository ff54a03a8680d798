"""A small blocking QMP client for the command line (plain ``socket``, no asyncio, no trio).

It wraps the sans-I/O :class:`~mirrorfs.control.qmp_proto.QMPClientConnection`: this module only
reads and writes the socket. Commands are answered in order, so :meth:`QMPClient.execute` sends
one and reads until its reply, buffering any event that arrives meanwhile for
:meth:`QMPClient.wait_event`.
"""

from __future__ import annotations

import collections
import itertools
import json
import os
import socket
import time
from typing import Any, Iterable

from ..errors import QMPCommandError, QMPConnectError, RemoteProtocolError
from .qmp_proto import (CLOSED, EXIT_CODE_MEMBER, NEED_DATA, NO_ID, Error, Event, Greeting, QMPClientConnection,
                        Return)

__all__ = ["QMPClient"]

_DEFAULT = object()

#: Events kept for wait_event(); older ones are dropped first (a CLI waits for recent ones).
_MAX_BUFFERED_EVENTS = 10000


class QMPClient:
    """A connected, negotiated QMP session. Use :meth:`connect`; close with :meth:`close` or ``with``.

    Args:
        sock: a connected stream socket (the greeting not yet read).
        label: how to name the server in error messages (e.g. the mountpoint).
        timeout: seconds any single read may wait (None: forever).
    """

    def __init__(self, sock: socket.socket, *, label: str, timeout: float | None = None) -> None:
        self._sock = sock
        self._label = label
        self._timeout = timeout
        self._conn = QMPClientConnection()
        self._ids = itertools.count(1)
        self._events: collections.deque[dict[str, Any]] = collections.deque(maxlen=_MAX_BUFFERED_EVENTS)
        self.greeting: Greeting | None = None

    @classmethod
    def connect(cls, path: str, *, label: str | None = None, timeout: float | None = 30.0) -> "QMPClient":
        """Connect to the UNIX socket ``path``, read the greeting and negotiate capabilities.

        Args:
            path: the QMP socket.
            label: what the socket serves, for error messages (default: the path).
            timeout: seconds a single read may wait for the server.

        Raises:
            QMPConnectError: nothing listens at ``path`` or the session could not be set up.
        """
        what = label or path
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(path)
        except FileNotFoundError:
            sock.close()
            raise QMPConnectError(f"no mirrorfs mount serves {what}: the QMP socket {path} does not "
                                  f"exist (is it mounted? 'mirrorfs mount SOURCE_DIR MOUNTPOINT')") from None
        except ConnectionRefusedError:
            sock.close()
            raise QMPConnectError(f"no mirrorfs mount serves {what}: the QMP socket {path} refused "
                                  f"the connection (the mount process is gone; unmount and mount again)") from None
        except PermissionError:
            sock.close()
            raise QMPConnectError(f"cannot connect to the QMP socket {path} of {what}: permission denied "
                                  f"(only the user who mounted it, or root, may control a mount)") from None
        except OSError as exc:
            sock.close()
            raise QMPConnectError(f"cannot connect to the QMP socket {path} of {what}: {exc.strerror or exc}") from None
        client = cls(sock, label=what, timeout=timeout)
        try:
            greeting = client._next_message()
            if not isinstance(greeting, Greeting):
                raise RemoteProtocolError("the QMP server did not send a greeting")
            client.greeting = greeting
            client.execute("qmp_capabilities")
        except BaseException:
            client.close()
            raise
        return client

    def __enter__(self) -> "QMPClient":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection (idempotent)."""
        self._sock.close()

    # ------------------------------------------------------------------ commands

    def execute(self, name: str, arguments: dict[str, Any] | None = None) -> Any:
        """Run one command and return its ``return`` value.

        Raises:
            QMPCommandError: the server answered with an error (its class and desc).
            QMPConnectError: the connection broke or timed out.
            RemoteProtocolError: the server sent something that is not QMP.
        """
        reply = self.execute_raw({"execute": name, **({"arguments": arguments} if arguments else {})})
        if "error" in reply:
            error = reply["error"]
            raise QMPCommandError(error["class"], error["desc"],
                                  exit_code=error.get(EXIT_CODE_MEMBER))
        return reply["return"]

    def execute_raw(self, message: dict[str, Any]) -> dict[str, Any]:
        """Send a command object as given (its own ``id`` replaced by ours) and return the whole
        reply as a dict (``return`` or ``error``; the caller's ``id`` restored if it had one).

        Raises:
            QMPConnectError: the connection broke or timed out.
            RemoteProtocolError: the server sent something that is not QMP.
        """
        my_id = f"mirrorfs-cli-{next(self._ids)}"
        # Sent as given, unusual keys and wrong types included: the server is the judge.
        self._send(json.dumps({**message, "id": my_id}).encode() + b"\n")
        while True:
            msg = self._next_message()
            if isinstance(msg, Event):
                self._events.append(_event_dict(msg))
                continue
            if isinstance(msg, (Return, Error)) and msg.id == my_id:
                reply: dict[str, Any]
                if isinstance(msg, Return):
                    reply = {"return": msg.value}
                else:
                    reply = {"error": {"class": msg.error_class, "desc": msg.desc}}
                    if msg.exit_code is not None:
                        reply["error"][EXIT_CODE_MEMBER] = msg.exit_code
                if "id" in message:
                    reply["id"] = message["id"]
                return reply
            if isinstance(msg, Error) and msg.id is NO_ID:
                # The server could not even parse what we sent (no id to echo): that is the reply.
                return {"error": {"class": msg.error_class, "desc": msg.desc}}
            # A reply to someone else's id cannot happen on our own connection: ignore it.

    # ------------------------------------------------------------------ events

    def wait_event(self, names: Iterable[str] | None = None, timeout: float | None = None) -> dict[str, Any] | None:
        """Return the oldest buffered or next arriving event whose name is in ``names``
        (any event if None), removing it from the buffer; None after ``timeout`` seconds.

        Events are dicts ``{"event", "data", "timestamp"}`` as on the wire.

        Raises:
            QMPConnectError: the connection broke.
        """
        wanted = None if names is None else set(names)
        for ev in list(self._events):
            if wanted is None or ev["event"] in wanted:
                self._events.remove(ev)
                return ev
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return None
            msg = self._next_message(timeout=remaining, allow_timeout=True)
            if msg is None:
                return None
            if isinstance(msg, Event):
                ev = _event_dict(msg)
                if wanted is None or ev["event"] in wanted:
                    return ev
                self._events.append(ev)

    def poll_events(self, timeout: float = 0.0) -> list[dict[str, Any]]:
        """Read whatever the server sends within ``timeout`` seconds (at least a moment), then
        take every buffered event.

        Raises:
            QMPConnectError: the connection broke.
        """
        deadline = time.monotonic() + timeout
        while True:
            msg = self._next_message(timeout=max(0.001, deadline - time.monotonic()), allow_timeout=True)
            if msg is None:
                break
            if isinstance(msg, Event):
                self._events.append(_event_dict(msg))
        return self.pending_events()

    def pending_events(self) -> list[dict[str, Any]]:
        """Take every event buffered so far (without waiting)."""
        events = list(self._events)
        self._events.clear()
        return events

    # ------------------------------------------------------------------ I/O

    def _send(self, data: bytes) -> None:
        try:
            self._sock.sendall(data)
        except OSError as exc:
            raise QMPConnectError(f"lost the connection to the QMP socket of {self._label}: "
                                  f"{exc.strerror or exc}") from None

    def _next_message(self, *, timeout: float | None | object = _DEFAULT, allow_timeout: bool = False) -> Any:
        """The next parsed message; None on timeout when ``allow_timeout``.

        Raises:
            QMPConnectError: closed, broken, or (unless ``allow_timeout``) timed out.
            RemoteProtocolError: the server sent something that is not QMP.
        """
        while True:
            msg = self._conn.next_event()
            if msg is CLOSED:
                raise QMPConnectError(f"the mirrorfs mount {self._label} closed the QMP connection "
                                      f"(it is shutting down or was unmounted)")
            if msg is not NEED_DATA:
                return msg
            self._sock.settimeout(self._timeout if timeout is _DEFAULT else timeout)  # type: ignore[arg-type]
            try:
                data = self._sock.recv(65536)
            except socket.timeout:
                if allow_timeout:
                    return None
                raise QMPConnectError(f"the mirrorfs mount {self._label} did not answer within "
                                      f"{self._timeout} s") from None
            except OSError as exc:
                raise QMPConnectError(f"lost the connection to the QMP socket of {self._label}: "
                                      f"{exc.strerror or exc}") from None
            self._conn.receive_data(data)


def _event_dict(ev: Event) -> dict[str, Any]:
    return {"event": ev.name, "data": ev.data, "timestamp": ev.timestamp}


def socket_timeout_default() -> float | None:
    """Timeout for CLI reads, overridable by ``MIRRORFS_QMP_TIMEOUT`` (seconds; 0 = none)."""
    value = os.environ.get("MIRRORFS_QMP_TIMEOUT")
    if not value:
        return 60.0
    try:
        seconds = float(value)
    except ValueError:
        return 60.0
    return None if seconds <= 0 else seconds
