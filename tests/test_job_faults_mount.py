"""Faults inside one job, through a real mount: that job fails or pauses, the mount goes on.

The faulty source is real: ``qemu-storage-daemon`` exports a ``blkdebug`` node over a raw file as
a FUSE file in the source directory, failing reads (or writes) of one sector with EIO. Each test
checks that the job on that image ends as its ``on-source-error`` says, with the reason in
``query-block-jobs`` and the events; that the guest's own request on the bad sector gets EIO; and
that the other images of the same mount, and a job on one of them, carry on (bytes verified).
The engine-level counterparts (every kind of task, the races of a job's end) are in
tests/test_job_containment.py.
"""

from __future__ import annotations

import errno
import json
import mmap
import os
from pathlib import Path
from typing import Any, Iterator

import pytest

from compare import assert_identical
from mounting import Mount, qsd_fuse_export
from test_replication_support import make_image, qmp, wait_job, wait_ready

MiB = 1 << 20
SIZE = 4 * MiB
#: the sector the faulty image fails (blkdebug counts 512-byte sectors): 1 MiB
BAD_OFFSET = MiB


def _faulty_blockdev(backing: Path, iotype: str) -> str:
    return json.dumps({
        "driver": "blkdebug", "node-name": "n",
        "image": {"driver": "file", "filename": str(backing)},
        "inject-error": [{"event": "none", "iotype": iotype, "errno": errno.EIO,
                          "sector": BAD_OFFSET // 512}],
    })


@pytest.fixture(params=["read", "write"])
def faulty_source(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """A source directory with ``ok.raw`` (a plain file) and ``bad.raw`` (whose sector at 1 MiB
    fails reads or writes, by the parameter); yields it and the file behind ``bad.raw``."""
    source = tmp_path / "faulty-source"
    source.mkdir()
    make_image(source / "ok.raw", SIZE)
    backing = tmp_path / "bad-backing.raw"
    make_image(backing, SIZE)
    (source / "bad.raw").touch()
    with qsd_fuse_export(_faulty_blockdev(backing, request.param), source / "bad.raw", writable=True):
        yield source, backing


def _direct_io(path: Path, offset: int, data: bytes | None = None) -> bytes | int:
    """One O_DIRECT read (4 KiB) or write at ``offset``: the error is the request's own."""
    fd = os.open(path, os.O_RDWR | os.O_DIRECT)
    try:
        buf = mmap.mmap(-1, 4096)
        if data is None:
            os.preadv(fd, [buf], offset)
            return bytes(buf)
        buf[:] = data
        return os.pwritev(fd, [buf], offset)
    finally:
        os.close(fd)


def _events(client: Any, name: str) -> list[dict[str, Any]]:
    return [e["data"] for e in client.poll_events(0.1) if e["event"] == name]


def _assert_other_image_and_its_job_carry_on(mount: Mount, client: Any, target: Path) -> None:
    """ok.raw stays readable and writable through the mount, and its job completes exactly."""
    image = mount.mountpoint / "ok.raw"
    data = b"after the fault".ljust(4096, b"!")
    assert _direct_io(image, 2 * MiB, data) == 4096
    assert _direct_io(image, 2 * MiB) == data
    assert (mount.source / "ok.raw").read_bytes()[2 * MiB:2 * MiB + 4096] == data
    mount.cli("set-speed", mount.mountpoint, "ok.raw", "0")
    wait_ready(client, "ok.raw")
    mount.cli("complete", mount.mountpoint, "ok.raw", "--no-pivot")
    assert_identical(mount.source / "ok.raw", target)


@pytest.mark.parametrize("faulty_source", ["read"], indirect=True)
@pytest.mark.parametrize("policy", ["report", "stop"])
def test_a_source_read_error_during_the_copy_fails_or_pauses_that_job_only(
        faulty_source: tuple[Path, Path], mount_factory: Any, tmp_path: Path, policy: str) -> None:
    source, backing = faulty_source
    mount = mount_factory(source=source)
    mount.allow_log(r"WARNING")  # source errors are logged as warnings, as target errors
    ok_target = tmp_path / "ok-target.raw"
    with qmp(mount) as client:
        # slow, so that it is still copying when the other job meets the bad sector
        mount.cli("mirror", mount.mountpoint, "ok.raw", ok_target, "--create", "--speed", "1M")
        policy_args = [] if policy == "report" else ["--on-source-error", policy]  # report: default
        mount.cli("mirror", mount.mountpoint, "bad.raw", tmp_path / "bad-target.raw", "--create",
                  *policy_args)
        if policy == "report":
            job = wait_job(client, "bad.raw", lambda j: j["status"] == "concluded", 30, "the job to fail")
            assert "reading image 'bad.raw'" in job["error"] and "Input/output error" in job["error"], job
        else:
            job = wait_job(client, "bad.raw", lambda j: j["status"] == "paused", 30, "the job to pause")
            assert job["paused"] and "error" not in job, job
        assert job["io-status"] == "failed" and not job["ready"], job
        errors = _events(client, "BLOCK_JOB_ERROR")
        assert {"device": "bad.raw", "operation": "read", "action": policy} in errors, errors
        assert all(e["device"] == "bad.raw" for e in errors), errors
        ok_job = wait_job(client, "ok.raw", lambda j: True, 5, "ok.raw's job")
        assert ok_job["status"] in ("running", "ready") and ok_job["io-status"] == "ok", ok_job
        # the guest's own read of the bad sector gets the source's EIO; the rest reads fine
        with pytest.raises(OSError) as exc:
            _direct_io(mount.mountpoint / "bad.raw", BAD_OFFSET)
        assert exc.value.errno == errno.EIO
        assert _direct_io(mount.mountpoint / "bad.raw", 0) == backing.read_bytes()[:4096]
        _assert_other_image_and_its_job_carry_on(mount, client, ok_target)
        if policy == "stop":
            mount.cli("cancel", mount.mountpoint, "bad.raw")
            assert "bad.raw" not in {j["device"] for j in client.execute("query-block-jobs")}


@pytest.mark.parametrize("faulty_source", ["write"], indirect=True)
def test_source_write_errors_reach_the_writer_during_the_copy_and_the_duplicates(
        faulty_source: tuple[Path, Path], mount_factory: Any, tmp_path: Path) -> None:
    """A guest write the source refuses gets EIO, during the copy and once ready (when writes
    are duplicated); the job goes on and its copy is exact."""
    source, backing = faulty_source
    mount = mount_factory(source=source)
    image = mount.mountpoint / "bad.raw"
    target = tmp_path / "bad-target.raw"
    ok_target = tmp_path / "ok-target.raw"
    with qmp(mount) as client:
        mount.cli("mirror", mount.mountpoint, "ok.raw", ok_target, "--create", "--speed", "1M")
        mount.cli("mirror", mount.mountpoint, "bad.raw", target, "--create", "--speed", "1M")
        for phase in ("copy", "ready"):
            if phase == "ready":
                mount.cli("set-speed", mount.mountpoint, "bad.raw", "0")
                wait_ready(client, "bad.raw")
            with pytest.raises(OSError) as exc:
                _direct_io(image, BAD_OFFSET, b"refused".ljust(4096, b"-"))
            assert exc.value.errno == errno.EIO
            data = f"{phase} write".encode().ljust(4096, b"+")
            assert _direct_io(image, 3 * MiB, data) == 4096
            assert _direct_io(image, 3 * MiB) == data
            job = wait_job(client, "bad.raw", lambda j: True, 5, "bad.raw's job")
            assert job["io-status"] == "ok" and "error" not in job, job
        assert backing.read_bytes()[3 * MiB:3 * MiB + 4096] == b"ready write".ljust(4096, b"+")
        wait_ready(client, "bad.raw")
        mount.cli("complete", mount.mountpoint, "bad.raw", "--no-pivot")
        assert_identical(source / "bad.raw", target)
        _assert_other_image_and_its_job_carry_on(mount, client, ok_target)


@pytest.mark.parametrize("faulty_source", ["write"], indirect=True)
def test_a_refused_source_write_whose_duplicate_landed_stays_dirty_until_copied(
        faulty_source: tuple[Path, Path], mount_factory: Any, tmp_path: Path) -> None:
    """A ready write-blocking job writes the source and the target at once: where the source
    refuses the write and the target takes it, the guest gets EIO, the target holds bytes the
    source does not, and the cluster stays dirty, so the copy puts the source's bytes back."""
    source, backing = faulty_source
    mount = mount_factory(source=source)
    mount.allow_log(r"WARNING")
    image = mount.mountpoint / "bad.raw"
    target = tmp_path / "bad-target.raw"
    with qmp(mount) as client:
        mount.cli("mirror", mount.mountpoint, "bad.raw", target, "--create",
                  "--copy-mode", "write-blocking")
        wait_ready(client, "bad.raw")
        # Hold the copy back: writes made while paused stay dirty; copying them after the
        # resume spends the limiter's budget, and the copy pays for its second cluster
        # (after issuing it) by waiting ~16 s before it issues anything else.
        mount.cli("set-speed", mount.mountpoint, "bad.raw", "4K")
        mount.cli("pause", mount.mountpoint, "bad.raw")
        for offset in (2 * MiB, 3 * MiB):
            assert _direct_io(image, offset, b"paused".ljust(4096, b"p")) == 4096
        mount.cli("resume", mount.mountpoint, "bad.raw")
        wait_job(client, "bad.raw", lambda j: j["dirty-bytes"] == 0, 10, "the paused writes' copy")
        refused = b"refused".ljust(4096, b"-")
        with pytest.raises(OSError) as exc:
            _direct_io(image, BAD_OFFSET, refused)
        assert exc.value.errno == errno.EIO
        with open(target, "rb") as f:  # the duplicate was issued with the source write
            assert os.pread(f.fileno(), 4096, BAD_OFFSET) == refused
        job = wait_job(client, "bad.raw", lambda j: True, 5, "bad.raw's job")
        assert job["dirty-bytes"] > 0 and job["io-status"] == "ok" and "error" not in job, job
        assert backing.read_bytes()[BAD_OFFSET:BAD_OFFSET + 4096] != refused
        mount.cli("set-speed", mount.mountpoint, "bad.raw", "0")
        wait_job(client, "bad.raw", lambda j: j["dirty-bytes"] == 0, 10, "the copy of the cluster")
        mount.cli("complete", mount.mountpoint, "bad.raw", "--no-pivot")
        assert_identical(source / "bad.raw", target)


_INJECT = '''
from mirrorfs.mirror import copy as _copy

_real = _copy.CopyTask.copy_range


async def _copy_range(self, offset, length):
    if self.params.image == "bad.raw" and offset + length > (1 << 20):
        raise RuntimeError("injected fault")
    return await _real(self, offset, length)


_copy.CopyTask.copy_range = _copy_range
'''


def test_an_exception_in_a_copy_fails_that_job_and_the_mount_goes_on(
        mount_factory: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Any exception in a job's copy task (injected into the daemon by a ``sitecustomize`` on
    this test's PYTHONPATH: the daemon is a fork of the CLI) fails that job only."""
    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(_INJECT)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(inject), os.environ.get("PYTHONPATH")])))
    source = tmp_path / "source"
    source.mkdir()
    make_image(source / "ok.raw", SIZE)
    make_image(source / "bad.raw", SIZE)
    mount = mount_factory(source=source)
    mount.allow_log(r"Traceback|BUG in job bad\.raw \(a copy\)")
    ok_target = tmp_path / "ok-target.raw"
    with qmp(mount) as client:
        mount.cli("mirror", mount.mountpoint, "ok.raw", ok_target, "--create", "--speed", "1M")
        mount.cli("mirror", mount.mountpoint, "bad.raw", tmp_path / "bad-target.raw", "--create")
        job = wait_job(client, "bad.raw", lambda j: j["status"] == "concluded", 30, "the job to fail")
        assert job["error"] == "internal error in a copy: RuntimeError: injected fault", job
        assert job["io-status"] == "failed", job
        done = _events(client, "BLOCK_JOB_COMPLETED")
        assert [d["error"] for d in done if d["device"] == "bad.raw"] == [job["error"]], done
        data = b"served".ljust(4096, b".")
        assert _direct_io(mount.mountpoint / "bad.raw", 5000 * 512, data) == 4096
        assert (source / "bad.raw").read_bytes()[5000 * 512:5000 * 512 + 4096] == data
        _assert_other_image_and_its_job_carry_on(mount, client, ok_target)
    assert "RuntimeError: injected fault" in mount.read_log()


def test_a_refused_start_leaves_nothing_behind(mounted: Mount, tmp_path: Path) -> None:
    """A start that fails after creating the target (here: the bitmap's directory is missing)
    removes the target it created; a too large buf-size is refused in one line."""
    make_image(mounted.source / "vm.raw", SIZE)
    target = tmp_path / "created.raw"
    r = mounted.cli("mirror", mounted.mountpoint, "vm.raw", target, "--create",
                    "--bitmap", tmp_path / "missing" / "vm.bitmap", check=False)
    assert r.returncode == 2 and "bitmap directory" in r.stderr and len(r.stderr.splitlines()) == 1, r.stderr
    assert not target.exists()
    r = mounted.cli("mirror", mounted.mountpoint, "vm.raw", target, "--create", "--buf-size", "2G",
                    check=False)
    assert r.returncode == 2 and "buf-size 2147483648 is more than the largest allowed, 1G" in r.stderr, r.stderr
    assert len(r.stderr.splitlines()) == 1 and not target.exists()
    with qmp(mounted) as client:
        assert client.execute("query-block-jobs") == []
