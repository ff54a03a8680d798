"""A QMPServer in its own thread and trio loop, for tests whose clients block (the CLI, raw
sockets). Shared by the QMP server and CLI client tests."""

from __future__ import annotations

import threading
from typing import Any

import trio

from mirrorfs.control.qmp_server import QMPServer


class QMPServerThread:
    """Serves ``handler`` on ``path`` while used as a context manager.

    The handler gets a ``server`` attribute (for events). Errors of the server's loop are raised
    by ``__enter__`` / ``__exit__``.
    """

    def __init__(self, path: str, handler: Any) -> None:
        self.server = QMPServer(path, handler)
        handler.server = self.server
        self._started = threading.Event()
        self._token: Any = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, daemon=True)

    def _main(self) -> None:
        async def run() -> None:
            self._token = trio.lowlevel.current_trio_token()
            async with trio.open_nursery() as nursery:
                await nursery.start(self.server.run)
                self._started.set()
        try:
            trio.run(run)
        except BaseException as exc:  # surfaced by __enter__/__exit__
            self._error = exc
            self._started.set()

    def call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """Run ``fn`` in the server's thread (handlers are not thread-safe)."""
        return trio.from_thread.run_sync(lambda: fn(*args, **kwargs), trio_token=self._token)

    def __enter__(self) -> "QMPServerThread":
        self._thread.start()
        assert self._started.wait(10), "server did not start"
        if self._error:
            raise self._error
        return self

    def __exit__(self, *exc: Any) -> None:
        trio.from_thread.run_sync(self.server.stop, trio_token=self._token)
        self._thread.join(10)
        assert not self._thread.is_alive()
        if self._error:
            raise self._error
