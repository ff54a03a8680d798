"""Losing the NBD server and losing mirrorfs itself (issue 6, Done when 2 and 3).

- Intermittent: a writer process keeps writing through the mount while the qemu-nbd server is
  SIGKILLed, stays away a few seconds, and is restarted on the same file, three times. The writer
  sees no error and no write slower than the documented reply timeout; the job emits
  MIRROR_TARGET_LOST / MIRROR_TARGET_RESTORED each time and becomes ready again by itself; the
  result is identical.
- Crash: the mount process is SIGKILLed mid-replication with a writer running; ``bitmap inspect``
  says dirty (exit 1); after remounting, ``--sync dirty`` sends at most the dirty bytes plus one
  buf-size (the job's own counters) and the result is identical. After ``complete --no-pivot``
  and a SIGKILL, ``inspect`` says the job ended with no dirty bit (exit 1: later writes would not
  be recorded) and the files are identical.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from compare import assert_identical
from mounting import mirrorfs_cli, process_alive, wait_for
from nbdservers import qemu_nbd
from test_replication_support import (NBD_TIMEOUT, Writer, make_blank, make_image, outage_mount,
                                      qmp, wait_job, wait_ready)

MiB = 1 << 20


@pytest.mark.slow
@pytest.mark.timeout(180)
@pytest.mark.parametrize("copy_mode", ["background", "write-blocking"])
def test_server_killed_and_restarted_three_times_under_a_writer(mount_factory: Any, tmp_path: Path,
                                                                copy_mode: str) -> None:
    mount, source, served = outage_mount(mount_factory, tmp_path, 32 * MiB)
    writer = None
    with qemu_nbd(served, transport="unix") as server:
        try:
            mount.cli("mirror", mount.mountpoint, "vm.raw", server.uri, "--copy-mode", copy_mode)
            with qmp(mount) as client:
                wait_ready(client, "vm.raw")
                writer = Writer(mount.mountpoint / "vm.raw", tmp_path, seed=7, fsync_every=64)
                events: list[dict[str, Any]] = []
                for cycle in range(3):
                    # the writer is demonstrably writing and its writes reach the target
                    dup0 = wait_job(client, "vm.raw", lambda j: True, 5, "job")["__org.mirrorfs_duplicated-bytes"]
                    wait_job(client, "vm.raw", lambda j: j["__org.mirrorfs_duplicated-bytes"] > dup0 + 64 * 1024,
                             30, f"duplicated writes before outage {cycle}")
                    server.kill()
                    away = time.monotonic()
                    lost = wait_job(client, "vm.raw", lambda j: not j["__org.mirrorfs_target-connected"],
                                    NBD_TIMEOUT + 5, f"the loss to be noticed (outage {cycle})")
                    assert lost["status"] == "running" and lost["ready"] is False, lost
                    # several seconds away, while the writes go on into the source (dirty grows)
                    wait_job(client, "vm.raw",
                             lambda j: j["dirty-bytes"] > 0 and time.monotonic() - away > 3.0,
                             30, f"dirty bytes during outage {cycle}")
                    assert writer.proc.poll() is None, "the writer died during the outage"
                    server.start()
                    back = time.monotonic()
                    job = wait_ready(client, "vm.raw", timeout=60)
                    # (dirty-bytes may be a cluster or two: the writer's duplicates in flight)
                    assert job["__org.mirrorfs_target-connected"] and job["io-status"] == "ok", job
                    print(f"outage {cycle}: ready again {time.monotonic() - back:.1f} s after restart")
                    events += client.poll_events(0.05)
                stats = writer.stop()
                events += client.poll_events(0.05)
                names = [e["event"] for e in events]
                assert names.count("MIRROR_TARGET_LOST") == 3, names
                assert names.count("MIRROR_TARGET_RESTORED") == 3, names
                # the first ready, then lost -> restored -> ready again (by itself) each time
                key = ("MIRROR_TARGET_LOST", "MIRROR_TARGET_RESTORED", "BLOCK_JOB_READY")
                order = [n for n in names if n in key]
                assert order == ["BLOCK_JOB_READY"] + list(key) * 3, order
                assert not [e for e in events if e["event"] == "BLOCK_JOB_ERROR"], events
                lost_data = next(e["data"] for e in events if e["event"] == "MIRROR_TARGET_LOST")
                assert lost_data["device"] == "vm.raw" and lost_data["target"] == server.uri
                wait_ready(client, "vm.raw")
            print(f"writer: {stats['writes']} writes, max pwrite {stats['max_latency'] * 1000:.0f} ms, "
                  f"max fsync {stats['max_fsync_latency'] * 1000:.0f} ms, slow: {stats['slow']}")
            assert stats["errors"] == [], stats["errors"][:5]
            assert stats["writes"] > 100 and stats["fsyncs"] > 0
            assert stats["max_latency"] < NBD_TIMEOUT and stats["max_fsync_latency"] < NBD_TIMEOUT, stats
            mount.cli("complete", mount.mountpoint, "vm.raw", "--no-pivot")
            assert_identical(source, served)
        finally:
            if writer is not None:
                writer.kill()
            mount.unmount()


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.parametrize("copy_mode", ["background", "write-blocking"])
def test_hung_server_costs_a_writer_at_most_the_timeout(mount_factory: Any, tmp_path: Path,
                                                        copy_mode: str) -> None:
    """A server that stops answering (SIGSTOP) without closing the connection: in background mode
    the writer never waits for it; in write-blocking mode one write waits, at most the documented
    timeout, then the loss is declared and no write waits any more."""
    size = 16 * MiB
    mount = mount_factory()
    mount.allow_log(r"WARNING")
    source = mount.source / "vm.raw"
    make_image(source, size)
    served = tmp_path / "served.raw"
    make_blank(served, size)
    writer = None
    with qemu_nbd(served, transport="unix") as server:
        try:
            with qmp(mount) as client:
                mount.cli("mirror", mount.mountpoint, "vm.raw", server.uri, "--copy-mode", copy_mode)
                wait_ready(client, "vm.raw")
                writer = Writer(mount.mountpoint / "vm.raw", tmp_path, seed=5, pause=0.005)
                dup0 = wait_job(client, "vm.raw", lambda j: True, 5, "job")["__org.mirrorfs_duplicated-bytes"]
                wait_job(client, "vm.raw", lambda j: j["__org.mirrorfs_duplicated-bytes"] > dup0 + 64 * 1024,
                         30, "duplicated writes")
                assert server.proc is not None
                os.kill(server.proc.pid, signal.SIGSTOP)
                try:
                    frozen = time.monotonic()
                    wait_job(client, "vm.raw", lambda j: not j["__org.mirrorfs_target-connected"],
                             NBD_TIMEOUT + 10, "the hung server to count as lost")
                    noticed = time.monotonic() - frozen
                finally:
                    os.kill(server.proc.pid, signal.SIGCONT)
                assert NBD_TIMEOUT - 1 < noticed < NBD_TIMEOUT + 5, noticed
                wait_ready(client, "vm.raw", timeout=60)
                stats = writer.stop()
                names = [e["event"] for e in client.poll_events(0.05)]
                assert "MIRROR_TARGET_LOST" in names and "MIRROR_TARGET_RESTORED" in names, names
            print(f"{copy_mode}: lost after {noticed:.1f} s; writer {stats['writes']} writes, "
                  f"max pwrite {stats['max_latency']:.2f} s, slow (>1 s): {stats['slow']}")
            assert stats["errors"] == [] and stats["writes"] > 20, stats
            if copy_mode == "background":
                assert stats["max_latency"] < 2.0 and stats["slow"] == [], stats
            else:
                # one write waited for the target, no longer than the timeout (plus scheduling)
                assert len(stats["slow"]) == 1, stats["slow"]
                assert NBD_TIMEOUT - 2 < stats["max_latency"] < NBD_TIMEOUT + 2, stats
            mount.cli("complete", mount.mountpoint, "vm.raw", "--no-pivot")
            assert_identical(source, served)
        finally:
            if writer is not None:
                writer.kill()
            if server.proc is not None and server.proc.poll() is None:
                os.kill(server.proc.pid, signal.SIGCONT)
            mount.unmount()


def _inspect(bitmap: Path) -> tuple[int, dict[str, Any]]:
    r = mirrorfs_cli("bitmap", "inspect", bitmap, "--json", check=False)
    assert r.returncode in (0, 1), r.stderr
    return r.returncode, json.loads(r.stdout)


def _sigkill_mount(mount: Any) -> None:
    os.kill(mount.pid, signal.SIGKILL)
    wait_for(lambda: not process_alive(mount.pid), 10, "the mount process to die")
    subprocess.run(["fusermount3", "-u", "-z", str(mount.mountpoint)], check=True, capture_output=True)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_sigkill_mid_replication_then_resync_dirty(mount_factory: Any, tmp_path: Path) -> None:
    size = 64 * MiB
    buf = 1 * MiB
    mount = mount_factory()
    mount.allow_log(r"WARNING")
    source = mount.source / "vm.raw"
    make_image(source, size)
    served = tmp_path / "served.raw"
    make_blank(served, size)
    bitmap = tmp_path / "vm.bitmap"
    writer = None
    with qemu_nbd(served, transport="unix") as server:
        try:
            # slow enough that the kill lands in the middle of the copy
            speed = 8 * MiB
            mount.cli("mirror", mount.mountpoint, "vm.raw", server.uri, "--bitmap", bitmap,
                      "--speed", str(speed), "--buf-size", str(buf))
            with qmp(mount) as client:
                # writes confined to the first 4 MiB, so the rest shows what the copy committed
                writer = Writer(mount.mountpoint / "vm.raw", tmp_path, seed=3, span=4 * MiB)
                job = wait_job(client, "vm.raw", lambda j: j["offset"] > size * 3 // 4, 60,
                               "three quarters copied")
                assert not job["ready"]
                copied = job["offset"]
            # the writer is still running: the kill lands under its writes
            assert writer.proc.poll() is None
            _sigkill_mount(mount)
            writer.kill()  # its writes now fail (the mount is gone): its errors are expected
            code, info = _inspect(bitmap)
            assert code == 1 and info["dirty-bytes"] > 0 and not info["clean-shutdown"], info
            dirty = info["dirty-bytes"]
            # the copy commits its progress every second (COMMIT_INTERVAL): what it had copied a
            # second or two before the kill (a loaded machine), minus the writer's span, is clean
            # in the file; without those commits every bit would still be set
            assert dirty <= size - copied + 2 * speed + 4 * MiB + 2 * buf < size, (dirty, copied)

            mount.start()
            mount.cli("mirror", mount.mountpoint, "vm.raw", server.uri, "--sync", "dirty",
                      "--bitmap", bitmap, "--buf-size", str(buf))
            with qmp(mount) as client:
                wait_ready(client, "vm.raw")
            job = json.loads(mount.cli("status", mount.mountpoint, "--json").stdout)[0]
            sent = job["__org.mirrorfs_copied-bytes"] + job["__org.mirrorfs_zeroed-bytes"]
            print(f"dirty after the crash {dirty} bytes of {size}; resync sent {sent}")
            assert 0 < sent <= dirty + buf, (sent, dirty)
            mount.cli("complete", mount.mountpoint, "vm.raw", "--no-pivot")
            assert_identical(source, served)

            # the management-crash decision: a completed copy then SIGKILL reads as ended with
            # nothing dirty (the target equalled the source when the job ended); the ended
            # bitmap resumes only as a verified resync
            mount.cli("mirror", mount.mountpoint, "vm.raw", server.uri, "--sync", "dirty",
                      "--bitmap", bitmap, "--verify-resync")
            with qmp(mount) as client:
                wait_ready(client, "vm.raw")
            with open(mount.mountpoint / "vm.raw", "r+b", buffering=0) as f:
                f.seek(5 * MiB + 123)
                f.write(os.urandom(200_000))
            with qmp(mount) as client:
                wait_ready(client, "vm.raw")
            mount.cli("complete", mount.mountpoint, "vm.raw", "--no-pivot")
            _sigkill_mount(mount)
            code, info = _inspect(bitmap)
            assert code == 1 and info["dirty-bytes"] == 0 and not info["pivoted"], info
            assert info["ended"] and info["ended-at"], info
            assert_identical(source, served)
        finally:
            if writer is not None:
                writer.kill()
            mount.close()


def test_server_back_with_another_size_is_refused(mount_factory: Any, tmp_path: Path) -> None:
    """A server that returns exporting something else is not written to: the job fails."""
    size = 4 * MiB
    mount = mount_factory()
    mount.allow_log(r"WARNING")
    make_image(mount.source / "vm.raw", size)
    served = tmp_path / "served.raw"
    make_blank(served, size)
    with qemu_nbd(served, transport="unix") as server:
        try:
            with qmp(mount) as client:
                mount.cli("mirror", mount.mountpoint, "vm.raw", server.uri)
                wait_ready(client, "vm.raw")
                server.kill()
                with open(served, "r+b") as f:
                    f.truncate(size + MiB)  # the far side now serves a bigger disk
                before = served.read_bytes()
                with open(mount.mountpoint / "vm.raw", "r+b", buffering=0) as f:
                    f.write(b"x" * 4096)  # noticed at this write's duplicate
                wait_job(client, "vm.raw", lambda j: not j["__org.mirrorfs_target-connected"], 15, "the loss")
                server.start()
                job = wait_job(client, "vm.raw", lambda j: j["status"] == "concluded", 30, "the job to fail")
                assert "refusing to write to a different export" in job["error"], job
                assert job["io-status"] == "failed" and not job["ready"], job
                names = [e["event"] for e in client.poll_events(0.1)]
                assert "MIRROR_TARGET_LOST" in names and "MIRROR_TARGET_RESTORED" not in names, names
                assert names[-1] == "BLOCK_JOB_COMPLETED" and "BLOCK_JOB_ERROR" in names, names
            server.stop()
            assert served.read_bytes() == before  # not written to
        finally:
            mount.unmount()
