"""The client side of ``mirrorfs verify``: start an online verify and wait for its outcome.

Sends ``__org.mirrorfs_block-job-verify`` (checked first by the validator the daemon runs) and
waits for the job's ``__org.mirrorfs_VERIFY_COMPLETED`` event; prints one line per differing
range and a summary. Exit codes (the verify's own): 0 identical, 1 ranges differ, 2 bad input or
refused (no such job, a verify already running, a target that cannot be read now), 3 the verify
did not finish (the job ended, the target was lost, a read failed).
"""

from __future__ import annotations

import argparse
from typing import Any

from ..errors import MirrorfsError, UsageError, VerifyNotFinishedError
from ..mirror.params import VERIFY_COMMAND, job_arguments, normalize_image_name
from ..mirror.verify import VERIFY_COMPLETED
from .cli_commands import _connect
from .qmp_client import QMPClient

__all__ = ["cli_verify", "render_outcome"]

_EXIT = {"identical": 0, "differ": 1}


def cli_verify(args: argparse.Namespace) -> int:
    """``mirrorfs verify``: compare a job's source and target while the job runs."""
    image = normalize_image_name(args.image)
    arguments: dict[str, Any] = {"device": args.job_id or image, "repair": bool(args.repair)}
    if args.speed is not None:
        arguments["speed"] = args.speed
    try:
        arguments["speed"] = job_arguments(VERIFY_COMMAND, arguments)["speed"]
        with _connect(args.mountpoint) as client:
            if args.job_id:
                _check_image(client, args.job_id, image)
            client.execute(VERIFY_COMMAND, arguments)
            event = _wait_completed(client, arguments["device"])
    except MirrorfsError as exc:
        if exc.exit_code == 1:  # 1 means "ranges differ" here: a refusal exits 2
            raise UsageError(str(exc)) from None
        raise
    text, code = render_outcome(arguments["device"], event)
    print(text, end="")
    return code


def _check_image(client: QMPClient, job_id: str, image: str) -> None:
    """Refuse ``--job-id`` naming a job of another image (a job that does not exist is left to
    the command, which names the jobs there are)."""
    for job in client.execute("query-block-jobs"):
        if job.get("device") == job_id and job.get("__org.mirrorfs_image") not in (None, image):
            raise UsageError(f"job {job_id!r} mirrors {job['__org.mirrorfs_image']!r}, not "
                             f"{image!r}; give the job of that image")


def _wait_completed(client: QMPClient, device: str) -> dict[str, Any]:
    """The verify's event; an empty dict when the job vanished without one reaching us."""
    while True:
        ev = client.wait_event([VERIFY_COMPLETED], timeout=0.5)
        if ev is not None:
            if ev.get("data", {}).get("device") == device:
                return ev["data"]
            continue
        jobs = {j.get("device"): j for j in client.execute("query-block-jobs")}
        if "__org.mirrorfs_verify" not in jobs.get(device, {}):
            # Ended: its event may still be on its way.
            ev = client.wait_event([VERIFY_COMPLETED], timeout=1.0)
            if ev is not None and ev.get("data", {}).get("device") == device:
                return ev["data"]
            return {}


def render_outcome(device: str, data: dict[str, Any]) -> tuple[str, int]:
    """The text ``mirrorfs verify`` prints for a ``VERIFY_COMPLETED`` event, and its exit code.

    Raises:
        VerifyNotFinishedError: the verify did not finish (exit 3).
    """
    result = data.get("result")
    if result not in _EXIT:
        why = data.get("error") or "the job ended"
        raise VerifyNotFinishedError(f"the verify of {device} did not finish: {why}")
    found = data.get("ranges", [])
    lines = [f"differs: offset {r['offset']} length {r['length']}\n" for r in found]
    checked = (f"{data.get('compared-bytes', 0)} bytes compared, {data.get('skipped-bytes', 0)} "
               f"skipped as dirty or busy (the job copies those)")
    if result == "identical":
        lines.append(f"{device}: the target is identical to the source ({checked})\n")
    else:
        repaired = ("; marked dirty, the job copies them" if data.get("repaired")
                    else "; 'mirrorfs verify --repair' makes the job copy them")
        lines.append(f"{device}: {len(found)} range(s), {data.get('differing-bytes', 0)} bytes, "
                     f"differ ({checked}){repaired}\n")
    return "".join(lines), _EXIT[result]
