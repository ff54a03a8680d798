"""How jobs look to people: pure functions from ``query-block-jobs`` entries to text.

Used by ``mirrorfs status`` (table and ``--watch``) and by ``MOUNTPOINT/.mirrorfs/status``, so
both show the same thing. No I/O here: give a list of job dicts (QEMU's BlockJobInfo fields plus
mirrorfs's ``target``, ``dirty-bytes``, ``copy-mode`` and optionally ``rate`` in bytes/s), get
text back.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

from ..units import format_size

__all__ = ["STATUS_COLUMNS", "printable", "job_state", "job_percent", "job_eta", "format_eta", "format_lag",
           "format_rate",
           "format_progress", "status_row", "render_status_table"]

#: Column headers of the status table, in order.
STATUS_COLUMNS = ("JOB", "IMAGE", "STATE", "PROGRESS", "DIRTY", "RATE", "ETA", "LAG", "TARGET", "IO-STATUS",
                  "PAUSED", "REPLICA")


def printable(text: str) -> str:
    """``text`` with every non-printable character escaped, so it is one line of plain text.

    Names come from the source directory and from users: a file name that is not UTF-8 holds
    lone surrogates (``os.fsdecode``), which no UTF-8 file or terminal can carry, and one may
    hold newlines or terminal escape sequences. A byte smuggled in as a surrogate is shown as
    ``\\xNN``, anything else as Python's escape (``\\x1b``, ``\\n``, ``\\u2028``).
    """
    if text.isprintable():
        return text
    out = []
    for ch in text:
        if ch.isprintable():
            out.append(ch)
        elif "\udc80" <= ch <= "\udcff":
            out.append(f"\\x{ord(ch) - 0xDC00:02x}")
        else:
            out.append(ch.encode("unicode_escape").decode("ascii"))
    return "".join(out)


def _int(job: dict[str, Any], key: str) -> int:
    value = job.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def job_state(job: dict[str, Any]) -> str:
    """The job's state for people: QEMU's ``status``; ``ready`` also when only ``ready`` says so;
    ``failed: <error>`` when the job carries an error; ``(target away)`` after it while the
    target is not connected."""
    status = str(job.get("status") or ("ready" if job.get("ready") else "unknown"))
    if job.get("error"):
        return f"{status}: {job['error']}"
    if job.get("__org.mirrorfs_target-connected") is False:
        return f"{status} (target away)"
    return status


def job_percent(job: dict[str, Any]) -> float:
    """Progress in percent (0..100); a job of length 0 is 100 % done."""
    length = _int(job, "len")
    if length <= 0:
        return 100.0
    return max(0.0, min(100.0, 100.0 * _int(job, "offset") / length))


def job_eta(job: dict[str, Any]) -> float | None:
    """Seconds until ``offset`` reaches ``len`` at the job's current ``rate``; 0 when ready;
    None when unknown (no rate, not moving, paused)."""
    if job.get("ready"):
        return 0.0
    remaining = _int(job, "len") - _int(job, "offset")
    if remaining <= 0:
        return 0.0
    rate = job.get("rate")
    if job.get("paused") or not isinstance(rate, (int, float)) or isinstance(rate, bool) or rate <= 0:
        return None
    return remaining / rate


def format_eta(seconds: float | None) -> str:
    """``-`` for unknown, else ``H:MM:SS`` (``M:SS`` under an hour)."""
    if seconds is None or not math.isfinite(seconds):
        return "-"
    total = int(math.ceil(seconds))
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def format_rate(job: dict[str, Any]) -> str:
    """``12.5 MiB/s`` from the job's ``rate``, ``-`` when it has none."""
    rate = job.get("rate")
    if not isinstance(rate, (int, float)) or isinstance(rate, bool) or rate < 0:
        return "-"
    return f"{format_size(rate)}/s"


def format_lag(job: dict[str, Any]) -> str:
    """The recovery point's age: ``0s`` in sync, ``12.3s`` under a minute, else ``H:MM:SS``;
    ``-`` when the job does not say."""
    age = job.get("__org.mirrorfs_recovery-point-age")
    if not isinstance(age, (int, float)) or isinstance(age, bool) or not math.isfinite(age) or age < 0:
        return "-"
    if age == 0:
        return "0s"
    return f"{age:.1f}s" if age < 60 else format_eta(age)


def format_progress(job: dict[str, Any]) -> str:
    """``512.0 MiB/1.0 GiB 50.0%``: offset, len and the percentage."""
    return (f"{format_size(_int(job, 'offset'))}/{format_size(_int(job, 'len'))} "
            f"{job_percent(job):.1f}%")


def status_row(job: dict[str, Any]) -> list[str]:
    """The cells of one job's row, in the order of :data:`STATUS_COLUMNS`."""
    return [
        printable(str(job.get("device", "?"))),
        printable(str(job.get("__org.mirrorfs_image", job.get("device", "?")))),
        printable(job_state(job)),
        format_progress(job),
        format_size(_int(job, "dirty-bytes")),
        format_rate(job),
        format_eta(job_eta(job)),
        format_lag(job),
        printable(str(job.get("target", "-"))),
        printable(str(job.get("io-status", "ok"))),
        "yes" if job.get("paused") else "no",
        replica_cell(job),
    ]


def replica_cell(job: dict[str, Any]) -> str:
    """The replica's state; ``(inconsistent)`` when the target is not a state the image had."""
    state = printable(str(job.get("__org.mirrorfs_replica-state", "-")))
    if job.get("__org.mirrorfs_replica-consistent") is False:
        return f"{state} (inconsistent)"
    return state


def render_status_table(jobs: Sequence[dict[str, Any]]) -> str:
    """A plain-text table of the jobs (one line per job under a header), or ``no jobs``.

    The text ends with a newline and contains no terminal control sequences, so it can be
    served as a file as well as printed.
    """
    if not jobs:
        return "no jobs\n"
    rows = [list(STATUS_COLUMNS)] + [status_row(job) for job in jobs]
    widths = [max(len(row[i]) for row in rows) for i in range(len(STATUS_COLUMNS))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    return "\n".join(lines) + "\n"
