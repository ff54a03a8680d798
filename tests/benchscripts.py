"""Running the scripts/bench family from tests: leftovers and interrupting a run.

The benchmark scripts start their own mounts and daemons; these helpers prove that none of
them survives the script, whether it ended, failed or was interrupted.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Callable

from mounting import wait_for

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


def mounts_under(path: Path) -> list[str]:
    with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
        return [line.split()[4] for line in f if line.split()[4].startswith(str(path))]


def processes_naming(path: Path) -> list[int]:
    """Live processes whose command line mentions ``path`` (the scripts' daemons would)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
            state = (entry / "stat").read_bytes().rsplit(b")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if str(path) in cmdline and state not in (b"Z", b"X"):
            found.append(int(entry.name))
    return found


def running(program: str, path: Path) -> bool:
    """Whether a ``program`` process naming ``path`` is running."""
    for pid in processes_naming(path):
        try:
            if Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].endswith(program.encode()):
                return True
        except OSError:
            pass
    return False


def assert_nothing_left(*dirs: Path) -> None:
    """No mount, live process or file of the script's under ``dirs``."""
    for d in dirs:
        assert mounts_under(d) == [], d
        wait_for(lambda: processes_naming(d) == [], 10, f"the script's processes naming {d} to be gone")
        assert list(d.iterdir()) == [], d


def interrupt(script: str, args: list[str], ready: Callable[[], bool], timeout: float = 120) -> str:
    """Run ``scripts/SCRIPT ARGS``, send SIGINT once ``ready()``, check exit code 130; its stderr."""
    proc = subprocess.Popen([sys.executable, str(SCRIPTS / script), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: ready() or proc.poll() is not None, timeout, f"{script} to be running")
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err[-3000:]
    assert "interrupted: cleaning up" in err
    return err
