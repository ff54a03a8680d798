"""The recovery point (issue 13, item 6), through a real mount and a real qemu-nbd server.

``__org.mirrorfs_recovery-point-age`` (seconds since the oldest write not on the target), the
bytes behind and the outages, in QMP, ``status.json`` and the ``status`` table; ``--max-lag``
emits one event when the age passes it and one when it is back under. Bad ``--max-lag`` values
are refused with one line, on every surface, and nothing is created.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pytest

from compare import assert_identical
from mirrorfs.errors import QMPCommandError
from nbdservers import qemu_nbd
from test_replication_support import (NBD_TIMEOUT, make_blank, make_image, qmp, wait_job,
                                      wait_ready)

KiB = 1 << 10
MiB = 1 << 20
AGE = "__org.mirrorfs_recovery-point-age"
BEHIND = "__org.mirrorfs_bytes-behind"
EXCEEDED = "__org.mirrorfs_MAX_LAG_EXCEEDED"
RECOVERED = "__org.mirrorfs_MAX_LAG_RECOVERED"


def wait_event(client: Any, name: str, timeout: float, seen: list[dict[str, Any]]) -> dict[str, Any]:
    """The first event ``name`` (from ``seen`` or arriving within ``timeout``); every event read
    is appended to ``seen``."""
    deadline = time.monotonic() + timeout
    while True:
        for event in seen:
            if event["event"] == name:
                return event
        if time.monotonic() > deadline:
            raise AssertionError(f"no {name} within {timeout} s; events: {[e['event'] for e in seen]}")
        seen += client.poll_events(0.1)


@pytest.mark.timeout(120)
def test_an_outage_shows_in_the_recovery_point_and_max_lag_events(mount_factory: Any,
                                                                   tmp_path: Path) -> None:
    size = 8 * MiB
    mount = mount_factory()
    mount.allow_log(r"WARNING")  # a lost target and an exceeded max-lag are warnings
    source = mount.source / "vm.raw"
    make_image(source, size)
    served = tmp_path / "served.raw"
    make_blank(served, size)
    with qemu_nbd(served) as server:
        mount.cli("mirror", mount.mountpoint, "vm.raw", server.uri, "--max-lag", "1.5")
        with qmp(mount) as client:
            job = wait_ready(client, "vm.raw")
            time.sleep(0.6)  # a slow first copy may have passed max-lag: let that settle
            client.poll_events(0.1)
            job = wait_job(client, "vm.raw", lambda j: True, 5, "the job")
            assert (job[AGE], job[BEHIND], job["__org.mirrorfs_outages"]) == (0, 0, 0), job

            server.kill()
            written_at = time.time()
            with open(mount.mountpoint / "vm.raw", "r+b") as f:
                f.seek(3 * MiB)
                f.write(b"\x5c" * 200 * KiB)
            job = wait_job(client, "vm.raw", lambda j: not j["__org.mirrorfs_target-connected"],
                           NBD_TIMEOUT + 5, "the loss to be noticed")
            assert job["__org.mirrorfs_outages"] == 1 and job["__org.mirrorfs_reconnects"] == 0, job
            assert job[BEHIND] >= 200 * KiB, job
            first = job[AGE]
            assert 0 < first <= time.time() - written_at + 0.1, job
            seen: list[dict[str, Any]] = []
            exceeded = wait_event(client, EXCEEDED, 10, seen)
            assert exceeded["data"]["device"] == "vm.raw" and exceeded["data"]["max-lag"] == 1.5
            assert exceeded["data"]["recovery-point-age"] > 1.5
            job = wait_job(client, "vm.raw", lambda j: j[AGE] > first + 1.5, 10, "the age to grow")
            table = mount.cli("status", mount.mountpoint).stdout
            header, row = table.splitlines()
            lag = row[header.index("LAG"):].split()[0]
            assert lag.endswith("s") and float(lag[:-1]) > 1.5, table
            status_json = json.loads((mount.control / "status.json").read_text())
            assert status_json[0][AGE] > 1.5 and status_json[0]["__org.mirrorfs_outages"] == 1
            assert RECOVERED not in [e["event"] for e in seen]

            server.start()
            job = wait_ready(client, "vm.raw", timeout=60)
            assert (job[AGE], job[BEHIND]) == (0, 0), job
            assert job["__org.mirrorfs_outages"] == 1 and job["__org.mirrorfs_reconnects"] == 1, job
            recovered = wait_event(client, RECOVERED, 5, seen)
            assert recovered["data"]["recovery-point-age"] <= 1.5
            seen += client.poll_events(0.5)
            names = [e["event"] for e in seen]
            assert names.count(EXCEEDED) == 1 and names.count(RECOVERED) == 1, names
            assert names.index(EXCEEDED) < names.index("MIRROR_TARGET_RESTORED") < names.index(RECOVERED)
        mount.cli("complete", mount.mountpoint, "vm.raw", "--no-pivot")
    assert_identical(source, served)


def test_no_outage_no_lag(mounted: Any, tmp_path: Path) -> None:
    """A ready job with a local target stays in sync under writes: age 0, no event."""
    make_image(mounted.source / "vm.raw", 2 * MiB)
    mounted.cli("mirror", mounted.mountpoint, "vm.raw", tmp_path / "t.raw", "--create",
                "--max-lag", "0.2")
    with qmp(mounted) as client:
        wait_ready(client, "vm.raw")
        time.sleep(0.5)
        client.poll_events(0.1)
        with open(mounted.mountpoint / "vm.raw", "r+b") as f:
            for n in range(50):
                f.seek(n * 4096)
                f.write(b"\x11" * 4096)
                os.fsync(f.fileno())
        time.sleep(0.5)
        job = wait_ready(client, "vm.raw")
        assert job[AGE] == 0 and job["__org.mirrorfs_outages"] == 0, job
        assert [e["event"] for e in client.poll_events(0.1)
                if e["event"] in (EXCEEDED, RECOVERED)] == []


@pytest.mark.parametrize("value", ["-1", "nan", "inf", "1e999", "soon"])
def test_a_bad_max_lag_is_refused_with_one_line_and_nothing_created(mounted: Any, tmp_path: Path,
                                                                    value: str) -> None:
    make_image(mounted.source / "vm.raw", 1 * MiB)
    target = tmp_path / "t.raw"
    r = mounted.cli("mirror", mounted.mountpoint, "vm.raw", target, "--create", "--max-lag", value,
                    check=False)
    assert r.returncode == 2, r
    assert r.stderr == (f"mirrorfs mirror: invalid max-lag {value!r}: expected a number of "
                        f"seconds, 0 or more, such as 30 or 0.5\n")
    with qmp(mounted) as client:
        number = -1 if value == "-1" else value  # (JSON has no NaN or infinity)
        with pytest.raises(QMPCommandError, match="invalid max-lag"):
            client.execute("drive-mirror", {"device": "vm.raw", "target": str(target),
                                            "mode": "absolute-paths", "max-lag": number})
        assert client.execute("query-block-jobs") == []
    assert not target.exists()
