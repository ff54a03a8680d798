"""QEMU's own QMP clients driving transactions on a real mount (issue 5, "Done when" 1 and 2).

``tests/test_qmp_mount.py`` has the basic round trip (``drive-mirror``, ``BLOCK_JOB_READY``,
``block-job-complete``, ``BLOCK_JOB_COMPLETED``) and one ``query-block-jobs`` in ``qmp-shell``.
Here, with ``qemu.qmp`` unmodified (asyncio, run with ``asyncio.run`` in this synchronous test):

- a QMP ``transaction`` of two ``drive-mirror`` actions starts both jobs; one whose second action
  is bad starts neither (all or nothing);
- a ``transaction`` of two ``block-job-complete`` actions with one job not ready is refused with
  ``GenericError`` and changes nothing; once both are ready it pivots both, and both
  ``BLOCK_JOB_COMPLETED`` events arrive with QEMU's timestamp shape;
- ``block-job-cancel`` with ``force`` gives ``BLOCK_JOB_CANCELLED``; ``JOB_STATUS_CHANGE`` events
  trace each job's states;
- ``qmp-shell`` changes a real job (``block-job-set-speed``) and the change shows in ``status.json``.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from mounting import Mount, random_image, wait_for

QMP_SHELL = str(Path(sys.executable).with_name("qmp-shell"))


def jobs(mount: Mount) -> dict[str, dict[str, Any]]:
    return {j["device"]: j for j in json.loads((mount.control / "status.json").read_text())}


def test_qemu_qmp_transactions_start_refuse_and_pivot(mounted: Mount, tmp_path: Path) -> None:
    from qemu.qmp import ExecuteError, QMPClient

    a, b = random_image(mounted, "a.img"), random_image(mounted, "b.img")
    ta, tb = tmp_path / "ta.img", tmp_path / "tb.img"
    sock = (mounted.control / "socket").read_text().strip()

    def mirror(device: str, target: Path, **extra: Any) -> dict[str, Any]:
        return {"type": "drive-mirror", "data": {"device": device, "target": str(target),
                                                 "sync": "full", "mode": "absolute-paths", **extra}}

    async def session() -> dict[str, Any]:
        seen: dict[str, Any] = {"events": []}
        client = QMPClient("mirrorfs-transactions")
        await client.connect(sock)
        try:
            with client.listener() as listener:
                async def wait_event(name: str, device: str, timeout: float = 60) -> dict[str, Any]:
                    loop = asyncio.get_running_loop()
                    deadline = loop.time() + timeout
                    while True:
                        for ev in seen["events"]:
                            if ev["event"] == name and ev["data"].get("device") == device:
                                return ev
                        try:
                            event = await asyncio.wait_for(listener.get(), max(0.01, deadline - loop.time()))
                        except asyncio.TimeoutError:
                            raise AssertionError(f"no {name} for {device} within {timeout} s; events: "
                                                 f"{[(e['event'], e['data']) for e in seen['events']]}") from None
                        seen["events"].append(dict(event))

                # All or nothing: the second action names no image, so neither job starts.
                try:
                    await client.execute("transaction", {"actions": [
                        mirror("a.img", ta), mirror("nope.img", tb)]})
                except ExecuteError as exc:
                    seen["bad-start"] = (exc.error_class, str(exc))
                seen["after-bad-start"] = await client.execute("query-block-jobs")
                # b slow, so that it is not ready when the complete transaction comes.
                await client.execute("transaction", {"actions": [
                    mirror("a.img", ta), mirror("b.img", tb, speed=64 << 10, **{"buf-size": 256 << 10})]})
                seen["started"] = sorted(j["device"] for j in await client.execute("query-block-jobs"))
                await wait_event("BLOCK_JOB_READY", "a.img")
                complete = {"actions": [{"type": "block-job-complete", "data": {"device": d}}
                                        for d in ("a.img", "b.img")]}
                try:
                    await client.execute("transaction", complete)
                except ExecuteError as exc:
                    seen["refused"] = (exc.error_class, str(exc))
                seen["after-refused"] = await client.execute("query-block-jobs")
                await client.execute("block-job-set-speed", {"device": "b.img", "speed": 0})
                await wait_event("BLOCK_JOB_READY", "b.img")
                await client.execute("transaction", complete)
                seen["completed"] = [await wait_event("BLOCK_JOB_COMPLETED", d)
                                     for d in ("a.img", "b.img")]
                seen["after-complete"] = await client.execute("query-block-jobs")
                # A forced cancel before ready: BLOCK_JOB_CANCELLED.
                await client.execute("drive-mirror", {"device": "a.img", "target": str(tmp_path / "tc.img"),
                                                      "mode": "absolute-paths", "speed": 64 << 10,
                                                      "buf-size": 256 << 10})
                await client.execute("block-job-cancel", {"device": "a.img", "force": True})
                seen["cancelled"] = await wait_event("BLOCK_JOB_CANCELLED", "a.img")
        finally:
            await client.disconnect()
        return seen

    seen = asyncio.run(session())
    assert seen["bad-start"][0] == "DeviceNotFound" and "nope.img" in seen["bad-start"][1]
    assert seen["after-bad-start"] == []  # a.img's job was started, then undone
    assert seen["started"] == ["a.img", "b.img"]
    assert seen["refused"][0] == "GenericError"
    assert "'b.img' cannot be completed: it is not ready yet" in seen["refused"][1]
    before = {j["device"]: (j["status"], j["target"]) for j in seen["after-refused"]}
    assert before == {"a.img": ("ready", str(ta)), "b.img": ("running", str(tb))}
    for ev, device in zip(seen["completed"], ("a.img", "b.img")):
        assert ev["data"]["device"] == device and "error" not in ev["data"]
        assert set(ev["timestamp"]) == {"seconds", "microseconds"}
    assert seen["after-complete"] == []
    assert seen["cancelled"]["data"]["device"] == "a.img"
    # Both pivoted: the sources are untouched copies, the mount serves the targets.
    assert ta.read_bytes() == a and tb.read_bytes() == b
    with open(mounted.mountpoint / "b.img", "r+b") as f:
        f.write(b"on the target")
    assert tb.read_bytes()[:13] == b"on the target" and (mounted.source / "b.img").read_bytes() == b
    # JOB_STATUS_CHANGE traces b's life: running, then ready, then concluded.
    statuses = [ev["data"]["status"] for ev in seen["events"]
                if ev["event"] == "JOB_STATUS_CHANGE" and ev["data"].get("id") == "b.img"]
    assert "running" in statuses and "ready" in statuses and "concluded" in statuses, statuses
    assert statuses.index("running") < statuses.index("ready") < statuses.index("concluded")


def test_qmp_shell_changes_a_real_job(mounted: Mount, tmp_path: Path) -> None:
    random_image(mounted, "a.img")
    mounted.cli("mirror", mounted.mountpoint, "a.img", tmp_path / "t.img", "--create", "--speed", "64K",
                "--buf-size", "256K")
    sock = (mounted.control / "socket").read_text().strip()
    result = subprocess.run([QMP_SHELL, sock], input="block-job-set-speed device=a.img speed=1048576\n",
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    replies = [json.loads(ln[ln.index("{"):]) for ln in result.stdout.splitlines() if '"return"' in ln]
    assert replies == [{"return": {}}], result.stdout
    assert jobs(mounted)["a.img"]["speed"] == 1 << 20
    result = subprocess.run([QMP_SHELL, sock], input="block-job-pause device=nope.img\n",
                            capture_output=True, text=True, timeout=60)
    assert '"DeviceNotActive"' in result.stdout, result.stdout
    assert jobs(mounted)["a.img"]["paused"] is False
    wait_for(lambda: jobs(mounted)["a.img"]["ready"], 60, "ready at the new speed")
    mounted.cli("cancel", mounted.mountpoint, "a.img")
