"""systemd readiness notification (``sd_notify``) without a dependency.

A service with ``Type=notify`` gets ``$NOTIFY_SOCKET``, a UNIX datagram socket (a path, or an
abstract name written with a leading ``@``); one datagram ``READY=1`` tells systemd the service is
up. Anything else (no variable, a socket that is gone) is not an error of the mount: systemd
then reports the start as timed out, which says more than a failed mount would.
"""

from __future__ import annotations

import logging
import os
import socket
from typing import Callable, Mapping

log = logging.getLogger(__name__)

NOTIFY_SOCKET_ENV = "NOTIFY_SOCKET"


def _address(value: str) -> str:
    return "\0" + value[1:] if value.startswith("@") else value


def notify(state: str, environ: Mapping[str, str] = os.environ) -> bool:
    """Send ``state`` (e.g. ``"READY=1"``) to ``$NOTIFY_SOCKET``; True if it was sent."""
    value = environ.get(NOTIFY_SOCKET_ENV)
    if not value:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(_address(value))
            sock.sendall(state.encode())
    except OSError as exc:
        log.warning("cannot notify %s=%s of %s: %s", NOTIFY_SOCKET_ENV, value, state, exc)
        return False
    return True


def ready_notifier(environ: Mapping[str, str] = os.environ) -> Callable[[], None] | None:
    """A callback that reports readiness to systemd, or None outside a notify service."""
    if not environ.get(NOTIFY_SOCKET_ENV):
        return None

    def ready() -> None:
        notify("READY=1", environ)

    return ready
