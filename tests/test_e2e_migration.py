"""Issue 7: live migration of a running QEMU guest's disk, end to end.

An unmodified ``qemu-system-x86_64`` boots the test guest with its disk on ``MOUNT/vm.IMG``;
the guest's writer puts self-checking, sequence-numbered 4 KiB records on it, one at a time.
While it writes, ``mirrorfs mirror`` copies the image to a target in another directory (or to
a qemu-nbd server), ``mirrorfs status --json`` is polled until the job is ready, and
``mirrorfs complete`` pivots the image to the target under the running guest. The guest writes
on, then is stopped. Then:

- the TARGET holds one unbroken run of records ``1 .. last`` (the writer's own last), which
  includes records written after the pivot (host-side verifier);
- the SOURCE holds exactly the records up to the switch: ``1 .. N`` of the same run, byte for
  byte the same as the target's first N, then only zeroes; N lies between the writer's progress
  seen before ``complete`` started and its first progress report after ``complete`` returned,
  and N < last (the records written after the pivot are absent);
- a verifying guest booted on the target reports ``VERIFY ok`` with every record.

Cases (Done when 1): raw with cache=none, raw with cache=writeback, qcow2 with cache=none, and a
raw image and a fully preallocated qcow2 (an NBD export cannot grow) mirrored to qemu-nbd on a
UNIX socket whose server is SIGKILLed and restarted during the copy (the job goes lost →
restored → ready on its own, seen as QMP events); after the pivot the guest's I/O goes to the
NBD server through the mount.

The writer is slowed with ``interval_us`` so that the disk does not fill before the end.
For qcow2 the writer opens with O_DSYNC (``sync=1``): QEMU keeps qcow2 L2 tables in its own
cache until a flush, so without flushes the source's metadata at the switch would lag behind
its data and "the source holds the records up to the switch" could not be checked exactly.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Callable

import pytest

from guest.build import build
from guest.pivotcheck import check_pivot
from guest.records import verify_file
from guest.vm import GuestVM, verify_in_guest
from mirrorfs.control.qmp_client import QMPClient
from mounting import Mount, wait_for
from nbdservers import qemu_nbd

pytestmark = [pytest.mark.guest, pytest.mark.slow, pytest.mark.timeout(150)]

MiB = 1 << 20
DISK_SIZE = 64 * MiB
#: Pause after each guest record: ~300-400 records/s through the mount, well below a full disk.
INTERVAL_US = 2000


@pytest.fixture(scope="module")
def guest_image():
    """The guest kernel and initramfs (built once, then cached in .cache/guest)."""
    return build()


# ---------------------------------------------------------------------------- helpers

def job_entry(mount: Mount, device: str) -> dict[str, Any] | None:
    """The job's ``mirrorfs status --json`` entry, or None when there is no such job."""
    jobs = json.loads(mount.cli("status", mount.mountpoint, "--json").stdout)
    return next((j for j in jobs if j["device"] == device), None)


def wait_job(mount: Mount, device: str, pred: Callable[[dict[str, Any]], bool], what: str,
             timeout: float = 60.0) -> dict[str, Any]:
    """Poll ``status --json`` until the job's entry satisfies ``pred``; return it."""
    seen: list[dict[str, Any] | None] = [None]

    def check() -> bool:
        seen[0] = job_entry(mount, device)
        return seen[0] is not None and pred(seen[0])

    try:
        wait_for(check, timeout, f"{device}: {what}", interval=0.1)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; last status: {seen[0]}\n"
                             f"log tail:\n{mount.read_log()[-3000:]}") from None
    assert seen[0] is not None
    return seen[0]


def progress_after(vm: GuestVM, mark: int, timeout: float = 30.0) -> int:
    """The first writer progress report printed after console offset ``mark``."""
    found: list[int] = []

    def check() -> bool:
        m = re.search(r"WRITER progress seq=(\d+)", vm.console()[mark:])
        if m:
            found.append(int(m.group(1)))
        return bool(found)

    wait_for(check, timeout, "a writer progress report", interval=0.05)
    return found[0]


def to_raw(image: Path, fmt: str, out: Path) -> Path:
    """``image`` itself when raw, else a raw copy made by ``qemu-img convert``."""
    if fmt == "raw":
        return image
    subprocess.run(["qemu-img", "convert", "-U", "-f", fmt, "-O", "raw", str(image), str(out)],
                   check=True, capture_output=True, timeout=120)
    return out


# ---------------------------------------------------------------------------- the test

CASES = [
    pytest.param("raw", "none", "local", id="raw-cache-none"),
    pytest.param("raw", "writeback", "local", id="raw-cache-writeback"),
    pytest.param("qcow2", "none", "local", id="qcow2-cache-none"),
    pytest.param("raw", "none", "nbd", id="raw-nbd-server-restarted"),
    pytest.param("qcow2", "none", "nbd", id="qcow2-preallocated-nbd-server-restarted"),
]


@pytest.mark.parametrize("fmt, cache, kind", CASES)
def test_live_migration_of_a_running_guest(tmp_path: Path, mount_factory: Any, guest_image: Any,
                                           fmt: str, cache: str, kind: str) -> None:
    t0 = time.monotonic()
    mount = mount_factory()
    image = f"vm.{fmt}"
    disk = mount.mountpoint / image
    source = mount.source / image
    # Created through the mount, as a user would.
    # An NBD export has a fixed size: a qcow2 for one is fully preallocated, so it never grows.
    prealloc = ["-o", "preallocation=full"] if fmt == "qcow2" and kind == "nbd" else []
    subprocess.run(["qemu-img", "create", "-q", "-f", fmt, *prealloc, str(disk), str(DISK_SIZE)],
                   check=True)
    params: dict[str, object] = {"interval_us": INTERVAL_US}
    if fmt == "qcow2":
        params["sync"] = 1

    with ExitStack() as stack:
        events: list[dict[str, Any]] = []
        if kind == "nbd":
            mount.allow_log(r"WARNING")  # a lost target is logged as a warning, by design
            served = tmp_path / "served.raw"
            with open(served, "wb") as f:
                f.truncate(source.stat().st_size)
            server = stack.enter_context(qemu_nbd(served, transport="unix"))
            target, target_arg = served, server.uri
            client = stack.enter_context(QMPClient.connect(
                (mount.control / "socket").read_text().strip(), timeout=30))
        else:
            (tmp_path / "elsewhere").mkdir()
            target = tmp_path / "elsewhere" / image
            target_arg = str(target)

        vm = stack.enter_context(GuestVM(disk, mode="writer", workdir=tmp_path / "writer",
                                         fmt=fmt, cache=cache, image=guest_image, params=params))
        vm.wait_ready(timeout=60)
        vm.wait_for_records(200, timeout=60)

        if kind == "nbd":
            # Slow copy, so that the server can be killed while the copy is under way: the image
            # holds 3-4 MiB of data (its zeroes go as zero writes), so 1M gives a window of
            # seconds; at 8M it was under half a second, shorter than a poll could be.
            mount.cli("mirror", mount.mountpoint, image, target_arg, "--speed", "1M")
            wait_job(mount, image, lambda j: 0 < j["offset"] < j["len"] and not j["ready"],
                     "copy under way", timeout=30)
            server.kill()
            lost = wait_job(mount, image, lambda j: not j["__org.mirrorfs_target-connected"],
                            "the loss to be noticed", timeout=30)
            assert lost["status"] == "running" and not lost["ready"], lost
            vm.wait_for_records(vm.writer_progress() + 100, timeout=30)  # writes go on meanwhile
            server.start()
            mount.cli("set-speed", mount.mountpoint, image, "0")
        else:
            mount.cli("mirror", mount.mountpoint, image, target_arg, "--create")

        ready = wait_job(mount, image, lambda j: j["ready"], "ready", timeout=60)
        # (offset may lag len again at once: the guest's writes go on)
        assert ready["status"] == "ready" and ready["io-status"] == "ok", ready
        assert vm.proc.poll() is None and "WRITER full" not in vm.console(), vm.console()[-500:]
        if kind == "nbd":
            events = client.poll_events(0.2)
            order = [e["event"] for e in events if e["event"] in
                     ("MIRROR_TARGET_LOST", "MIRROR_TARGET_RESTORED", "BLOCK_JOB_READY")]
            assert order == ["MIRROR_TARGET_LOST", "MIRROR_TARGET_RESTORED", "BLOCK_JOB_READY"], order
            assert not [e for e in events if e["event"] == "BLOCK_JOB_ERROR"], events

        # The switch, while the guest keeps writing.
        before = vm.writer_progress()
        mount.cli("complete", mount.mountpoint, image)
        mark = len(vm.console())
        upper = progress_after(vm, mark)
        assert job_entry(mount, image) is None, "the job must be gone after complete"
        vm.wait_for_records(upper + 300, timeout=60)  # let it write on, on the target
        result = vm.stop_writer(timeout=60)
        assert result.run_id == vm.run_id and result.stopped_by == "stop", result
        if kind == "nbd":
            events += client.poll_events(0.2)
            assert "BLOCK_JOB_COMPLETED" in [e["event"] for e in events], events

        src_raw = to_raw(source, fmt, tmp_path / "source-as-raw")
        tgt_raw = to_raw(target, fmt, tmp_path / "target-as-raw")
        # The target: every record, those after the pivot included; the source: exactly the
        # records up to the switch, the same bytes, and nothing after.
        n = check_pivot(src_raw, tgt_raw, last=result.last, run_id=result.run_id,
                        within=(before, upper)).switch
        assert n < result.last - 250, f"source has {n} of {result.last}: post-pivot records leaked"
        if fmt == "raw":
            # The mount now serves the target under the image's name.
            assert verify_file(disk).last == result.last
        print(f"{fmt} cache={cache} {kind}: switch at seq {n} (progress {before}..{upper}), "
              f"{result.last} records in all, {time.monotonic() - t0:.1f} s to here")

        if kind == "nbd":
            mount.unmount()   # drops the forwarded connection to the server
            server.stop()     # releases qemu-nbd's image lock for the verifying guest

    # A verifying guest, booted on the target: every record intact, unbroken.
    check = verify_in_guest(target, workdir=tmp_path / "verify", fmt=fmt, cache="none",
                            image=guest_image)
    assert (check.records, check.first, check.last, check.run_id) == (
        result.last, 1, result.last, result.run_id)
    print(f"VERIFY ok records={check.records}; case took {time.monotonic() - t0:.1f} s")
