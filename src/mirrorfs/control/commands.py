"""Command dispatch shared by the QMP socket, the ``.mirrorfs/control`` file and (through QMP) the CLI.

Role: checks the arguments of each command with the one validator of ``mirror.params`` (which
the CLI and the control file also call, so every surface refuses bad input with the same line),
and calls the job manager. Every failure is a ``MirrorfsError``; its ``qmp_class`` (QMP), ``errno`` (control file) and
``exit_code`` (CLI) say how each edge reports it. No I/O of its own.
"""

from __future__ import annotations

from typing import Any, Awaitable, Callable, Mapping

import trio

from ..errors import ControlError, UsageError
from ..mirror.manager import Action, JobManager
from ..mirror.params import (VERIFY_COMMAND, MirrorParams, job_arguments, reject_nul,
                             reject_unknown)


class CommandDispatcher:
    """The QMP commands of docs/reference.md, over one JobManager (a ``CommandHandler`` for the QMP server)."""

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
            VERIFY_COMMAND: self._verify,
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
        reject_nul(arguments)
        return await handler(arguments)

    # ------------------------------------------------------------------ queries

    async def _query_block_jobs(self, args: Mapping[str, Any]) -> Any:
        reject_unknown(args, set())
        return self.manager.query()

    async def _query_block(self, args: Mapping[str, Any]) -> Any:
        reject_unknown(args, set())
        return [{"device": job.params.image, "qdev": "", "locked": False, "removable": False,
                 "inserted": {"file": job.node.backing_path, "drv": "raw", "ro": False,
                              "image": {"filename": job.node.backing_path,
                                        "virtual-size": job.size, "format": "raw"}},
                 "__org.mirrorfs_job": job.id}
                for job in self.manager.jobs.values() if not job.finished]

    async def _query_dirty_bitmaps(self, args: Mapping[str, Any]) -> Any:
        reject_unknown(args, set())
        result = []
        for job in self.manager.jobs.values():
            bitmap = job.bitmap
            path = bitmap.path
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
        v = job_arguments("block-job-complete", args)
        return Action("complete", v["device"], pivot=v["pivot"])

    def _cancel_action(self, args: Mapping[str, Any]) -> Action:
        v = job_arguments("block-job-cancel", args)
        return Action("cancel", v["device"], force=v["force"])

    async def _pause(self, args: Mapping[str, Any]) -> Any:
        await self.manager.pause(job_arguments("block-job-pause", args)["device"])
        return {}

    async def _resume(self, args: Mapping[str, Any]) -> Any:
        self.manager.resume(job_arguments("block-job-resume", args)["device"])
        return {}

    async def _set_speed(self, args: Mapping[str, Any]) -> Any:
        v = job_arguments("block-job-set-speed", args)
        self.manager.set_speed(v["device"], v["speed"])
        return {}

    async def _verify(self, args: Mapping[str, Any]) -> Any:
        v = job_arguments(VERIFY_COMMAND, args)
        self.manager.verify(v["device"], repair=v["repair"], speed=v["speed"])
        return {}

    async def _transaction(self, args: Mapping[str, Any]) -> Any:
        reject_unknown(args, {"actions", "properties"})
        if "actions" not in args:
            raise UsageError("Parameter 'actions' is missing")
        actions = args["actions"]
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
