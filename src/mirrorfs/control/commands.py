"""Command dispatch shared by the QMP socket, the ``.mirrorfs/control`` file and (through QMP) the CLI.

Role: checks the arguments of each command with QEMU's names and messages, and calls the job
manager. Every failure is a ``MirrorfsError``; its ``qmp_class`` (QMP), ``errno`` (control file) and
``exit_code`` (CLI) say how each edge reports it. No I/O of its own.
"""

from __future__ import annotations

from typing import Any, Awaitable, Callable, Mapping

import trio

from ..errors import ControlError, UsageError
from ..mirror.manager import Action, JobManager
from ..mirror.params import MirrorParams
from ..units import parse_size


def _reject_unknown(name: str, args: Mapping[str, Any], allowed: set[str]) -> None:
    for key in args:
        if key not in allowed:
            raise UsageError(f"Parameter '{key}' is unexpected for {name}")


def _holds_nul(value: Any) -> bool:
    # Depth is bounded by the QMP framer (128 levels), so plain recursion is safe.
    if isinstance(value, str):
        return "\0" in value
    if isinstance(value, Mapping):
        return any(_holds_nul(k) or _holds_nul(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_holds_nul(v) for v in value)
    return False


def _reject_nul(args: Mapping[str, Any]) -> None:
    # No path, image name or URI can hold a NUL: os and the kernel refuse it with ValueError,
    # deep inside a command. Refused here, the user gets one line naming the parameter.
    for key, value in args.items():
        if _holds_nul(key) or _holds_nul(value):
            raise UsageError(f"Parameter '{key}' must not contain a NUL character")


def _required(args: Mapping[str, Any], key: str) -> Any:
    if key not in args:
        raise UsageError(f"Parameter '{key}' is missing")
    return args[key]


def _typed(args: Mapping[str, Any], key: str, kind: type, default: Any, what: str) -> Any:
    value = args.get(key, default)
    if kind is int and isinstance(value, bool) or not isinstance(value, kind):
        raise UsageError(f"Invalid parameter type for '{key}', expected: {what}")
    return value


class CommandDispatcher:
    """The QMP commands of SPEC, over one JobManager (a ``CommandHandler`` for the QMP server)."""

    def __init__(self, manager: JobManager) -> None:
        self.manager = manager
        self._commands: dict[str, Callable[[Mapping[str, Any]], Awaitable[Any]]] = {
            "query-block-jobs": self._query_block_jobs,
            "query-block": self._query_block,
            "query-dirty-bitmaps": self._query_dirty_bitmaps,
            "drive-mirror": self._drive_mirror,
            "block-job-complete": self._complete,
            "block-job-cancel": self._cancel,
            "block-job-pause": self._pause,
            "block-job-resume": self._resume,
            "block-job-set-speed": self._set_speed,
            "transaction": self._transaction,
        }

    def command_names(self) -> list[str]:
        return list(self._commands)

    async def execute(self, name: str, arguments: Mapping[str, Any]) -> Any:
        """Run one command.

        Raises:
            ControlError: unknown command (CommandNotFound).
            MirrorfsError: the command failed; its qmp_class says how.
        """
        handler = self._commands.get(name)
        if handler is None:
            raise ControlError(f"The command {name} has not been found",
                               qmp_class="CommandNotFound", exit_code=2)
        if not isinstance(arguments, Mapping):
            raise UsageError("QMP input member 'arguments' must be an object")
        _reject_nul(arguments)
        return await handler(arguments)

    # ------------------------------------------------------------------ queries

    async def _query_block_jobs(self, args: Mapping[str, Any]) -> Any:
        _reject_unknown("query-block-jobs", args, set())
        return self.manager.query()

    async def _query_block(self, args: Mapping[str, Any]) -> Any:
        _reject_unknown("query-block", args, set())
        return [{"device": job.params.image, "qdev": "", "locked": False, "removable": False,
                 "inserted": {"file": job.node.backing_path, "drv": "raw", "ro": False,
                              "image": {"filename": job.node.backing_path,
                                        "virtual-size": job.size, "format": "raw"}},
                 "__org.mirrorfs_job": job.id}
                for job in self.manager.jobs.values() if not job.finished]

    async def _query_dirty_bitmaps(self, args: Mapping[str, Any]) -> Any:
        _reject_unknown("query-dirty-bitmaps", args, set())
        result = []
        for job in self.manager.jobs.values():
            bitmap = job.bitmap
            path = getattr(bitmap, "path", None)
            result.append({"device": job.id, "node": job.params.image, "bitmaps": [{
                "name": "mirror", "granularity": job.params.granularity,
                "count": bitmap.dirty_bytes(), "persistent": path is not None,
                "recording": not job.finished, "busy": not job.finished,
                **({"__org.mirrorfs_file": str(path)} if path is not None else {})}]})
        return result

    # ------------------------------------------------------------------ job commands

    async def _drive_mirror(self, args: Mapping[str, Any]) -> Any:
        await self.manager.start_mirror(MirrorParams.from_arguments(args))
        return {}

    async def _complete(self, args: Mapping[str, Any]) -> Any:
        action = self._complete_action(args)
        await self.manager.transaction([action])
        return {}

    async def _cancel(self, args: Mapping[str, Any]) -> Any:
        action = self._cancel_action(args)
        await self.manager.transaction([action])
        return {}

    def _complete_action(self, args: Mapping[str, Any]) -> Action:
        _reject_unknown("block-job-complete", args, {"device", "pivot"})
        device = _typed(args, "device", str, _required(args, "device"), "string")
        pivot = _typed(args, "pivot", bool, True, "boolean")
        return Action("complete", device, pivot=pivot)

    def _cancel_action(self, args: Mapping[str, Any]) -> Action:
        _reject_unknown("block-job-cancel", args, {"device", "force"})
        device = _typed(args, "device", str, _required(args, "device"), "string")
        force = _typed(args, "force", bool, False, "boolean")
        return Action("cancel", device, force=force)

    async def _pause(self, args: Mapping[str, Any]) -> Any:
        _reject_unknown("block-job-pause", args, {"device"})
        await self.manager.pause(_typed(args, "device", str, _required(args, "device"), "string"))
        return {}

    async def _resume(self, args: Mapping[str, Any]) -> Any:
        _reject_unknown("block-job-resume", args, {"device"})
        self.manager.resume(_typed(args, "device", str, _required(args, "device"), "string"))
        return {}

    async def _set_speed(self, args: Mapping[str, Any]) -> Any:
        _reject_unknown("block-job-set-speed", args, {"device", "speed"})
        device = _typed(args, "device", str, _required(args, "device"), "string")
        speed = parse_size(_required(args, "speed"), what="speed")
        self.manager.set_speed(device, speed)
        return {}

    async def _transaction(self, args: Mapping[str, Any]) -> Any:
        _reject_unknown("transaction", args, {"actions", "properties"})
        actions = _required(args, "actions")
        if not isinstance(actions, list) or not actions:
            raise UsageError("Invalid parameter type for 'actions', expected: non-empty array")
        mirrors: list[MirrorParams] = []
        job_actions: list[Action] = []
        for item in actions:
            if not isinstance(item, Mapping) or not isinstance(item.get("type"), str):
                raise UsageError("each transaction action needs a 'type' and 'data'")
            data = item.get("data", {})
            if not isinstance(data, Mapping):
                raise UsageError("Invalid parameter type for 'data', expected: object")
            kind = item["type"]
            if kind == "drive-mirror":
                mirrors.append(MirrorParams.from_arguments(data))
            elif kind == "block-job-complete":
                job_actions.append(self._complete_action(data))
            elif kind == "block-job-cancel":
                job_actions.append(self._cancel_action(data))
            else:
                raise UsageError(f"transaction action type '{kind}' is not supported "
                                 f"(drive-mirror, block-job-complete, block-job-cancel)")
        # Mirrors start first because a started mirror can be undone (force-cancelled) and a
        # complete or cancel cannot: so a failure anywhere leaves nothing changed.
        started = []
        try:
            for params in mirrors:
                started.append(await self.manager.start_mirror(params))
            if job_actions:
                await self.manager.transaction(job_actions)
        except BaseException:
            with trio.CancelScope(shield=True):  # the undo must run even when we are cancelled
                for job in started:
                    if not job.finished:
                        await self.manager.transaction([Action("cancel", job.id, force=True)])
            raise
        return {}
