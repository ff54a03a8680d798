"""Start the mirror engine and its control surfaces inside a mount, and register their teardown.

Called once by the mount service (``MountService._start_components``). Teardown runs in reverse:
the QMP server stops first (no new commands), then the job manager stops every job cleanly
(targets flushed, bitmaps committed and closed as cleanly shut down).
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import pyfuse3

from ..errors import AccessDeniedError, ImageNotFoundError, UsageError
from ..fs.control_dir import VirtualFile
from ..mirror.manager import JobManager
from .commands import CommandDispatcher
from .control_file import ControlFile
from .qmp_server import QMPServer
from .render import render_status_table


def default_socket_path(mountpoint: str) -> str:
    """``$XDG_RUNTIME_DIR/mirrorfs/NAME-HASH.qmp`` (or under ``/run/mirrorfs``), one per mountpoint.

    The hash keeps the path unique and short (UNIX socket paths are limited to 107 bytes).
    """
    base = os.environ.get("XDG_RUNTIME_DIR") or "/run"
    # Resolve the parent only: realpath() lstat()s the last component, which in the mount daemon
    # is its own mount root; a blocking stat of it on the trio thread deadlocks the mount.
    absolute = os.path.abspath(mountpoint).rstrip("/") or "/"
    real = os.path.join(os.path.realpath(os.path.dirname(absolute)), os.path.basename(absolute))
    digest = hashlib.sha256(real.encode()).hexdigest()[:16]
    name = os.path.basename(real.rstrip("/"))[:32] or "root"
    return os.path.join(base, "mirrorfs", f"{name}-{digest}.qmp")


async def start_components(service: Any) -> JobManager:
    """Start the job manager, the QMP server and the ``.mirrorfs/`` files of one mount."""
    operations = service.operations
    owner = os.getuid()

    def resolve_node(relpath: str) -> Any:
        try:
            return operations.node_for_relpath(relpath)
        except UsageError as exc:
            raise ImageNotFoundError(str(exc)) from None

    manager = JobManager(resolve_node, nursery=service.nursery, mountpoint=service.mountpoint,
                         source_dir=service.source_dir)
    service.exit_stack.push_async_callback(manager.shutdown)
    dispatcher = CommandDispatcher(manager)

    socket_path = service.socket_path or default_socket_path(service.mountpoint)
    server = QMPServer(socket_path, dispatcher)
    await service.nursery.start(server.run)
    service.exit_stack.callback(server.stop)
    manager.add_listener(server.emit)

    control = ControlFile(dispatcher)

    async def write_control(data: bytes, ctx: pyfuse3.RequestContext) -> None:
        if ctx.uid not in (0, owner):
            raise AccessDeniedError("only the mount's owner and root may write .mirrorfs/control")
        await control.run_lines(data)

    def status_json() -> bytes:
        return (json.dumps(manager.query(), indent=2, sort_keys=True) + "\n").encode()

    registry = operations.control_dir
    registry.register("control", VirtualFile(control.render, write_control))
    registry.register("status", VirtualFile(lambda: render_status_table(manager.query()).encode()))
    registry.register("status.json", VirtualFile(status_json))
    registry.register("socket", VirtualFile(lambda: f"{socket_path}\n".encode()))
    service.manager = manager
    service.qmp_server = server
    return manager
