"""Faults from the far side: nbdkit's ``error`` and ``delay`` filters (issue 6, Done when 4).

The ``error`` filter fails requests with EIO or ENOSPC while its ``error-file`` exists, so each
test switches the faults on and off at an exact moment without restarting the server. For each
``on-target-error`` policy:

- ``report``: the job fails, stays listed with its error, io-status ``failed``.
- ``ignore``: BLOCK_JOB_ERROR events (action ignore) while it keeps retrying; once the faults stop
  it reaches ready by itself and the copy is identical.
- ``stop``: paused with io-status ``failed``; ``resume`` (after the faults stop) retries and
  the job reaches ready; identical.
- ``enospc``: ENOSPC pauses it with io-status ``nospace`` (resume retries); EIO fails it.

The ``delay`` filter (a slow link) with a steady writer through the mount: the job still
reaches ready, and the copy is identical.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from compare import assert_identical
from nbdservers import nbdkit
from test_replication_support import Writer, outage_mount, qmp, wait_job, wait_ready

SIZE = 8 << 20


def _setup(mount_factory: Any, tmp_path: Path) -> tuple[Any, Path, Path, Path]:
    mount, source, served = outage_mount(mount_factory, tmp_path, SIZE)  # errors are warnings too
    return mount, source, served, tmp_path / "faults-on"


def _error_params(error: str, switch: Path) -> list[str]:
    return [f"error={error}", "error-rate=100%", f"error-file={switch}"]


def _events(client: Any, name: str) -> list[dict[str, Any]]:
    return [e for e in client.poll_events(0.05) if e["event"] == name]


@pytest.mark.parametrize("policy,error", [("report", "EIO"), ("enospc", "EIO")])
def test_target_errors_fail_the_job(mount_factory: Any, tmp_path: Path, policy: str, error: str) -> None:
    mount, source, served, switch = _setup(mount_factory, tmp_path)
    switch.touch()
    with nbdkit(served, filters=["error"], params=_error_params(error, switch)) as server:
        try:
            with qmp(mount) as client:
                mount.cli("mirror", mount.mountpoint, "vm.raw", server.uri, "--on-target-error", policy)
                job = wait_job(client, "vm.raw", lambda j: j["status"] == "concluded", 30, "the job to fail")
                assert job["io-status"] == "failed" and not job["ready"], job
                assert "Input/output error" in job["error"] or "EIO" in job["error"], job
                events = client.poll_events(0.1)
            names = [e["event"] for e in events]
            assert "BLOCK_JOB_ERROR" in names and "BLOCK_JOB_COMPLETED" in names, names
            err = next(e["data"] for e in events if e["event"] == "BLOCK_JOB_ERROR")
            assert err == {"device": "vm.raw", "operation": "write", "action": "report"}
            done = next(e["data"] for e in events if e["event"] == "BLOCK_JOB_COMPLETED")
            assert done["error"] == job["error"]
            # the mount keeps serving the source, writes included
            with open(mount.mountpoint / "vm.raw", "r+b", buffering=0) as f:
                f.write(b"still writable")
            assert source.read_bytes()[:14] == b"still writable"
            r = mount.cli("complete", mount.mountpoint, "vm.raw", check=False)
            assert r.returncode == 1 and "ended" in r.stderr, r.stderr
        finally:
            mount.unmount()


def test_ignore_keeps_retrying_then_converges(mount_factory: Any, tmp_path: Path) -> None:
    mount, source, served, switch = _setup(mount_factory, tmp_path)
    switch.touch()
    with nbdkit(served, filters=["error"], params=_error_params("EIO", switch)) as server:
        try:
            with qmp(mount) as client:
                mount.cli("mirror", mount.mountpoint, "vm.raw", server.uri, "--on-target-error", "ignore")
                errors: list[dict[str, Any]] = []
                wait_job(client, "vm.raw", lambda j: bool(errors.extend(_events(client, "BLOCK_JOB_ERROR"))
                                                          or len(errors) >= 5), 30, "repeated errors")
                assert all(e["data"]["action"] == "ignore" for e in errors), errors[:3]
                job = wait_job(client, "vm.raw", lambda j: True, 5, "the job")
                assert job["status"] == "running" and not job["ready"] and job["io-status"] == "ok", job
                assert job["dirty-bytes"] == SIZE  # nothing got through
                switch.unlink()  # the far side recovers
                wait_ready(client, "vm.raw")
            mount.cli("complete", mount.mountpoint, "vm.raw", "--no-pivot")
            assert_identical(source, served)
        finally:
            mount.unmount()


@pytest.mark.parametrize("policy,error,io_status", [("stop", "EIO", "failed"), ("stop", "ENOSPC", "nospace"),
                                                   ("enospc", "ENOSPC", "nospace")])
def test_stop_pauses_and_resume_retries(mount_factory: Any, tmp_path: Path, policy: str, error: str,
                                        io_status: str) -> None:
    mount, source, served, switch = _setup(mount_factory, tmp_path)
    switch.touch()
    with nbdkit(served, filters=["error"], params=_error_params(error, switch)) as server:
        try:
            with qmp(mount) as client:
                mount.cli("mirror", mount.mountpoint, "vm.raw", server.uri, "--on-target-error", policy)
                job = wait_job(client, "vm.raw", lambda j: j["paused"], 30, "the job to stop")
                assert job["status"] == "paused" and job["io-status"] == io_status, job
                assert not job["ready"] and "error" not in job, job
                actions = {e["data"]["action"] for e in _events(client, "BLOCK_JOB_ERROR")}
                assert actions == {"stop"}, actions
                # resuming while the far side still fails: it stops again
                mount.cli("resume", mount.mountpoint, "vm.raw")
                wait_job(client, "vm.raw", lambda j: j["paused"] and j["io-status"] == io_status, 30,
                         "the job to stop again")
                switch.unlink()
                mount.cli("resume", mount.mountpoint, "vm.raw")
                job = wait_ready(client, "vm.raw")
                assert job["io-status"] == "ok" and not job["paused"], job
            mount.cli("complete", mount.mountpoint, "vm.raw", "--no-pivot")
            assert_identical(source, served)
        finally:
            mount.unmount()


@pytest.mark.slow
@pytest.mark.parametrize("copy_mode", ["background", "write-blocking"])
def test_slow_link_still_reaches_ready_under_a_writer(mount_factory: Any, tmp_path: Path,
                                                      copy_mode: str) -> None:
    mount, source, served, _ = _setup(mount_factory, tmp_path)
    writer = None
    # every write request to the target takes 20 ms more: a slow, far link
    with nbdkit(served, filters=["delay"], params=["delay-write=20ms", "delay-zero=20ms"]) as server:
        try:
            with qmp(mount) as client:
                # a steady writer: about 100 writes of 4 KiB a second, all over the image
                writer = Writer(mount.mountpoint / "vm.raw", tmp_path, seed=11, pause=0.01)
                # a speed limit makes the copy last a few seconds, so the writer runs throughout
                mount.cli("mirror", mount.mountpoint, "vm.raw", server.uri, "--copy-mode", copy_mode,
                          "--speed", "2M")
                job = wait_ready(client, "vm.raw", timeout=90)
                assert writer.proc.poll() is None, "the writer stopped"
                stats = writer.stop()
                assert stats["errors"] == [] and stats["writes"] > 50, stats
                print(f"{copy_mode}: {stats['writes']} writes, max pwrite "
                      f"{stats['max_latency'] * 1000:.0f} ms; duplicated {job['__org.mirrorfs_duplicated-bytes']}")
                wait_ready(client, "vm.raw")
            mount.cli("complete", mount.mountpoint, "vm.raw", "--no-pivot")
            assert_identical(source, served)
        finally:
            if writer is not None:
                writer.kill()
            mount.unmount()
