"""Two jobs on one image, one target lost and restored three times: the other stalls nothing.

A writer process writes random 4 KiB blocks through the mount, with an fsync every 32 writes,
while the image has two ready write-blocking jobs: one to a local file, one to a qemu-nbd export.
The NBD server is SIGKILLed, stays away a few seconds and is restarted, three times. Throughout:

- the local job stays ready: among the QMP events none is about it after its first
  ``BLOCK_JOB_READY`` (no status change, no lost target), and it keeps receiving the writer's
  duplicates during every outage (its duplicated bytes grow while the server is away);
- the writer sees no error and no write or fsync as slow as the NBD reply timeout;
- the NBD job notices each loss, and becomes ready again by itself after each restart.

At the end both jobs complete without pivot in one transaction and both targets equal the image.

The second test migrates the disk while the replica's server is away: the pivot goes through,
and the replica catches up from its journal and bitmap without a resync.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from compare import assert_identical
from nbdservers import qemu_nbd
from test_replication_support import (NBD_TIMEOUT, Writer, outage_mount, qmp, wait_job,
                                      wait_ready)

MiB = 1 << 20


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_lost_target_stalls_neither_the_other_job_nor_the_writer(mount_factory: Any,
                                                                    tmp_path: Path) -> None:
    mount, source, served = outage_mount(mount_factory, tmp_path, 16 * MiB)
    local = tmp_path / "local.raw"
    writer = None
    with qemu_nbd(served, transport="unix") as server:
        try:
            m = mount.mountpoint
            mount.cli("mirror", m, "vm.raw", local, "--create", "--job-id", "local",
                      "--copy-mode", "write-blocking")
            mount.cli("mirror", m, "vm.raw", server.uri, "--job-id", "remote",
                      "--copy-mode", "write-blocking")
            with qmp(mount) as client:
                wait_ready(client, "local")
                wait_ready(client, "remote")
                events: list[dict[str, Any]] = client.poll_events(0.05)
                writer = Writer(m / "vm.raw", tmp_path, seed=11, fsync_every=32)
                for cycle in range(3):
                    dup = wait_job(client, "remote", lambda j: True, 5, "job")["__org.mirrorfs_duplicated-bytes"]
                    wait_job(client, "remote", lambda j: j["__org.mirrorfs_duplicated-bytes"] > dup + 64 * 1024,
                             30, f"writes reaching the NBD target before outage {cycle}")
                    server.kill()
                    away = time.monotonic()
                    wait_job(client, "remote", lambda j: not j["__org.mirrorfs_target-connected"],
                             NBD_TIMEOUT + 5, f"the loss to be noticed (outage {cycle})")
                    local_dup = wait_job(client, "local", lambda j: True, 5, "local job")
                    # the server stays away; the local target keeps getting every write
                    wait_job(client, "local",
                             lambda j: (j["__org.mirrorfs_duplicated-bytes"]
                                        > local_dup["__org.mirrorfs_duplicated-bytes"] + 256 * 1024
                                        and time.monotonic() - away > 3.0),
                             30, f"the local job duplicating during outage {cycle}")
                    entry = wait_job(client, "local", lambda j: True, 5, "local job")
                    assert entry["ready"] and entry["status"] == "ready", entry
                    assert writer.proc.poll() is None, "the writer died during the outage"
                    server.start()
                    back = wait_ready(client, "remote", timeout=60)
                    assert back["__org.mirrorfs_target-connected"], back
                    events += client.poll_events(0.05)
                stats = writer.stop()
                events += client.poll_events(0.05)
                wait_ready(client, "remote")
                local_events = [e for e in events if e.get("data", {}).get("device") == "local"]
                assert local_events == [], local_events  # never left ready, never lost anything
                names = [e["event"] for e in events if e.get("data", {}).get("device") == "remote"]
                assert names.count("MIRROR_TARGET_LOST") == 3, names
                assert names.count("MIRROR_TARGET_RESTORED") == 3, names
                # ready again by itself after each restart
                assert names[names.index("MIRROR_TARGET_LOST"):].count("BLOCK_JOB_READY") == 3, names
            print(f"writer: {stats['writes']} writes, max pwrite {stats['max_latency'] * 1000:.0f} ms, "
                  f"max fsync {stats['max_fsync_latency'] * 1000:.0f} ms")
            assert stats["errors"] == [], stats["errors"][:5]
            assert stats["writes"] > 300 and stats["fsyncs"] > 0, stats
            assert stats["max_latency"] < NBD_TIMEOUT and stats["max_fsync_latency"] < NBD_TIMEOUT, stats
            mount.cli("complete", m, "local", "remote", "--no-pivot")  # one transaction
            assert_identical(source, local)
            assert_identical(source, served)
        finally:
            if writer is not None:
                writer.kill()
            mount.unmount()


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_migration_while_the_replicas_server_is_away_needs_no_resync(mount_factory: Any,
                                                                      tmp_path: Path) -> None:
    """The disaster-recovery server is down when the disk must move: the migration pivots
    anyway, the replica journals what it misses, and once the server is back it catches up with
    only those writes (the writer touches the first MiB of a 64 MiB image: a resync would copy
    all of it), onto a replica identical to the new storage."""
    mount, source, served = outage_mount(mount_factory, tmp_path, 64 * MiB)
    (tmp_path / "new").mkdir()
    new = tmp_path / "new" / "vm.raw"
    span = 1 * MiB
    writer = None
    with qemu_nbd(served, transport="unix") as server:
        try:
            m = mount.mountpoint
            mount.cli("mirror", m, "vm.raw", server.uri, "--job-id", "replica",
                      "--copy-mode", "write-blocking", "--bitmap", tmp_path / "replica.bitmap")
            mount.cli("mirror", m, "vm.raw", new, "--create", "--job-id", "move")
            with qmp(mount) as client:
                wait_ready(client, "replica")
                wait_ready(client, "move")
                writer = Writer(m / "vm.raw", tmp_path, seed=12, span=span, fsync_every=16)
                before = wait_job(client, "replica", lambda j: True, 5, "replica")
                server.kill()
                wait_job(client, "replica", lambda j: not j["__org.mirrorfs_target-connected"],
                         NBD_TIMEOUT + 5, "the loss to be noticed")
                time.sleep(0.5)
                mount.cli("complete", m, "move")  # the pivot, with the replica away
                at_pivot = source.read_bytes()
                time.sleep(1.0)
                assert source.read_bytes() == at_pivot, "the old storage got writes after the pivot"
                server.start()
                back = wait_ready(client, "replica", timeout=60)
                stats = writer.stop()
                back = wait_ready(client, "replica")
            assert stats["errors"] == [], stats["errors"][:5]
            copied = sum(back[k] - before[k] for k in ("__org.mirrorfs_copied-bytes",
                                                       "__org.mirrorfs_zeroed-bytes"))
            # A cluster the writer hits again while it is being copied is copied again: a few
            # times the span, not the 64 MiB of a resync.
            print(f"replica after the pivot: {copied} bytes copied, "
                  f"{back['__org.mirrorfs_replayed-records'] - before['__org.mirrorfs_replayed-records']}"
                  f" journal records replayed; writer: {stats['writes']} writes")
            assert copied <= 4 * span, f"the replica copied {copied} bytes after the pivot: a resync"
            assert back["__org.mirrorfs_replayed-records"] > before["__org.mirrorfs_replayed-records"]
            mount.cli("complete", m, "replica", "--no-pivot")
            assert_identical(new, served)
            assert_identical(m / "vm.raw", new)
        finally:
            if writer is not None:
                writer.kill()
            mount.unmount()
