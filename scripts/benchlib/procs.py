"""Child processes and the script's own lifetime.

Every child runs in its own session, so a terminal's Ctrl-C reaches only the script, which
then stops things in order; a child is stopped with its whole process group (fio forks its
jobs). :func:`guarded` runs a script's body so that Ctrl-C or SIGTERM ends it with exit code
130 after its clean-up, and a second Ctrl-C cannot cut that clean-up short.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

_CLK_TCK = os.sysconf("SC_CLK_TCK")


class BenchError(Exception):
    """A set-up or measuring step failed (the message says which and why)."""


def log(msg: str) -> None:
    print(f"[{Path(sys.argv[0]).name} {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run(argv: list[str], *, timeout: float = 120.0, env: dict[str, str] | None = None,
        check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` to the end in its own session; on any exception stop its whole group."""
    with subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, env=env, start_new_session=True) as child:
        try:
            stdout, stderr = child.communicate(timeout=timeout)
        except BaseException:
            stop_group(child)
            raise
    proc = subprocess.CompletedProcess(argv, child.returncode, stdout, stderr)
    if check and proc.returncode != 0:
        raise BenchError(f"{' '.join(argv)} exited {proc.returncode}: {proc.stderr.strip()[-2000:]}")
    return proc


def stop_group(child: subprocess.Popen[Any]) -> None:
    """Stop ``child`` and every process of its process group (it leads its own session)."""
    # SIGINT first: fio stops its forked jobs cleanly; they would wait for ever for a killed parent.
    for sig, grace in ((signal.SIGINT, 5.0), (signal.SIGKILL, 10.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, sig)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            try:
                os.killpg(child.pid, 0)
            except ProcessLookupError:
                break
            child.poll()  # reap the leader, or the group never looks empty
            time.sleep(0.02)
        else:
            continue
        break
    with contextlib.suppress(subprocess.TimeoutExpired):
        child.wait(timeout=5)


def wait_for(pred: Callable[[], bool], timeout: float, what: str, interval: float = 0.02) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def mounted(path: Path) -> bool:
    """True if something is mounted exactly at ``path`` (reads /proc, never touches the mount)."""
    target = str(path)
    with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
        return any(line.split()[4].replace("\\040", " ") == target for line in f)


def _stat_fields(pid: int) -> list[bytes]:
    # The command name in parentheses may hold spaces: split after its closing parenthesis.
    with open(f"/proc/{pid}/stat", "rb") as f:
        return f.read().rsplit(b")", 1)[1].split()


def pid_alive(pid: int) -> bool:
    try:
        return _stat_fields(pid)[0] not in (b"Z", b"X")
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def cpu_seconds(pids: list[int]) -> float:
    """User plus system CPU time of ``pids`` (all their threads), in seconds.

    Fields 14 and 15 of /proc/PID/stat; index 11 and 12 once the pid and name are split off.
    """
    ticks = 0
    for pid in pids:
        fields = _stat_fields(pid)
        ticks += int(fields[11]) + int(fields[12])
    return ticks / _CLK_TCK


def vm_hwm(pid: int) -> int | None:
    """Peak resident set size of ``pid`` in bytes (VmHWM), None if it is gone."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except FileNotFoundError:
        return None
    return None


def guarded(body: Callable[[], None], cleanup: Callable[[], list[str]]) -> int:
    """Run ``body``, then ``cleanup`` whatever happened; the exit code for the script.

    0 when both went well, 130 after Ctrl-C or SIGTERM, 1 after a :class:`BenchError` or a
    problem that ``cleanup`` reports (each of its strings is logged).
    """
    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    code = 0
    try:
        body()
    except KeyboardInterrupt:
        log("interrupted: cleaning up")
        code = 130
    except BenchError as exc:
        log(f"error: {exc}")
        code = 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        problems = cleanup()
        for p in problems:
            log(f"clean-up: {p}")
        if problems and code == 0:
            code = 1
    return code
