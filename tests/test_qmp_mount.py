"""QEMU's own QMP clients and the mirrorfs CLI against the socket of a real mount (tier c + d).

Issue 5, "Done when" 1: ``qemu.qmp`` (unmodified) connects, runs ``query-block-jobs``, starts
``drive-mirror``, waits for ``BLOCK_JOB_READY``, runs ``block-job-complete`` and receives
``BLOCK_JOB_COMPLETED``; ``qmp-shell`` runs one command. The CLI does the same round trip.
"""

from __future__ import annotations

import asyncio
import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any


MIRRORFS = str(Path(sys.executable).with_name("mirrorfs"))
QMP_SHELL = str(Path(sys.executable).with_name("qmp-shell"))
SIZE = 4 << 20


def _socket(mount: Any) -> str:
    path = (mount.control / "socket").read_text().strip()
    st = os.lstat(path)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
    return path


def _write_image(path: Path) -> bytes:
    data = os.urandom(SIZE)
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return data


def test_qemu_qmp_drives_a_mirror_to_completion(mounted: Any, tmp_path: Path) -> None:
    from qemu.qmp import QMPClient

    data = _write_image(mounted.mountpoint / "a.img")
    target = tmp_path / "target.img"
    sock = _socket(mounted)

    async def session() -> dict[str, Any]:
        seen: dict[str, Any] = {}
        client = QMPClient("mirrorfs-conformance")
        await client.connect(sock)
        try:
            with client.listener() as listener:
                seen["before"] = await client.execute("query-block-jobs")
                await client.execute("drive-mirror", {"device": "a.img", "target": str(target),
                                                      "sync": "full", "mode": "absolute-paths"})
                seen["events"] = []

                async def wait_for(name: str) -> dict[str, Any]:
                    async for event in listener:
                        seen["events"].append(event["event"])
                        if event["event"] == name:
                            return dict(event["data"])
                    raise AssertionError("event stream ended")

                seen["ready"] = await asyncio.wait_for(wait_for("BLOCK_JOB_READY"), 60)
                seen["jobs"] = await client.execute("query-block-jobs")
                await client.execute("block-job-complete", {"device": "a.img", "pivot": False})
                seen["completed"] = await asyncio.wait_for(wait_for("BLOCK_JOB_COMPLETED"), 60)
        finally:
            await client.disconnect()
        return seen

    seen = asyncio.run(session())
    assert seen["before"] == []
    assert seen["ready"]["device"] == "a.img" and seen["ready"]["len"] == seen["ready"]["offset"] == SIZE
    [job] = seen["jobs"]
    assert job["device"] == "a.img" and job["ready"] is True and job["type"] == "mirror"
    assert seen["completed"]["device"] == "a.img" and "error" not in seen["completed"]
    assert target.read_bytes() == data


def test_qmp_shell_against_a_mount(mounted: Any) -> None:
    result = subprocess.run([QMP_SHELL, _socket(mounted)], input="query-block-jobs\n",
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    replies = [json.loads(line[line.index("{"):]) for line in result.stdout.splitlines() if '"return"' in line]
    assert replies == [{"return": []}]


def test_cli_round_trip_against_a_mount(mounted: Any, tmp_path: Path) -> None:
    data = _write_image(mounted.mountpoint / "b.img")
    target = tmp_path / "b-target.img"

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([MIRRORFS, *args], capture_output=True, text=True, timeout=120, env=mounted.env())

    r = cli("mirror", str(mounted.mountpoint), "b.img", str(target), "--create")
    assert r.returncode == 0, r.stderr
    r = cli("mirror", str(mounted.mountpoint), "../escape.img", str(target))
    assert r.returncode == 2 and "leaves the mount" in r.stderr
    deadline = time.monotonic() + 60
    while True:
        r = cli("status", str(mounted.mountpoint), "--json")
        assert r.returncode == 0, r.stderr
        [job] = json.loads(r.stdout)
        if job["ready"]:
            break
        assert time.monotonic() < deadline, f"job never became ready: {job}"
        time.sleep(0.1)
    r = cli("status", str(mounted.mountpoint))
    assert r.returncode == 0 and r.stdout.splitlines()[1].split()[:3] == ["b.img", "b.img", "ready"]
    r = cli("complete", str(mounted.mountpoint), "b.img", "--no-pivot")
    assert r.returncode == 0, r.stderr
    assert target.read_bytes() == data
    r = cli("status", str(mounted.mountpoint))
    assert (r.returncode, r.stdout) == (0, "no jobs\n")
    r = cli("complete", str(mounted.mountpoint), "b.img")
    assert r.returncode == 2 and r.stderr.startswith("mirrorfs complete: ")


def _qmp_lines(sock_path: str, payload: bytes, sentinel: bytes) -> list[dict[str, Any]]:
    """Negotiate on a fresh connection, send ``payload`` then ``sentinel`` (a command with id
    "sentinel"), return every message received before the sentinel's reply (inclusive)."""
    import socket

    s = socket.socket(socket.AF_UNIX)
    s.settimeout(30)
    s.connect(sock_path)
    f = s.makefile("rb")
    try:
        assert "QMP" in json.loads(f.readline())
        s.sendall(b'{"execute": "qmp_capabilities"}\n')
        assert json.loads(f.readline()) == {"return": {}}
        s.sendall(payload + sentinel)
        out = []
        while True:
            msg = json.loads(f.readline())
            out.append(msg)
            if msg.get("id") == "sentinel":
                return out
    finally:
        s.close()


def test_socket_junk_never_changes_a_job(mounted: Any, tmp_path: Path) -> None:
    """Issue 5, Done when 3 (socket side): junk, wrong types, unknown commands and arguments,
    huge lines: each gets an error, other clients keep working, the job does not change."""
    import random

    _write_image(mounted.mountpoint / "j.img")
    sock = _socket(mounted)
    r = subprocess.run([MIRRORFS, "mirror", str(mounted.mountpoint), "j.img", str(tmp_path / "j-t.img"),
                        "--create", "--sync", "none"], capture_output=True, text=True, timeout=60,
                       env=mounted.env())
    assert r.returncode == 0, r.stderr

    def job_state() -> dict[str, Any]:
        reply = _qmp_lines(sock, b"", b'{"execute": "query-block-jobs", "id": "sentinel"}\n')[-1]
        [job] = reply["return"]
        return {k: job[k] for k in ("device", "status", "ready", "paused", "speed", "target", "io-status")}

    deadline = time.monotonic() + 60
    while not (before := job_state())["ready"]:
        assert time.monotonic() < deadline, before
        time.sleep(0.05)
    rng = random.Random(5)
    corpus = [
        b'{"execute": "block-job-complete", "arguments": {"device": 5}}',
        b'{"execute": "block-job-complete", "arguments": {"device": "j.img", "pivot": "no"}}',
        b'{"execute": "block-job-cancel", "arguments": {"device": "j.img", "force": "yes"}}',
        b'{"execute": "block-job-pause", "arguments": {"device": "j.img", "bogus": 1}}',
        b'{"execute": "block-job-set-speed", "arguments": {"device": "j.img", "speed": "fast"}}',
        b'{"execute": "block-job-set-speed", "arguments": {"device": "j.img", "speed": -1}}',
        b'{"execute": "drive-mirror", "arguments": {"device": "../../etc/passwd", "target": "/tmp/x"}}',
        b'{"execute": "drive-mirror", "arguments": {"device": "j.img", "target": "/tmp/x"}}',
        b'{"execute": "transaction", "arguments": {"actions": [{"type": "block-job-cancel"}]}}',
        b'{"execute": "transaction", "arguments": {"actions": "all"}}',
        b'{"execute": "no-such-command"}',
        b'{"execute": "qmp_capabilities"}',
        b'{"execute": ["block-job-cancel"]}',
        b'{"execute": "block-job-cancel", "arguments": {"device": "j.img"}, "extra": 1}',
        b'{"execute": "block-job-cancel", "arguments": ["j.img"]}',
        b'[{"execute": "block-job-cancel", "arguments": {"device": "j.img"}}]',
        b'{"execute": "block-job-cancel", "arguments": {"device": "j.img"}',  # unterminated
        b'{' * 5000,
        b'{"execute": "x", "arguments": {"pad": "' + b"p" * (2 << 20) + b'"}}',
    ] + [bytes(rng.randrange(256) for _ in range(rng.randrange(1, 400))) for _ in range(40)]
    for item in corpus:
        # Each item alone on its line(s); a quote and brackets close whatever it left open.
        msgs = _qmp_lines(sock, item + b'\n"' + b"}" * 300 + b"\n",
                          b'{"execute": "query-version", "id": "sentinel"}\n')
        answers, sentinel = msgs[:-1], msgs[-1]
        assert "return" in sentinel, (item[:80], sentinel)
        assert answers, f"no reply to {item[:80]!r}"
        assert all("error" in m or "event" in m for m in answers), (item[:80], answers)
        assert job_state() == before, f"{item[:80]!r} changed the job"
    r = subprocess.run([MIRRORFS, "cancel", str(mounted.mountpoint), "j.img"], capture_output=True, text=True,
                       timeout=60, env=mounted.env())
    assert r.returncode == 0, r.stderr


def test_status_watch_of_a_real_job_in_tmux(mounted: Any, tmp_path: Path) -> None:
    """Issue 5, Done when 6: the live progress bar advances, then shows "ready"."""
    import re
    import shutil

    if shutil.which("tmux") is None:
        raise AssertionError("tmux is a required Debian package (scripts/setup)")
    with open(mounted.mountpoint / "w.img", "wb") as f:
        f.write(os.urandom(1 << 20) * 24)
    r = subprocess.run([MIRRORFS, "mirror", str(mounted.mountpoint), "w.img", str(tmp_path / "w-t.img"),
                        "--create", "--speed", "6M"], capture_output=True, text=True, timeout=60,
                       env=mounted.env())
    assert r.returncode == 0, r.stderr
    tmux = ["tmux", "-S", str(tmp_path / "tmux.sock")]
    subprocess.run(tmux + ["new-session", "-d", "-x", "160", "-y", "12",
                           f"{MIRRORFS} status {mounted.mountpoint} --watch"], check=True, timeout=30)
    try:
        percents: list[float] = []
        screen = ""
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            screen = subprocess.run(tmux + ["capture-pane", "-p"], capture_output=True, text=True,
                                    timeout=30).stdout
            line = next((ln for ln in screen.splitlines() if ln.startswith("w.img")), "")
            m = re.search(r"(\d+\.\d)%", line)
            if m:
                percents.append(float(m.group(1)))
                if "ready" in line:
                    break
            time.sleep(0.1)
        assert "ready" in screen, f"never showed ready:\n{screen}"
        moving = sorted(set(p for p in percents if 0 < p < 100))
        assert len(moving) >= 2, f"the bar did not advance: {percents}"
        assert percents[-1] == 100.0 and "━" in screen
    finally:
        subprocess.run(tmux + ["kill-server"], capture_output=True, timeout=30)
    r = subprocess.run([MIRRORFS, "cancel", str(mounted.mountpoint), "w.img"], capture_output=True, text=True,
                       timeout=60, env=mounted.env())
    assert r.returncode == 0, r.stderr


def test_cli_complete_with_pivot_moves_the_image_to_the_target(mounted: Any, tmp_path: Path) -> None:
    data = _write_image(mounted.mountpoint / "p.img")
    target = tmp_path / "p-target.img"
    mnt = str(mounted.mountpoint)

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([MIRRORFS, *args], capture_output=True, text=True, timeout=120, env=mounted.env())

    assert cli("mirror", mnt, "p.img", str(target), "--create").returncode == 0
    deadline = time.monotonic() + 60
    while not json.loads(cli("status", mnt, "--json").stdout)[0]["ready"]:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    r = cli("complete", mnt, "p.img")
    assert r.returncode == 0 and "the mount now serves the target" in r.stdout, r.stderr
    with open(mounted.mountpoint / "p.img", "r+b") as f:
        f.write(b"after-pivot")
        f.flush()
        os.fsync(f.fileno())
    assert target.read_bytes() == b"after-pivot" + data[len(b"after-pivot"):]
    assert (mounted.source / "p.img").read_bytes() == data, "the source must not see writes after pivot"
