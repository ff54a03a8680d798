"""A running guest's standing replica survives a migration of its disk (several jobs, end to end).

An unmodified ``qemu-system-x86_64`` runs the test guest's record writer (raw, ``cache=none``) on
``MOUNT/vm.raw`` of a mount with a state directory. Meanwhile:

- a persistent, write-blocking job ``replica`` mirrors the image to a qemu-nbd export (a file
  the test owns) and becomes ready;
- a second job ``move`` mirrors it to a file in another directory, becomes ready, and
  ``mirrorfs complete MOUNT move`` pivots the image to that file while the guest writes;
- the guest writes on, then is stopped, and ``complete MOUNT replica --no-pivot`` ends the
  replica.

``move`` runs in the default background mode, as a migration that should not slow the guest
would: the guest then waits only for the replica's target, and the pivot itself has to drain
the move's outstanding copies while the guest writes.

Checks:

- the replica never leaves ready: ``.mirrorfs/status.json``, polled from before the second job
  started to the end, always shows it ready with its target connected, and the QMP events of
  that time hold none for it (they also catch a blip between two samples);
- no resync: what the replica copied (zeroes included) after the pivot is no more than what the
  guest wrote after it, and it got at least those bytes as duplicates;
- the export, the new storage and the guest's view through the mount are byte-identical and
  hold one unbroken run of the writer's records, those written after the pivot included; the
  old storage holds only the records up to the pivot; a verifying guest booted on the export
  reports every record.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from guest.pivotcheck import check_pivot
from guest.records import RECORD_SIZE, verify_file
from guest.vm import GuestVM, verify_in_guest
from mirrorfs.control.qmp_client import QMPClient
from mounting import Mount
from nbdservers import qemu_nbd
# The e2e test's guest, disk size and writer pace (its fixture, imported, is this module's too).
from test_e2e_migration import (DISK_SIZE, INTERVAL_US, guest_image, job_entry,  # noqa: F401
                                progress_after, wait_job)
from test_mirror_mount import sha

pytestmark = [pytest.mark.guest, pytest.mark.slow, pytest.mark.timeout(300)]


class StatusPoller:
    """Reads ``.mirrorfs/status.json`` in a thread until stopped; keeps every sample of one job
    (None where it was missing) with the time it was taken."""

    def __init__(self, mount: Mount, device: str, interval: float = 0.02) -> None:
        self.path = mount.control / "status.json"
        self.device = device
        self.interval = interval
        self.samples: list[tuple[float, dict[str, Any] | None]] = []
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"poll {device}", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                listed = json.loads(self.path.read_text())
            except (OSError, ValueError) as exc:
                self.errors.append(exc)
                return
            entry = next((j for j in listed if j["device"] == self.device), None)
            self.samples.append((time.monotonic(), entry))
            self._stop.wait(self.interval)

    def __enter__(self) -> StatusPoller:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def not_ready(self) -> list[tuple[float, dict[str, Any] | None]]:
        """The samples in which the job was missing or not ready, or its target was away."""
        return [(t, e) for t, e in self.samples
                if e is None or not e["ready"] or e["status"] != "ready"
                or e["io-status"] != "ok" or not e["__org.mirrorfs_target-connected"]]

    def growth(self, key: str, since: float) -> list[tuple[float, int]]:
        """When ``key`` of the job grew, and by how much: ``(seconds after since, bytes)``."""
        grew, last = [], None
        for t, entry in self.samples:
            if entry is None:
                continue
            if last is not None and entry[key] > last:
                grew.append((round(t - since, 2), entry[key] - last))
            last = entry[key]
        return grew

    def during(self, start: float, end: float) -> int:
        """How many samples were taken between ``start`` and ``end``."""
        return sum(1 for t, _ in self.samples if start <= t <= end)


def job_events(events: list[dict[str, Any]]) -> dict[str, list[str]]:
    """The events' names by the job they concern."""
    named: dict[str, list[str]] = {}
    for ev in events:
        data = ev.get("data", {})
        job = data.get("device", data.get("id"))
        if job is not None:
            named.setdefault(job, []).append(ev["event"])
    return named


def test_a_standing_replica_survives_a_migration_under_a_running_guest(
        tmp_path: Path, mount_factory: Any, guest_image: Any) -> None:  # noqa: F811
    t0 = time.monotonic()
    state = tmp_path / "state"
    mount = mount_factory(extra_args=["--state-dir", str(state)])
    mount.allow_log(r"WARNING")  # an NBD target that is slow to answer is a warning, by design
    disk = mount.mountpoint / "vm.raw"
    old_storage = mount.source / "vm.raw"
    (tmp_path / "elsewhere").mkdir()
    new_storage = tmp_path / "elsewhere" / "vm.raw"
    export = tmp_path / "export.raw"
    # Created through the mount, as a user would.
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(disk), str(DISK_SIZE)],
                   check=True)
    with open(export, "wb") as f:
        f.truncate(DISK_SIZE)

    with qemu_nbd(export) as server, \
            GuestVM(disk, mode="writer", workdir=tmp_path / "writer", fmt="raw", cache="none",
                    image=guest_image, params={"interval_us": INTERVAL_US}) as vm:
        vm.wait_ready(timeout=60)
        vm.wait_for_records(200, timeout=60)

        mount.cli("mirror", mount.mountpoint, "vm.raw", server.uri, "--persistent",
                  "--job-id", "replica", "--copy-mode", "write-blocking")
        assert json.loads((state / "job-replica.json").read_text())["target"] == server.uri
        wait_job(mount, "replica", lambda j: j["ready"], "the replica ready", timeout=120)

        # Events catch what polling may miss: a blip out of ready between two samples.
        with StatusPoller(mount, "replica") as poller, QMPClient.connect(
                (mount.control / "socket").read_text().strip(), timeout=30) as client:
            mount.cli("mirror", mount.mountpoint, "vm.raw", new_storage, "--create",
                      "--job-id", "move")
            moving = wait_job(mount, "move", lambda j: j["ready"], "the move ready",
                              timeout=120)
            assert moving["copy-mode"] == "background", moving
            vm.wait_for_records(vm.writer_progress() + 100, timeout=60)  # both jobs ready

            # The migration's switch, while the guest keeps writing.
            before_entry = job_entry(mount, "replica")
            assert before_entry is not None, "the replica is gone before the pivot"
            before = vm.writer_progress()
            started = time.monotonic()
            mount.cli("complete", mount.mountpoint, "move")
            returned = time.monotonic()
            mark = len(vm.console())
            upper = progress_after(vm, mark)
            assert job_entry(mount, "move") is None, "the move job must be gone after complete"
            vm.wait_for_records(upper + 300, timeout=60)  # on the new storage now
            result = vm.stop_writer(timeout=60)
            assert result.run_id == vm.run_id and result.stopped_by == "stop", result
            after_entry = job_entry(mount, "replica")
            assert after_entry is not None, "the replica is gone after the guest stopped"
            events = client.poll_events(0.2)

        by_job = job_events(events)
        moved = by_job.get("move", [])
        assert "BLOCK_JOB_READY" in moved and "BLOCK_JOB_COMPLETED" in moved, events  # heard
        assert "replica" not in by_job, f"the replica had events after it was ready: {events}"

        assert not poller.errors, poller.errors
        assert poller.during(t0, started) > 10 and poller.during(returned, time.monotonic()) > 10, (
            f"too few status samples: {len(poller.samples)} in all")
        left = poller.not_ready()
        assert not left, (f"the replica left ready in {len(left)} of {len(poller.samples)} "
                          f"samples (complete ran {started - t0:.2f}..{returned - t0:.2f} s); "
                          f"first: {left[0][0] - t0:.2f} s {left[0][1]}\n"
                          f"log tail:\n{mount.read_log()[-3000:]}")

        # Where the switch fell, and that the old storage holds nothing after it.
        pivot = check_pivot(old_storage, new_storage, last=result.last, run_id=result.run_id,
                            within=(before, upper))
        assert pivot.switch < result.last - 250, (
            f"old storage has {pivot.switch} of {result.last} records: post-pivot records leaked")

        # No resync: what the replica copied after the pivot is bounded by what the guest wrote
        # after it (ideally nothing: the guest's writes reach it as duplicates). Zeroed bytes
        # count as copied: a resync of this mostly empty disk is mostly zeroes.
        written_after = pivot.after * RECORD_SIZE

        def grown(key: str) -> int:
            return after_entry[f"__org.mirrorfs_{key}"] - before_entry[f"__org.mirrorfs_{key}"]

        copied = grown("copied-bytes") + grown("zeroed-bytes")
        duplicated = grown("duplicated-bytes")
        assert copied <= written_after, (
            f"the replica copied {copied} bytes (zeroes included) after the pivot, more than "
            f"the {written_after} the guest wrote after it: a resync; before {before_entry}, "
            f"after {after_entry}")
        assert duplicated >= written_after, (
            f"the replica got {duplicated} bytes of duplicates since before the pivot, fewer than "
            f"the {written_after} the guest wrote after it; after {after_entry}")

        mount.cli("complete", mount.mountpoint, "replica", "--no-pivot")
        assert job_entry(mount, "replica") is None, "the replica must be gone after complete"
        assert not (state / "job-replica.json").exists(), "complete must end the persistent job"

        views = {"the NBD export": export, "the new storage": new_storage,
                 "the guest's view": disk}
        digests = {name: sha(path) for name, path in views.items()}
        assert len(set(digests.values())) == 1, f"not identical: {digests}"
        run = verify_file(export)
        assert (run.first, run.last, run.run_id) == (1, result.last, result.run_id), (
            f"the export holds records {run.first}..{run.last} of run {run.run_id}, the writer "
            f"wrote 1..{result.last} of run {result.run_id}")
        print(f"switch at seq {pivot.switch} (progress {before}..{upper}), {result.last} records "
              f"in all; replica after the pivot: copied {copied}, duplicated {duplicated} bytes; "
              f"{len(poller.samples)} status samples ({poller.during(started, returned)} during "
              f"complete, {returned - started:.2f} s); {time.monotonic() - t0:.1f} s to here; "
              f"copied/zeroed grew at (s after complete started, bytes): "
              f"{poller.growth('__org.mirrorfs_copied-bytes', started)} / "
              f"{poller.growth('__org.mirrorfs_zeroed-bytes', started)}")

        mount.unmount()  # drops the connection to the server
        server.stop()    # releases qemu-nbd's image lock for the verifying guest

    check = verify_in_guest(export, workdir=tmp_path / "verify", fmt="raw", cache="none",
                            image=guest_image)
    assert (check.records, check.first, check.last, check.run_id) == (
        result.last, 1, result.last, result.run_id), check
    print(f"VERIFY ok records={check.records}; took {time.monotonic() - t0:.1f} s")
