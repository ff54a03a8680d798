"""The metrics endpoint of a mount: prometheus-client's HTTP server in its own thread.

Resource handling: ``MetricsServer.start`` binds HOST:PORT and starts the server thread (one more
thread per scrape in flight); ``stop`` closes the listening socket and waits for the thread. The
daemon starts it (``daemon.components.start_metrics``) before the FUSE session and stops it after
everything else.

Scrapes never run mount code on their own thread: ``snapshot`` schedules ``take_snapshot`` on the
mount's trio thread (``run_sync_soon``, between two requests) and waits for its result, so the
values are one consistent reading, the same the ``status`` files give. The callback catches
everything it raises (an exception there would crash trio), and a mount that does not answer in
time only fails that scrape.

Metrics have no authentication and no TLS: anyone who reaches HOST:PORT reads them. Listening on
a non-loopback address is the user's choice (``--metrics 0.0.0.0:PORT``).
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import sys
import threading
from typing import Any, Callable

import trio
from prometheus_client import CollectorRegistry, PlatformCollector, ProcessCollector, start_http_server

from .. import __version__
from ..errors import MountError
from .address import format_address
from .collector import MountCollector, MountSnapshot, ScrapeError
from .requests import RequestStats

log = logging.getLogger(__name__)

#: Seconds a metrics client may take to send its request or read the answer.
CLIENT_TIMEOUT = 10.0


def _client_error(request: Any, client_address: Any) -> None:
    """A client's broken request or vanished connection (socketserver's ``handle_error``, called
    inside the except block): that client's problem, logged as such."""
    log.debug("metrics client %s: %s", client_address, sys.exc_info()[1])

#: How long a scrape waits for the mount's trio thread to take the snapshot.
SNAPSHOT_TIMEOUT = 5.0


class MetricsServer:
    """Serves ``/metrics`` for one mount.

    Args:
        address: (host, port) to listen on.
        take_snapshot: returns the mount's state; called on the trio thread, must not block.
        stats: the mount's request counters (for the histogram bounds).
    """

    def __init__(self, address: tuple[str, int], take_snapshot: Callable[[], MountSnapshot],
                 stats: RequestStats) -> None:
        self.address = address
        self._take_snapshot = take_snapshot
        self._token: Any = None
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(MountCollector(self.snapshot, stats.bounds, __version__))
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        # One snapshot at a time: a burst of scrapes queues here, not on the trio thread.
        self._snapshot_lock = threading.Lock()
        self._httpd: Any = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Bind and serve; call from the mount's trio thread.

        Raises:
            MountError: the address cannot be resolved or bound (in use, not local, no permission).
        """
        self._token = trio.lowlevel.current_trio_token()
        host, port = self.address
        where = format_address(host, port)
        try:
            self._httpd, self._thread = start_http_server(port, addr=host, registry=self.registry)
        except socket.gaierror as exc:
            raise MountError(f"--metrics {where}: cannot resolve {host!r} ({exc.strerror})") from None
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise MountError(f"--metrics {where}: the port is in use; choose another port") from None
            raise MountError(f"--metrics {where}: cannot listen there "
                             f"({exc.strerror or os.strerror(exc.errno or 0)})") from None
        # Anyone who reaches the port is a client: one that never sends, or sends junk, must
        # cost a thread for CLIENT_TIMEOUT at most and a debug line, never a traceback in the
        # mount's log. start_http_server builds the server itself, so both are set on its result.
        handler = self._httpd.RequestHandlerClass
        self._httpd.RequestHandlerClass = type(handler.__name__, (handler,), {"timeout": CLIENT_TIMEOUT})
        self._httpd.handle_error = _client_error
        log.info("serving metrics at http://%s/metrics", where)

    def stop(self) -> None:
        """Stop serving (idempotent); scrapes in flight end on their own."""
        httpd, self._httpd = self._httpd, None
        if httpd is not None:
            httpd.shutdown()  # returns once serve_forever() has left its loop
            httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    async def aclose(self) -> None:
        """``stop`` off the trio thread (the server notices a shutdown within half a second)."""
        await trio.to_thread.run_sync(self.stop)

    def snapshot(self) -> MountSnapshot:
        """The mount's state, taken on its trio thread (called from a scrape's thread).

        Raises:
            ScrapeError: the mount has stopped or did not answer within ``SNAPSHOT_TIMEOUT``.
        """
        if not self._snapshot_lock.acquire(timeout=SNAPSHOT_TIMEOUT):
            raise ScrapeError(f"another scrape held the mount's state for {SNAPSHOT_TIMEOUT:.0f} s")
        try:
            return self._snapshot_on_trio()
        finally:
            self._snapshot_lock.release()

    def _snapshot_on_trio(self) -> MountSnapshot:
        done = threading.Event()
        result: list[Any] = []

        def take() -> None:
            try:
                result.append(self._take_snapshot())
            except BaseException as exc:  # noqa: B036 - must never reach trio's scheduler
                result.append(exc)
            finally:
                done.set()

        try:
            self._token.run_sync_soon(take)
        except trio.RunFinishedError:
            raise ScrapeError("the mount has stopped") from None
        if not done.wait(SNAPSHOT_TIMEOUT):
            raise ScrapeError(f"the mount did not answer within {SNAPSHOT_TIMEOUT:.0f} s")
        if isinstance(result[0], BaseException):
            raise result[0]
        return result[0]

