"""A QMP client of a mirrorfs mount or a qemu-storage-daemon, and waiting for job events."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

from mirrorfs.control.qmp_client import QMPClient

from benchlib.procs import BenchError, wait_for


def qmp_connect(path: Path, timeout: float = 30.0) -> QMPClient:
    wait_for(lambda: path.exists(), timeout, f"QMP socket {path}")
    return QMPClient.connect(str(path), timeout=120.0)


def wait_job_event(client: QMPClient, event: str, device: str, timeout: float) -> dict[str, Any]:
    """Wait for ``event`` of job ``device``; fail early on an error, cancel or end of that job."""
    deadline = time.monotonic() + timeout
    fatal = {"BLOCK_JOB_ERROR", "BLOCK_JOB_CANCELLED", "BLOCK_JOB_COMPLETED"} - {event}
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise BenchError(f"timed out after {timeout:.0f} s waiting for {event} of {device}")
        ev = client.wait_event([event, *fatal], timeout=remaining)
        if ev is None or ev.get("data", {}).get("device") != device:
            continue
        if ev["event"] == event:
            return ev
        raise BenchError(f"job {device}: {ev['event']} {ev.get('data')} while waiting for {event}")


def wait_job(client: QMPClient, pred: Callable[[dict[str, Any]], bool], timeout: float = 600) -> dict[str, Any]:
    """Poll ``query-block-jobs`` until the first job satisfies ``pred``; return that job.

    Polls every 5 ms: a timed wait for ``ready`` must not round up to a coarse interval.
    """
    deadline = time.monotonic() + timeout
    while True:
        jobs = client.execute("query-block-jobs")
        if jobs and pred(jobs[0]):
            return jobs[0]
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {timeout:.0f} s; jobs: {jobs}")
        time.sleep(0.005)
