"""What a benchmark ran on: CPU, kernel, cores, memory, load, tool versions; a path's file system."""

from __future__ import annotations

import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any


def _first_line(argv: list[str]) -> str | None:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = (out.stdout or out.stderr).strip().splitlines()
    return lines[0] if lines else None


def _proc_value(path: str, key: str) -> str | None:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                name, _, value = line.partition(":")
                if name.strip() == key:
                    return value.strip()
    except OSError:
        return None
    return None


def machine_info(tools: tuple[str, ...] = ("fio", "qemu-storage-daemon", "qemu-img")) -> dict[str, Any]:
    """The machine as it is now; call it before the run so the load is the load it started with."""
    mem = _proc_value("/proc/meminfo", "MemTotal")
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "cpu_model": _proc_value("/proc/cpuinfo", "model name"),
        "cores": os.cpu_count(),
        "memory_bytes": int(mem.split()[0]) * 1024 if mem else None,
        "kernel": os.uname().release,
        "load_before": list(os.getloadavg()),
        "python": platform.python_version(),
        "tools": {t: _first_line([t, "--version"]) for t in tools},
    }


def describe(m: dict[str, Any]) -> str:
    """One line for a report's head."""
    mem = f"{m['memory_bytes'] / (1 << 30):.0f} GiB" if m.get("memory_bytes") else "? GiB"
    load = "/".join(f"{x:.2f}" for x in m["load_before"])
    return (f"{m['date']}; {m['cpu_model']}, {m['cores']} cores, {mem} RAM; Linux {m['kernel']}; "
            f"load before the run {load} (1/5/15 min)")


def fs_type(path: Path) -> str:
    """The type of the file system holding ``path`` (``tmpfs``, ``ext4``...)."""
    out = subprocess.run(["findmnt", "-n", "-o", "FSTYPE", "-T", str(path)], capture_output=True,
                         text=True, check=True).stdout.split()
    # Several mounts stacked on one directory: the last one listed is the one in use.
    return out[-1] if out else "unknown"
