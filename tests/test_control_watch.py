"""``mirrorfs status --watch`` in a real terminal (tmux) over the real engine (issue 5, "Done when" 6).

``tests/test_qmp_mount.py`` watches one job to ready. Here two jobs share the screen: one copies
(rate-limited, in small chunks so the bar moves in steps) while the other is paused. The bar of
the first advances, shows a rate and an ETA, then "ready"; the paused one says so; when the first
is completed from another terminal its line says "ended"; Ctrl-C ends the watch with exit 0 and
no traceback.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from mounting import Mount, mirrorfs_argv

MiB = 1 << 20


@pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux (scripts/setup installs it)")
def test_watch_two_real_jobs_until_ready_then_ctrl_c(mounted: Mount, tmp_path: Path) -> None:
    m = mounted.mountpoint
    with open(m / "w.img", "wb") as f:
        f.write(os.urandom(MiB) * 16)
    with open(m / "p.img", "wb") as f:
        f.write(os.urandom(2 * MiB))
    mounted.cli("mirror", m, "p.img", tmp_path / "p-t.img", "--create", "--speed", "64K", "--buf-size", "256K")
    mounted.cli("pause", m, "p.img")
    mounted.cli("mirror", m, "w.img", tmp_path / "w-t.img", "--create", "--speed", "4M", "--buf-size", "1M")
    tmux = ["tmux", "-S", str(tmp_path / "tmux.sock")]
    cli = " ".join(mirrorfs_argv())
    env = " ".join(f"{k}={v}" for k, v in mounted.env().items() if k in ("MIRRORFS_LOG_FILE", "PATH"))
    subprocess.run(tmux + ["new-session", "-d", "-x", "170", "-y", "12",
                           f"env {env} {cli} status {m} --watch; echo EXIT=$?; sleep 60"],
                   check=True, timeout=30)

    def pane() -> str:
        return subprocess.run(tmux + ["capture-pane", "-p"], capture_output=True, text=True, timeout=30).stdout

    def line_of(screen: str, device: str) -> str:
        return next((ln for ln in screen.splitlines() if ln.startswith(device)), "")

    try:
        percents: list[float] = []
        rate_and_eta = False
        screen = ""
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            screen = pane()
            line = line_of(screen, "w.img")
            found = re.search(r"(\d+\.\d)%", line)
            if found:
                percents.append(float(found.group(1)))
                rate_and_eta |= bool(re.search(r"\d+(\.\d+)? (KiB|MiB)/s", line) and re.search(r"ETA \d+:\d\d", line))
                if line.rstrip().endswith("ready"):
                    break
            time.sleep(0.1)
        assert line_of(screen, "w.img").rstrip().endswith("ready"), f"never showed ready:\n{screen}"
        moving = [p for p in percents if 0 < p < 100]
        assert len(set(moving)) >= 2 and moving == sorted(moving), f"the bar did not advance: {percents}"
        assert percents[-1] == 100.0 and "━" in screen
        assert rate_and_eta, f"no rate and ETA while copying:\n{screen}"
        assert re.search(r"(paused|standby)\s*$", line_of(screen, "p.img")), screen

        # Completed from elsewhere: the watch keeps the line and says "ended".
        mounted.cli("complete", m, "w.img", "--no-pivot")
        deadline = time.monotonic() + 30
        while "ended" not in line_of(screen := pane(), "w.img"):
            assert time.monotonic() < deadline, f"never showed ended:\n{screen}"
            time.sleep(0.1)

        subprocess.run(tmux + ["send-keys", "C-c"], check=True, timeout=30)
        deadline = time.monotonic() + 30
        while "EXIT=" not in (screen := pane()):
            assert time.monotonic() < deadline, f"Ctrl-C did not end the watch:\n{screen}"
            time.sleep(0.1)
        assert "EXIT=0" in screen and "Traceback" not in screen, screen
    finally:
        subprocess.run(tmux + ["kill-server"], capture_output=True, timeout=30)
    assert (tmp_path / "w-t.img").read_bytes() == (mounted.source / "w.img").read_bytes()
    mounted.cli("cancel", m, "p.img", "--force")
