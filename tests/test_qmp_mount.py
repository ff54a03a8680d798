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
            with client.listen() as listener:
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
    assert r.returncode == 0 and r.stdout.splitlines()[1].split()[:2] == ["b.img", "ready"]
    r = cli("complete", str(mounted.mountpoint), "b.img", "--no-pivot")
    assert r.returncode == 0, r.stderr
    assert target.read_bytes() == data
    r = cli("status", str(mounted.mountpoint))
    assert (r.returncode, r.stdout) == (0, "no jobs\n")
    r = cli("complete", str(mounted.mountpoint), "b.img")
    assert r.returncode == 2 and r.stderr.startswith("mirrorfs complete: ")
