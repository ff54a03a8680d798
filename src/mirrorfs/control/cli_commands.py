"""The client side of ``mirrorfs mirror|status|complete|cancel|pause|resume|set-speed|qmp``.

Each ``cli_*`` function takes the argparse namespace of :mod:`mirrorfs.cli` and returns an exit
code. They find the mount's QMP socket through ``MOUNTPOINT/.mirrorfs/socket`` (one line: its
path), check what can be checked locally (image names that would leave the mount, sizes, rates)
so bad input fails with exit 2 before anything is sent, and translate to QMP with QEMU's argument
names. Failures are ``MirrorfsError``s: ``cli.py`` prints them as one line and exits with their
code (``QMPCommandError``: 2 for DeviceNotFound/CommandNotFound, 1 for other refusals).

``complete`` and ``cancel`` return once the jobs have ended (their BLOCK_JOB_COMPLETED /
BLOCK_JOB_CANCELLED event arrived or they left ``query-block-jobs``), so a script can use the
target as soon as the command exits.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import sys
import time
from typing import Any, Iterable

from ..errors import QMPCommandError, QMPConnectError, UsageError
from ..mirror.params import DEFAULT_GRANULARITY, MAX_GRANULARITY, MIN_GRANULARITY
from ..units import parse_size
from .qmp_client import QMPClient, socket_timeout_default
from .render import format_eta, format_rate, job_eta, job_state, render_status_table

__all__ = ["cli_mirror", "cli_status", "cli_complete", "cli_cancel", "cli_pause", "cli_resume",
           "cli_set_speed", "cli_qmp", "socket_path_for", "validate_image", "mirror_arguments"]

_URI_RE = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")
_NBD_SCHEMES = {"nbd", "nbds", "nbd+unix", "nbds+unix", "nbd+tcp", "nbds+tcp"}
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


# ---------------------------------------------------------------------------- local validation

def validate_image(image: str) -> str:
    """Normalise an image name (or job id) given on the command line; the QMP ``device``.

    Raises:
        UsageError: the name is empty, absolute, or leaves the mount through ``..``.
    """
    if not image or not image.strip():
        raise UsageError("empty image name: give the image's path relative to the mount")
    if os.path.isabs(image):
        raise UsageError(f"image {image!r} must be a path relative to the mount "
                         f"(e.g. 'vm/disk.img'), not an absolute path")
    norm = os.path.normpath(image)
    if norm == ".":
        raise UsageError(f"image {image!r} names the mount itself: give a file under it")
    if norm == ".." or norm.startswith("../"):
        raise UsageError(f"image {image!r} leaves the mount: give a path inside it")
    if norm.split("/")[0] == ".mirrorfs":
        # The server refuses it too, but as GenericError (exit 1): it is bad input (exit 2).
        raise UsageError(f"image {image!r} is a mirrorfs control file, not an image")
    return norm


def _devices(images: Iterable[str]) -> list[str]:
    devices: list[str] = []
    for image in images:
        device = validate_image(image)
        if device in devices:
            raise UsageError(f"image {image!r} is given twice")
        devices.append(device)
    return devices


def _target(target: str, mountpoint: str) -> str:
    if not target:
        raise UsageError("empty target: give a file path or an NBD URI (nbd://HOST[:PORT]/EXPORT)")
    m = _URI_RE.match(target)
    if m:
        if m.group(1).lower() not in _NBD_SCHEMES:
            raise UsageError(f"unsupported target URI {target!r}: use a file path, "
                             f"nbd://HOST[:PORT]/EXPORT or nbd+unix:///EXPORT?socket=PATH")
        return target
    # The server runs elsewhere (another cwd): send it an absolute path.
    path = os.path.abspath(target)
    mount = os.path.abspath(mountpoint)
    if path == mount or path.startswith(mount.rstrip("/") + "/"):
        raise UsageError(f"target {target!r} lies inside the mount {mountpoint}: "
                         f"mirror to a path outside it")
    return path


def _granularity(text: str) -> int:
    value = parse_size(text, what="granularity")
    if value < MIN_GRANULARITY or value > MAX_GRANULARITY or value & (value - 1):
        raise UsageError(f"invalid granularity {text!r}: must be a power of two from 4K to 64M")
    return value


def mirror_arguments(args: argparse.Namespace) -> dict[str, Any]:
    """The ``drive-mirror`` arguments for ``mirrorfs mirror`` (validated locally).

    Raises:
        UsageError: a malformed image, target, size or rate, or ``--sync dirty`` without
            ``--bitmap``.
    """
    arguments: dict[str, Any] = {
        "device": validate_image(args.image),
        "target": _target(args.target, args.mountpoint),
        "sync": args.sync,
        "mode": "absolute-paths" if args.create else "existing",
        "copy-mode": args.copy_mode,
        "on-target-error": args.on_target_error,
        "on-source-error": args.on_source_error,
    }
    if args.granularity is not None:
        arguments["granularity"] = _granularity(args.granularity)
    if args.speed is not None:
        arguments["speed"] = parse_size(args.speed, what="rate")
    if args.buf_size is not None:
        buf_size = parse_size(args.buf_size, what="buffer size")
        if buf_size == 0:
            raise UsageError(f"invalid buffer size {args.buf_size!r}: must be more than 0")
        granularity = arguments.get("granularity", DEFAULT_GRANULARITY)
        if buf_size < granularity:
            raise UsageError(f"invalid buffer size {args.buf_size!r}: must be at least the granularity "
                             f"({granularity} bytes)")
        arguments["buf-size"] = buf_size
    if args.bitmap is not None:
        if not args.bitmap:
            raise UsageError("empty --bitmap: give the path of the bitmap file")
        arguments["bitmap"] = os.path.abspath(args.bitmap)
    elif args.sync == "dirty":
        raise UsageError("--sync dirty copies the clusters set in a bitmap: give it with --bitmap FILE")
    if getattr(args, "verify_resync", False):
        arguments["verify-resync"] = True
    if args.job_id is not None:
        if not args.job_id:
            raise UsageError("empty --job-id")
        arguments["job-id"] = args.job_id
    return arguments


# ---------------------------------------------------------------------------- job commands

def cli_mirror(args: argparse.Namespace) -> int:
    """``mirrorfs mirror``: start a ``drive-mirror`` job."""
    arguments = mirror_arguments(args)
    with _connect(args.mountpoint) as client:
        client.execute("drive-mirror", arguments)
    job = arguments.get("job-id", arguments["device"])
    print(f"mirroring {arguments['device']} to {arguments['target']} (job {job}); "
          f"'mirrorfs status {args.mountpoint}' shows its progress")
    return 0


def _job_command(args: argparse.Namespace, qmp_name: str, extra: dict[str, Any] | None = None) -> str:
    device = validate_image(args.image)
    with _connect(args.mountpoint) as client:
        client.execute(qmp_name, {"device": device, **(extra or {})})
    return device


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
    speed = parse_size(args.rate, what="rate")
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
    with _connect(args.mountpoint) as client:
        if len(devices) == 1:
            client.execute(action, {"device": devices[0], **data})
        else:
            client.execute("transaction", {"actions": [
                {"type": action, "data": {"device": d, **data}} for d in devices]})
        return _wait_ended(client, devices, args.mountpoint)


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
