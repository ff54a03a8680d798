"""The client side of ``mirrorfs mirror|status|complete|cancel|pause|resume|set-speed|qmp``.

Each ``cli_*`` function takes the argparse namespace of :mod:`mirrorfs.cli` and returns an exit
code. They find the mount's QMP socket through ``MOUNTPOINT/.mirrorfs/socket`` (one line: its
path), build the QMP arguments (QEMU's names) and check them with the validator the daemon runs
(``mirror.params``), so bad input fails with exit 2 before anything is sent and with the message
QMP and the control file give. Failures are ``MirrorfsError``s: ``cli.py`` prints them as one line and exits with their
code (``QMPCommandError``: 2 for DeviceNotFound/CommandNotFound, 1 for other refusals).

``complete`` and ``cancel`` return once the jobs have ended (their BLOCK_JOB_COMPLETED /
BLOCK_JOB_CANCELLED event arrived or they left ``query-block-jobs``), so a script can use the
target as soon as the command exits.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from typing import Any, Iterable

from ..errors import QMPCommandError, QMPConnectError, UsageError
from ..mirror.params import MIRROR_PARAMS, MirrorParams, is_uri, job_arguments, normalize_image_name
from .qmp_client import QMPClient, socket_timeout_default
from .render import format_eta, format_rate, job_eta, job_state, printable, render_status_table

__all__ = ["cli_mirror", "cli_status", "cli_complete", "cli_cancel", "cli_pause", "cli_resume",
           "cli_set_speed", "cli_qmp", "socket_path_for", "mirror_arguments"]

_END_EVENTS = ("BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED")
_ENDED_STATES = ("concluded", "null")


# ---------------------------------------------------------------------------- finding the mount

def socket_path_for(mountpoint: str) -> str:
    """The QMP socket path a mount advertises in ``MOUNTPOINT/.mirrorfs/socket``.

    Raises:
        UsageError: ``mountpoint`` is not a directory.
        QMPConnectError: no mirrorfs mount is there (no socket file) or it cannot be read.
    """
    if not os.path.isdir(mountpoint):
        raise UsageError(f"{mountpoint} is not a directory: give the mountpoint of a mirrorfs mount")
    control = os.path.join(mountpoint, ".mirrorfs", "socket")
    try:
        with open(control, encoding="utf-8") as f:
            path = f.readline().strip()
    except (FileNotFoundError, NotADirectoryError):
        raise QMPConnectError(f"no mirrorfs mount serves {mountpoint} ({control} does not exist): "
                              f"mount one with 'mirrorfs mount SOURCE_DIR {mountpoint}'") from None
    except OSError as exc:
        raise QMPConnectError(f"cannot read {control}: {exc.strerror or exc}") from None
    if not path:
        raise QMPConnectError(f"no mirrorfs mount serves {mountpoint}: {control} is empty")
    return path


def _connect(mountpoint: str) -> QMPClient:
    return QMPClient.connect(socket_path_for(mountpoint), label=mountpoint,
                             timeout=socket_timeout_default())


# ---------------------------------------------------------------------------- arguments

def _devices(images: Iterable[str]) -> list[str]:
    devices: list[str] = []
    for image in images:
        device = normalize_image_name(image)
        if device in devices:
            raise UsageError(f"{image!r} is given twice: name each job once")
        devices.append(device)
    return devices


def _absolute(path: str) -> str:
    # The daemon runs elsewhere (another cwd): it gets an absolute path. An empty one is left
    # for the validator to refuse.
    return os.path.abspath(path) if path else path


def mirror_arguments(args: argparse.Namespace) -> tuple[dict[str, Any], MirrorParams]:
    """The ``drive-mirror`` arguments for ``mirrorfs mirror``, checked by the validator the
    daemon runs (``MirrorParams.from_arguments``) so bad input fails before anything is sent,
    with the message QMP and the control file give.

    Returns:
        (the arguments to send, what the daemon will make of them).

    Raises:
        UsageError: a malformed argument, or a target inside the mount.
    """
    target = args.target
    arguments: dict[str, Any] = {"device": args.image,
                                 "target": target if is_uri(target) else _absolute(target)}
    for param in MIRROR_PARAMS:
        value = getattr(args, param.key.replace("-", "_"), None) if param.cli else None
        if value is not None:
            arguments[param.key] = _absolute(value) if param.kind == "path" else value
    params = MirrorParams.from_arguments(arguments)
    # Sent as QEMU's clients send them: the normalised name, sizes and rates as numbers.
    arguments["device"] = params.image
    for key in ("granularity", "speed", "buf-size", "max-lag"):
        if key in arguments:
            arguments[key] = getattr(params, key.replace("-", "_"))
    if not params.is_nbd:
        mount = os.path.abspath(args.mountpoint)
        if params.target == mount or params.target.startswith(mount.rstrip("/") + "/"):
            raise UsageError(f"target {target!r} lies inside the mount {args.mountpoint}: "
                             f"mirror to a path outside it")
    return arguments, params


# ---------------------------------------------------------------------------- job commands

def cli_mirror(args: argparse.Namespace) -> int:
    """``mirrorfs mirror``: start a ``drive-mirror`` job."""
    arguments, params = mirror_arguments(args)
    with _connect(args.mountpoint) as client:
        client.execute("drive-mirror", arguments)
    print(f"mirroring {printable(params.image)} to {printable(params.target)} "
          f"(job {printable(params.job_id)}); "
          f"'mirrorfs status {args.mountpoint}' shows its progress")
    return 0


def _job_command(args: argparse.Namespace, qmp_name: str, extra: dict[str, Any] | None = None) -> str:
    arguments = {"device": normalize_image_name(args.image), **(extra or {})}
    job_arguments(qmp_name, arguments)
    with _connect(args.mountpoint) as client:
        client.execute(qmp_name, arguments)
    return arguments["device"]


def cli_pause(args: argparse.Namespace) -> int:
    """``mirrorfs pause``: ``block-job-pause``."""
    print(f"paused {_job_command(args, 'block-job-pause')}")
    return 0


def cli_resume(args: argparse.Namespace) -> int:
    """``mirrorfs resume``: ``block-job-resume``."""
    print(f"resumed {_job_command(args, 'block-job-resume')}")
    return 0


def cli_set_speed(args: argparse.Namespace) -> int:
    """``mirrorfs set-speed``: ``block-job-set-speed``."""
    speed = job_arguments("block-job-set-speed", {"device": args.image, "speed": args.rate})["speed"]
    device = _job_command(args, "block-job-set-speed", {"speed": speed})
    print(f"{device}: speed limit {'none' if speed == 0 else format_rate({'rate': speed})}")
    return 0


def _run_ending(args: argparse.Namespace, action: str, data: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Run ``action`` (``block-job-complete``/``-cancel``) on every image, as one transaction
    when there are several, and wait until each job has ended. Returns device -> end event
    (an empty dict for a job that vanished without an event reaching us).

    Raises:
        QMPCommandError: the command or transaction was refused, a job ended with an error, or
            a job had not ended within the timeout.
    """
    devices = _devices(args.images)
    for device in devices:
        job_arguments(action, {"device": device, **data})
    with _connect(args.mountpoint) as client:
        devices = _job_ids(client, devices)
        if len(devices) == 1:
            client.execute(action, {"device": devices[0], **data})
        else:
            client.execute("transaction", {"actions": [
                {"type": action, "data": {"device": d, **data}} for d in devices]})
        return _wait_ended(client, devices, args.mountpoint)


def _job_ids(client: QMPClient, names: list[str]) -> list[str]:
    """The job ids the names stand for: a job id is itself; an image with one job stands for
    that job, so its end events (which carry the id) are recognised. Anything else is left for
    the mount to refuse (an unknown name, an image with several jobs)."""
    jobs = client.execute("query-block-jobs")
    ids = {j.get("device") for j in jobs}
    found = []
    for name in names:
        of_image = [j.get("device") for j in jobs if j.get("__org.mirrorfs_image") == name]
        found.append(of_image[0] if name not in ids and len(of_image) == 1 else name)
    return found


def _wait_ended(client: QMPClient, devices: list[str], mountpoint: str) -> dict[str, dict[str, Any]]:
    ended: dict[str, dict[str, Any]] = {}
    timeout = socket_timeout_default()
    deadline = None if timeout is None else time.monotonic() + timeout
    while len(ended) < len(devices):
        ev = client.wait_event(_END_EVENTS, timeout=0.25)
        if ev is not None:
            device = ev.get("data", {}).get("device")
            if device in devices:
                ended[device] = ev
            continue
        jobs = client.execute("query-block-jobs")
        live = {j.get("device") for j in jobs if j.get("status") not in _ENDED_STATES}
        for device in devices:
            if device not in live and device not in ended:
                # Gone without an event seen yet: the event may still be on its way.
                ev = client.wait_event(_END_EVENTS, timeout=0.5)
                if ev is not None and ev.get("data", {}).get("device") in devices:
                    ended[ev["data"]["device"]] = ev
                ended.setdefault(device, {})
        if deadline is not None and time.monotonic() > deadline:
            waiting = ", ".join(d for d in devices if d not in ended)
            raise QMPCommandError("GenericError", f"the command was accepted but {waiting} has not ended "
                                  f"after {timeout:.0f} s; 'mirrorfs status {mountpoint}' shows it")
    failed = [f"{d}: {ev['data']['error']}" for d, ev in ended.items() if ev.get("data", {}).get("error")]
    if failed:
        raise QMPCommandError("GenericError", "job ended with an error: " + "; ".join(failed))
    return ended


def cli_complete(args: argparse.Namespace) -> int:
    """``mirrorfs complete``: ``block-job-complete`` (a ``transaction`` for several images)."""
    pivot = not args.no_pivot
    ended = _run_ending(args, "block-job-complete", {"pivot": pivot})
    for device in ended:
        if pivot:
            print(f"completed {device}: the mount now serves the target")
        else:
            print(f"completed {device}: the target is an exact copy, the mount stays on the source")
    return 0


def cli_cancel(args: argparse.Namespace) -> int:
    """``mirrorfs cancel``: ``block-job-cancel`` (a ``transaction`` for several images)."""
    ended = _run_ending(args, "block-job-cancel", {"force": bool(args.force)})
    for device, ev in ended.items():
        if ev.get("event") == "BLOCK_JOB_COMPLETED":
            print(f"cancelled {device} after ready: the target is an exact copy")
        else:
            print(f"cancelled {device}")
    return 0


# ---------------------------------------------------------------------------- status

def cli_status(args: argparse.Namespace) -> int:
    """``mirrorfs status``: a table, ``--json`` or a live ``--watch``."""
    with _connect(args.mountpoint) as client:
        if args.watch:
            return _watch(client)
        jobs = client.execute("query-block-jobs")
    if args.json:
        print(json.dumps(jobs, indent=2))
    else:
        sys.stdout.write(render_status_table(jobs))
    return 0


def _watch(client: QMPClient, interval: float = 0.25) -> int:
    """Draw one rich progress bar per job until Ctrl-C."""
    from rich.console import Group
    from rich.live import Live
    from rich.progress import BarColumn, Progress, TextColumn
    from rich.text import Text

    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.percentage:>5.1f}%"),
        TextColumn("{task.fields[rate]}"),
        TextColumn("ETA {task.fields[eta]}"),
        TextColumn("{task.fields[state]}"),
        auto_refresh=False,
    )
    note = Text("")
    tasks: dict[str, Any] = {}
    try:
        with Live(Group(progress, note), auto_refresh=False, transient=False) as live:
            while True:
                jobs = client.execute("query-block-jobs")
                client.pending_events()  # not shown; keep the buffer from growing
                seen = set()
                for job in jobs:
                    device = str(job.get("device", "?"))
                    seen.add(device)
                    fields = {"rate": format_rate(job), "eta": format_eta(job_eta(job)),
                              "state": job_state(job)}
                    total = max(int(job.get("len") or 0), 1)
                    done = total if job.get("ready") else int(job.get("offset") or 0)
                    if device not in tasks:
                        tasks[device] = progress.add_task(device, total=total, completed=done, **fields)
                    else:
                        progress.update(tasks[device], total=total, completed=done, **fields)
                for device, task in tasks.items():
                    if device not in seen:
                        progress.update(task, state="ended", rate="-", eta="-")
                note.plain = "" if jobs else "no jobs"
                live.refresh()
                time.sleep(interval)
    except KeyboardInterrupt:
        return 0


# ---------------------------------------------------------------------------- raw QMP

def _parse_command_line(line: str) -> dict[str, Any]:
    """``{"execute": ...}`` JSON, or ``command key=value ...`` (values as JSON when they parse)."""
    line = line.strip()
    if line.startswith("{"):
        try:
            msg = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UsageError(f"invalid JSON: {exc.msg} at column {exc.colno}") from None
        if not isinstance(msg, dict):
            raise UsageError("a QMP command must be a JSON object such as {\"execute\": \"query-block-jobs\"}")
        return msg
    try:
        words = shlex.split(line)
    except ValueError as exc:
        raise UsageError(f"cannot parse the command line: {exc}") from None
    arguments: dict[str, Any] = {}
    for word in words[1:]:
        key, sep, value = word.partition("=")
        if not sep or not key:
            raise UsageError(f"expected key=value, got {word!r}")
        try:
            arguments[key] = json.loads(value)
        except json.JSONDecodeError:
            arguments[key] = value
    msg = {"execute": words[0]}
    if arguments:
        msg["arguments"] = arguments
    return msg


def cli_qmp(args: argparse.Namespace) -> int:
    """``mirrorfs qmp``: one raw command (exit 0 on return, 1 on error), or a prompt."""
    if args.json is not None:
        try:
            msg = json.loads(args.json)
        except json.JSONDecodeError as exc:
            raise UsageError(f"invalid JSON: {exc.msg} at column {exc.colno}") from None
        if not isinstance(msg, dict):
            raise UsageError("a QMP command must be a JSON object such as {\"execute\": \"query-block-jobs\"}")
        with _connect(args.mountpoint) as client:
            reply = client.execute_raw(msg)
        print(json.dumps(reply))
        return 0 if "return" in reply else 1
    return _interactive(args.mountpoint)


def _interactive(mountpoint: str) -> int:
    interactive = sys.stdin.isatty()
    with _connect(mountpoint) as client:
        if interactive:
            print(f"QMP on {mountpoint}: a JSON command or 'command key=value ...'; "
                  f"an empty line shows events; Ctrl-D ends.")
        while True:
            try:
                line = input("(mirrorfs) ") if interactive else sys.stdin.readline()
            except EOFError:
                line = ""
                if interactive:
                    print()
                return 0
            if not interactive and line == "":
                return 0
            line = line.strip()
            if line in ("quit", "exit"):
                return 0
            if line:
                try:
                    msg = _parse_command_line(line)
                except UsageError as exc:
                    print(f"error: {exc}", file=sys.stderr)
                    continue
                print(json.dumps(client.execute_raw(msg)))
                events = client.pending_events()
            else:
                events = client.poll_events(0.2)  # an empty line asks for events
            for ev in events:
                print(json.dumps(ev))
            sys.stdout.flush()
