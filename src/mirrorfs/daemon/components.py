"""Start the mirror engine, its control surfaces and the metrics endpoint inside a mount.

``start_engine`` is called once by ``MountService._start_components`` and registers each
component's teardown on the mount's exit stack. Teardown runs in reverse: the QMP server stops
first (no new commands), then the job manager stops every job cleanly (targets flushed, bitmaps
committed and closed as cleanly shut down). ``start_metrics`` runs before the kernel mount, so a
port in use fails the mount with nothing mounted.
"""

from __future__ import annotations

import hashlib
import json
import os
from contextlib import AsyncExitStack
from typing import Any, Callable

import pyfuse3
import trio

from ..control.commands import CommandDispatcher
from ..control.control_file import ControlFile
from ..control.qmp_server import QMPServer
from ..control.render import render_status_table
from ..errors import (AccessDeniedError, ImageNotFoundError, MirrorfsError, StateDirError,
                      UsageError)
from ..fs.control_dir import VirtualFile
from ..fs.node import ImageNode
from ..fs.operations import Operations
from ..metrics.collector import MountSnapshot
from ..metrics.requests import RequestStats
from ..metrics.server import MetricsServer
from ..mirror.manager import JobManager
from ..state.directory import StateDir, record_name
from ..state.record import JobRecord


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


async def start_engine(operations: Operations, nursery: trio.Nursery, exit_stack: AsyncExitStack, *,
                       source_dir: str, mountpoint: str,
                       socket_path: str | None,
                       state: StateDir | None = None) -> tuple[JobManager, QMPServer]:
    """Start the job manager, the QMP server and the ``.mirrorfs/`` files of one mount.

    Args:
        socket_path: the QMP socket; None: ``default_socket_path(mountpoint)``.
        state: the mount's open state directory (``--state-dir``), for persistent jobs.
    """
    owner = os.getuid()

    def resolve_node(relpath: str) -> ImageNode:
        try:
            return operations.node_for_relpath(relpath)
        except UsageError as exc:
            raise ImageNotFoundError(str(exc)) from None

    manager = JobManager(resolve_node, nursery=nursery, mountpoint=mountpoint, source_dir=source_dir,
                         state=state)
    exit_stack.push_async_callback(manager.shutdown)
    dispatcher = CommandDispatcher(manager)

    socket_path = socket_path or default_socket_path(mountpoint)
    server = QMPServer(socket_path, dispatcher)
    await nursery.start(server.run)
    exit_stack.callback(server.stop)
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
    return manager, server


async def reattach_jobs(manager: JobManager, state: StateDir, records: list[JobRecord]) -> None:
    """Re-attach every persistent job of the state directory, whether or not its target answers.

    Raises:
        StateDirError: a record that cannot be re-attached (its bitmap is gone, ended or made for
            something else; its target is wrong for good), one line per record. The jobs
            already attached are stopped by the mount's teardown; their records stay.
    """
    errors = []
    for record in records:
        try:
            await manager.reattach(record)
        except MirrorfsError as exc:
            where = os.path.join(state.path, record_name(record.job_id))
            errors.append(f"persistent job {record.job_id} (image {record.image}): {exc}; "
                          f"to drop the job instead, remove {where}")
    if errors:
        raise StateDirError("\n".join(errors))


def start_metrics(address: tuple[str, int], operations: Operations, source_dir: str, mountpoint: str,
                  jobs: Callable[[], list[dict[str, Any]]]) -> MetricsServer:
    """Count the requests of ``operations`` and serve the mount's metrics at ``address``.

    Args:
        jobs: the mount's ``query-block-jobs``; called on the trio thread at each scrape.

    Raises:
        MountError: see ``MetricsServer.start``.
    """
    stats = RequestStats()

    def take_snapshot() -> MountSnapshot:
        return MountSnapshot(source_dir, mountpoint, jobs(), stats.snapshot())

    server = MetricsServer(address, take_snapshot, stats)
    server.start()
    operations.time_requests(stats)
    return server
