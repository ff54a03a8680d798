"""A replica that stays crash-consistent after the first sync: the journal while the target is
away, its ordered replay, and the fall-back to a bitmap resync (issue 13, item 3).

- Unit tests: the replica's state decisions (``mirror/replica.py``) and the replay loop
  (``mirror/replay.py``) against a real journal file and a fake target, no mount.
- Ordered catch-up: a separate writer process writes numbered, checksummed 4K records with
  O_DIRECT through the mount at shuffled offsets, each fdatasync'ed before the next. The NBD
  server (nbdkit) goes away while it writes, and comes back with slow writes (the delay filter).
  During the replay the server is frozen (SIGSTOP) at random moments and its export file copied:
  each copy must hold exactly records 1..k for some k.
- Overflow: a small journal overflows during the outage: replica-consistent is false (status and
  ``bitmap inspect``) with the event, until the job is ready again.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any, Iterator

import pytest
import trio

from compare import assert_identical
from mirrorfs.errors import TargetError
from mirrorfs.journal.file import WriteJournal
from mirrorfs.journal.format import MIN_CAPACITY, Kind
from mirrorfs.mirror.replay import finish_journal, replay_journal
from mirrorfs.mirror.replica import JournalFound, Replica, initial_replica, on_target_lost

from mounting import mirrorfs_cli, process_alive, wait_for
from nbdservers import Server
from test_replication_support import make_blank, qmp, wait_job, wait_ready

MiB = 1 << 20
BLOCK = 4096
INCONSISTENT = "__org.mirrorfs_REPLICA_INCONSISTENT"


# ---------------------------------------------------------------------------- the decisions

@pytest.mark.parametrize("sync,kw,expect", [
    ("full", {}, Replica.INITIAL_COPY),
    ("top", {"journal": JournalFound.PENDING}, Replica.INITIAL_COPY),
    ("none", {}, Replica.IN_SYNC),
    ("dirty", {"flagged": True, "journal": JournalFound.PENDING}, Replica.RESYNCING),
    ("dirty", {"verify": True}, Replica.RESYNCING),
    ("dirty", {"dirty": True, "journal": JournalFound.PENDING}, Replica.JOURNALING),
    ("dirty", {"dirty": False, "journal": JournalFound.UNUSABLE}, Replica.IN_SYNC),
    ("dirty", {"dirty": True, "journal": JournalFound.UNUSABLE, "background": False},
     Replica.RESYNCING),
    ("dirty", {"dirty": True, "journal": JournalFound.EMPTY, "background": True}, Replica.RESYNCING),
    ("dirty", {"dirty": True, "journal": JournalFound.EMPTY, "background": False}, Replica.IN_SYNC),
])
def test_the_replica_state_a_job_starts_in(sync: str, kw: dict[str, Any], expect: Replica) -> None:
    assert initial_replica(sync, **kw) is expect
    assert expect.consistent == (expect not in (Replica.INITIAL_COPY, Replica.RESYNCING))


@pytest.mark.parametrize("state,usable,covered,expect", [
    (Replica.IN_SYNC, True, True, Replica.JOURNALING),
    (Replica.IN_SYNC, False, True, Replica.RESYNCING),  # no journal, or it overflowed
    (Replica.IN_SYNC, True, False, Replica.RESYNCING),  # the target already missed a write
    (Replica.INITIAL_COPY, True, True, Replica.INITIAL_COPY),
    (Replica.RESYNCING, True, True, Replica.RESYNCING),
    (Replica.JOURNALING, True, True, Replica.JOURNALING),
])
def test_a_lost_target_journals_only_a_consistent_replica(state: Replica, usable: bool,
                                                          covered: bool, expect: Replica) -> None:
    assert on_target_lost(state, journal_usable=usable, window_covers_dirt=covered) is expect


# ---------------------------------------------------------------------------- the replay loop

class FakeTarget:
    """Records what reaches it; ``fail_at``: the N-th request raises TargetError."""

    def __init__(self, fail_at: int | None = None, on_write: Any = None) -> None:
        self.ops: list[tuple[str, int, bytes | int]] = []
        self.fail_at = fail_at
        self.on_write = on_write
        self.requests = 0

    async def _request(self) -> None:
        self.requests += 1
        if self.fail_at is not None and self.requests == self.fail_at:
            raise TargetError("connection lost")
        await trio.lowlevel.checkpoint()

    async def pwrite(self, offset: int, data: Any, *, direct: bool = False) -> None:
        await self._request()
        self.ops.append(("write", offset, bytes(data)))
        if self.on_write is not None:
            self.on_write(offset)

    async def write_zeroes(self, offset: int, length: int) -> None:
        await self._request()
        self.ops.append(("zero", offset, length))

    async def flush(self) -> None:
        await self._request()
        self.ops.append(("flush", 0, 0))


def _journal(tmp_path: Path) -> WriteJournal:
    return WriteJournal.create(tmp_path / "j", capacity=MIN_CAPACITY * 4, image_size=16 * MiB,
                               source_id="/s", target_id="/t")


async def _no_thread(fn: Any) -> None:
    fn()


def test_replay_writes_in_order_flushing_where_the_guest_flushed(tmp_path: Path) -> None:
    journal = _journal(tmp_path)
    journal.append_write(0, b"a" * 512)
    journal.append_zero(4096, 8192)
    journal.append_flush()
    journal.append_write(512, b"b" * 512)
    target = FakeTarget()
    last = trio.run(lambda: replay_journal(journal, target, run_sync=_no_thread))
    assert target.ops == [("write", 0, b"a" * 512), ("zero", 4096, 8192), ("flush", 0, 0),
                          ("write", 512, b"b" * 512), ("flush", 0, 0)]
    assert last == 4 and journal.applied_through == 3  # the guest's flush is marked applied
    finish_journal(journal)
    assert journal.pending == 0 and journal.next_seq == 7  # numbers go on after the reset
    assert not journal.has_records_after(journal.next_seq - 1)


def test_replay_follows_records_appended_while_it_runs(tmp_path: Path) -> None:
    journal = _journal(tmp_path)
    journal.append_write(0, b"1" * 512)
    journal.append_flush()

    def guest_writes_on(offset: int) -> None:
        if offset < 4096 * 3:
            journal.append_write(offset + 4096, bytes([offset // 4096 + 50]) * 512)
            journal.append_flush()

    target = FakeTarget(on_write=guest_writes_on)
    last = trio.run(lambda: replay_journal(journal, target, run_sync=_no_thread))
    writes = [op[1] for op in target.ops if op[0] == "write"]
    assert writes == [0, 4096, 8192, 12288]
    assert [op[0] for op in target.ops] == ["write", "flush"] * 4 + ["flush"]
    assert last == journal.applied_through == 10  # the last FLUSH, marked applied
    assert not journal.has_records_after(last)


def test_a_target_error_stops_the_replay_and_the_next_resumes_after_the_applied_mark(
        tmp_path: Path) -> None:
    journal = _journal(tmp_path)
    for i in range(3):
        journal.append_write(i * 4096, bytes([i + 1]) * 512)
        journal.append_flush()
    target = FakeTarget(fail_at=5)  # write 1, flush 1, write 2, flush 2, write 3 fails

    with pytest.raises(TargetError):
        trio.run(lambda: replay_journal(journal, target, run_sync=_no_thread))
    assert journal.applied_through == 4  # records 1..4: two writes and their flushes
    journal.append_write(3 * 4096, b"\x09" * 512)  # the guest wrote on meanwhile
    again = FakeTarget()
    trio.run(lambda: replay_journal(journal, again, run_sync=_no_thread))
    assert [op[1] for op in again.ops if op[0] == "write"] == [8192, 3 * 4096]  # nothing older


def test_replay_stops_where_the_job_says(tmp_path: Path) -> None:
    journal = _journal(tmp_path)
    for i in range(4):
        journal.append_write(i * 4096, b"x" * 512)
    target = FakeTarget()
    calls = iter([True, True, False])
    assert trio.run(lambda: replay_journal(journal, target, going=lambda: next(calls, False),
                                           run_sync=_no_thread)) is None
    assert len(target.ops) == 2
    assert [r.kind for r in journal.replay()] == [Kind.WRITE] * 4  # nothing marked applied


# ---------------------------------------------------------------------------- through a mount

_WRITER = r"""
import mmap, os, random, struct, sys, time, zlib
path, first, last, seed, phase, go = sys.argv[1:7]
first, last, seed = int(first), int(last), int(seed)
slots = random.Random(seed).sample(range(1, 1024), 1000)
fd = os.open(path, os.O_RDWR | os.O_DIRECT)
buf = mmap.mmap(-1, 4096)  # page-aligned, as O_DIRECT wants
for seq in range(first, last + 1):
    if seq == int(phase.split(":")[0]):
        open(phase.split(":")[1], "w").close()
        while not os.path.exists(go):
            time.sleep(0.005)
    payload = os.urandom(4080)
    buf[:] = b"REC!" + struct.pack("<QI", seq, zlib.crc32(payload)) + payload
    assert os.pwrite(fd, buf, slots[seq - 1] * 4096) == 4096
    os.fdatasync(fd)  # acknowledged, and flushed, before the next record
os.close(fd)
"""


def _slots(seed: int) -> list[int]:
    return random.Random(seed).sample(range(1, 1024), 1000)


def records_in(data: bytes, slots: list[int], count: int) -> set[int]:
    """The records 1..count whole in ``data``; a torn or misplaced record fails the test."""
    present = set()
    for seq in range(1, count + 1):
        block = data[slots[seq - 1] * BLOCK:(slots[seq - 1] + 1) * BLOCK]
        if block[:4] != b"REC!":
            assert block == bytes(BLOCK), f"record {seq}'s block holds neither it nor zeroes"
            continue
        found, crc = struct.unpack_from("<QI", block, 4)
        assert found == seq and zlib.crc32(block[16:]) == crc, f"record {seq} is torn"
        present.add(seq)
    return present


def assert_prefix(present: set[int], what: str) -> int:
    k = max(present, default=0)
    missing = sorted(set(range(1, k + 1)) - present)
    assert not missing, f"{what}: holds records up to {k} but not {missing[:10]}"
    return k


def write_through_an_outage(mount: Any, tmp_path: Path, nbd_file: "NbdkitFile", *, before: int,
                            during: int, seed: int) -> None:
    """The ordered writer writes ``before`` records, the server is killed, the writer writes
    ``during`` more (into the journal) and exits."""
    script = tmp_path / "ordered_writer.py"
    script.write_text(_WRITER)
    phase, go = tmp_path / "phase", tmp_path / "go"
    writer = subprocess.Popen([sys.executable, str(script), str(mount.mountpoint / "vm.raw"), "1",
                               str(before + during), str(seed), f"{before + 1}:{phase}", str(go)])
    try:
        wait_for(phase.exists, 60, "the writer's first records")
        assert_prefix(records_in(nbd_file.image.read_bytes(), _slots(seed), before + during),
                      "before the outage")
        nbd_file.kill()
        go.touch()  # the writer goes on while the server is away
        assert writer.wait(120) == 0
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.wait()


class NbdkitFile:
    """nbdkit serving a file on one UNIX socket, restartable with another write delay."""

    def __init__(self, image: Path) -> None:
        self.image = image
        self.dir = Path(tempfile.mkdtemp(prefix="nbdj", dir="/tmp"))
        self.sock = self.dir / "s"
        self.uri = f"nbd+unix:///?socket={self.sock}"
        self.server: Server | None = None

    def start(self, delay_ms: int = 0) -> None:
        argv = ["nbdkit", "-f", "--exit-with-parent", "-U", str(self.sock), "--filter=delay",
                "file", f"file={self.image}", f"delay-write={delay_ms}ms",
                f"delay-zero={delay_ms}ms"]
        self.server = Server(argv, uri=self.uri, family=socket.AF_UNIX, addr=str(self.sock),
                             log=self.dir / "log")
        self.server.start()

    @property
    def pid(self) -> int:
        assert self.server is not None and self.server.proc is not None
        return self.server.proc.pid

    def kill(self) -> None:
        if self.server is not None:
            self.server.kill()

    def close(self) -> None:
        if self.server is not None:
            self.server.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def nbd_file(tmp_path: Path) -> Iterator[NbdkitFile]:
    served = tmp_path / "served.raw"
    make_blank(served, 4 * MiB)
    server = NbdkitFile(served)
    try:
        yield server
    finally:
        server.close()


def inspect_bitmap(bitmap: Path) -> dict[str, Any]:
    proc = mirrorfs_cli("bitmap", "inspect", bitmap, "--json", check=False)
    assert proc.returncode in (0, 1), proc.stderr
    return json.loads(proc.stdout)


def snapshots_until_ready(client: Any, nbd_file: NbdkitFile, slots: list[int], count: int,
                          seed: int) -> list[int]:
    """Freeze the server at random moments until the job is ready, copy its export each time
    and check that the copy holds records 1..k; returns the k of the copies taken while
    replaying. The job says it is consistent all the while."""
    rng = random.Random(seed)
    snapshots: list[tuple[str, int]] = []
    while True:
        job = wait_job(client, "vm.raw", lambda j: True, 5, "job")
        assert job["__org.mirrorfs_replica-consistent"] is True, job
        if job["ready"]:
            break
        time.sleep(rng.uniform(0.01, 0.1))
        os.kill(nbd_file.pid, signal.SIGSTOP)
        try:
            data = nbd_file.image.read_bytes()
            state = wait_job(client, "vm.raw", lambda j: True, 5, "job")["__org.mirrorfs_replica-state"]
        finally:
            os.kill(nbd_file.pid, signal.SIGCONT)
        k = assert_prefix(records_in(data, slots, count), f"snapshot {len(snapshots)} ({state})")
        snapshots.append((state, k))
    replaying = [k for state, k in snapshots if state == "replaying"]
    print(f"{len(snapshots)} snapshots, {len(replaying)} while replaying: {replaying}")
    return replaying


def mirrored(mount_factory: Any, tmp_path: Path, nbd_file: NbdkitFile, *options: str
             ) -> tuple[Any, Path, Path]:
    """A mount with a blank 4 MiB vm.raw mirrored to the nbdkit server with a bitmap file;
    returns the mount, the source image and the bitmap."""
    mount = mount_factory()
    mount.allow_log(r"WARNING")  # the lost target is logged as a warning, by design
    source = mount.source / "vm.raw"
    make_blank(source, 4 * MiB)
    bitmap = tmp_path / "vm.bitmap"
    nbd_file.start()
    mount.cli("mirror", mount.mountpoint, "vm.raw", nbd_file.uri, "--bitmap", bitmap, *options)
    return mount, source, bitmap


def sigkill_mount(mount: Any) -> None:
    os.kill(mount.pid, signal.SIGKILL)
    wait_for(lambda: not process_alive(mount.pid), 10, "the mount process to die")
    subprocess.run(["fusermount3", "-u", "-z", str(mount.mountpoint)], check=True,
                   capture_output=True)


@pytest.mark.slow
@pytest.mark.timeout(240)
@pytest.mark.parametrize("copy_mode", ["write-blocking", "background"])
def test_catch_up_from_the_journal_keeps_every_snapshot_a_prefix(
        mount_factory: Any, tmp_path: Path, nbd_file: NbdkitFile, copy_mode: str) -> None:
    before, during, seed = 60, 600, 11
    mount, source, bitmap = mirrored(mount_factory, tmp_path, nbd_file, "--copy-mode", copy_mode)
    slots = _slots(seed)
    with qmp(mount) as client:
        wait_ready(client, "vm.raw", timeout=60)
        write_through_an_outage(mount, tmp_path, nbd_file, before=before, during=during,
                                seed=seed)
        job = wait_job(client, "vm.raw", lambda j: not j["__org.mirrorfs_target-connected"],
                       30, "the loss to be noticed")
        assert job["__org.mirrorfs_replica-state"] == "journaling", job
        assert job["__org.mirrorfs_replica-consistent"] is True
        assert inspect_bitmap(bitmap)["replica-consistent"] is True
        at_loss = assert_prefix(records_in(nbd_file.image.read_bytes(), slots,
                                           before + during), "at the loss")
        assert at_loss >= before

        nbd_file.start(delay_ms=5)  # back, slow enough to be caught mid-replay ~75 times
        replaying = snapshots_until_ready(client, nbd_file, slots, before + during, seed)
        assert len(replaying) >= 20, replaying
        assert len(set(replaying)) >= 10, "the replay was caught at too few moments"
        job = wait_job(client, "vm.raw", lambda j: True, 5, "job")
        assert job["__org.mirrorfs_replica-consistent"] is True
        assert job["__org.mirrorfs_replayed-records"] >= during, job
        events = [e["event"] for e in client.poll_events(0.05)]
        assert INCONSISTENT not in events, events  # consistent all through the outage
        assert_identical(source, nbd_file.image)
        final = records_in(nbd_file.image.read_bytes(), slots, before + during)
        assert final == set(range(1, before + during + 1))
        journal = Path(f"{bitmap}.journal")
        assert journal.stat().st_size == 4096  # emptied after the catch-up
    mount.cli("cancel", mount.mountpoint, "vm.raw", check=False)


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_an_overflowing_journal_makes_the_replica_inconsistent_until_ready(
        mount_factory: Any, tmp_path: Path, nbd_file: NbdkitFile) -> None:
    before, during, seed = 20, 400, 3
    mount, source, bitmap = mirrored(mount_factory, tmp_path, nbd_file,
                                     "--journal-size", str(MIN_CAPACITY))  # ~250 4K records
    with qmp(mount) as client:
        wait_ready(client, "vm.raw", timeout=60)
        client.poll_events(0.05)
        assert inspect_bitmap(bitmap)["replica-consistent"] is True
        write_through_an_outage(mount, tmp_path, nbd_file, before=before, during=during,
                                seed=seed)
        job = wait_job(client, "vm.raw",
                       lambda j: j["__org.mirrorfs_replica-state"] == "resyncing", 30,
                       "the journal to overflow")
        assert job["__org.mirrorfs_replica-consistent"] is False
        events = client.poll_events(0.05)
        inconsistent = [e for e in events if e["event"] == INCONSISTENT]
        assert len(inconsistent) == 1, events
        assert "is full" in inconsistent[0]["data"]["reason"], inconsistent
        info = inspect_bitmap(bitmap)
        assert info["replica-consistent"] is False
        status = mount.cli("status", mount.mountpoint).stdout
        assert "resyncing (inconsistent)" in status, status
        listed = json.loads((mount.control / "status.json").read_text())
        assert listed[0]["__org.mirrorfs_replica-consistent"] is False, listed

        nbd_file.start()
        job = wait_ready(client, "vm.raw", timeout=60)
        assert job["__org.mirrorfs_replica-consistent"] is True
        assert job["__org.mirrorfs_replica-state"] == "in-sync"
        assert inspect_bitmap(bitmap)["replica-consistent"] is True
        names = [e["event"] for e in client.poll_events(0.05)]
        assert "BLOCK_JOB_READY" in names and INCONSISTENT not in names, names
        assert_identical(source, nbd_file.image)
        wait_for(lambda: Path(f"{bitmap}.journal").stat().st_size == 4096, 10,
                 "the journal to be emptied after the resync")
    mount.cli("cancel", mount.mountpoint, "vm.raw", check=False)


@pytest.mark.slow
@pytest.mark.timeout(240)
@pytest.mark.parametrize("overflow", [False, True])
def test_a_job_resumed_after_a_crash_in_an_outage_replays_its_journal(
        mount_factory: Any, tmp_path: Path, nbd_file: NbdkitFile, overflow: bool) -> None:
    """mirrorfs dies (SIGKILL) while journaling; ``--sync dirty`` from the bitmap replays the
    journal in order when the server is back. With an overflowed journal the resumed job is
    inconsistent until ready, as the bitmap file says."""
    before, during, seed = 30, 300, 5
    size = ["--journal-size", str(MIN_CAPACITY)] if overflow else []
    mount, source, bitmap = mirrored(mount_factory, tmp_path, nbd_file, *size)
    slots = _slots(seed)
    with qmp(mount) as client:
        wait_ready(client, "vm.raw", timeout=60)
    write_through_an_outage(mount, tmp_path, nbd_file, before=before, during=during, seed=seed)
    sigkill_mount(mount)
    assert inspect_bitmap(bitmap)["replica-consistent"] is not overflow
    assert_prefix(records_in(nbd_file.image.read_bytes(), slots, before + during), "at the crash")

    mount.start()
    nbd_file.start(delay_ms=5)
    mount.cli("mirror", mount.mountpoint, "vm.raw", nbd_file.uri, "--sync", "dirty",
              "--bitmap", bitmap, *size)
    with qmp(mount) as client:
        if overflow:
            job = wait_job(client, "vm.raw", lambda j: True, 5, "job")
            assert job["ready"] or job["__org.mirrorfs_replica-state"] == "resyncing", job
            assert job["ready"] or job["__org.mirrorfs_replica-consistent"] is False, job
            job = wait_ready(client, "vm.raw", timeout=60)
        else:
            replaying = snapshots_until_ready(client, nbd_file, slots, before + during, seed)
            assert replaying, "the replay was never caught"
            job = wait_job(client, "vm.raw", lambda j: True, 5, "job")
            assert job["__org.mirrorfs_replayed-records"] >= during, job
        assert job["__org.mirrorfs_replica-consistent"] is True
        assert inspect_bitmap(bitmap)["replica-consistent"] is True
    assert_identical(source, nbd_file.image)
    assert records_in(nbd_file.image.read_bytes(), slots, before + during) == \
        set(range(1, before + during + 1))
    mount.cli("complete", mount.mountpoint, "vm.raw", "--no-pivot")
    assert not Path(f"{bitmap}.journal").exists()  # a job that ends removes its journal


@pytest.mark.parametrize("value,expect", [
    ("5K", "invalid journal size 5120: at least 1052720 bytes"),
    (-1, "invalid journal-size -1: must not be negative"),
    ("lots", "invalid journal-size 'lots'"),
    (1.5, "invalid journal-size 1.5"),
    ("1e999", "invalid journal-size '1e999'"),
    (float("inf"), "invalid journal-size inf"),
])
def test_a_bad_journal_size_is_refused_in_one_line(value: Any, expect: str) -> None:
    from mirrorfs.errors import UsageError
    from mirrorfs.mirror.params import MirrorParams

    with pytest.raises(UsageError) as info:
        MirrorParams.from_arguments({"device": "vm.raw", "target": "/t", "journal-size": value})
    assert expect in str(info.value) and "\n" not in str(info.value)
    params = MirrorParams.from_arguments({"device": "vm.raw", "target": "/t", "bitmap": "/b",
                                          "journal-size": "0"})
    assert params.journal is None  # 0 turns it off
    params = MirrorParams.from_arguments({"device": "vm.raw", "target": "/t", "bitmap": "/b"})
    assert params.journal_size == 1 << 30 and params.journal == "/b.journal"
    assert MirrorParams.from_arguments({"device": "vm.raw", "target": "/t"}).journal is None


def test_a_bad_journal_size_on_the_command_line_changes_nothing(mounted: Any, tmp_path: Path) -> None:
    make_blank(mounted.source / "vm.raw", MiB)
    bitmap = tmp_path / "vm.bitmap"
    proc = mounted.cli("mirror", mounted.mountpoint, "vm.raw", str(tmp_path / "t.raw"), "--create",
                       "--bitmap", bitmap, "--journal-size", "64K", check=False)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "journal size" in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(("vm.", "t."))) == []
    assert json.loads((mounted.control / "status.json").read_text()) == []


# ---------------------------------------------------------------------------- the engine, no mount

class FlakyTarget:
    """A real local target that can be taken away: while ``down``, every request and every
    reconnect fails as a lost NBD connection does. Records the writes that reach it."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.down = False
        self.writes: list[int] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def _check(self) -> None:
        if self.down:
            from mirrorfs.errors import TargetRetryableError

            raise TargetRetryableError("injected: connection lost")

    @property
    def connected(self) -> bool:
        return not self.down

    async def connect(self) -> None:
        await trio.lowlevel.checkpoint()
        self._check()

    async def pwrite(self, offset: int, data: Any, *, direct: bool = False) -> None:
        await trio.lowlevel.checkpoint()
        self._check()
        self.writes.append(offset)
        await self._inner.pwrite(offset, data)

    def can_write_now(self, length: int) -> bool:
        return False  # every write takes the path that awaits its duplicate or schedules it

    async def write_zeroes(self, offset: int, length: int) -> None:
        await trio.lowlevel.checkpoint()
        self._check()
        await self._inner.write_zeroes(offset, length)

    async def flush(self) -> None:
        await trio.lowlevel.checkpoint()
        self._check()
        await self._inner.flush()


async def _flaky_job(env: Any, tmp_path: Path, **kwargs: Any) -> tuple[Any, FlakyTarget]:
    job = await env.mirror(tmp_path / "target.img", bitmap=str(tmp_path / "b.bitmap"),
                           granularity=4096, **kwargs)
    await env.wait_event("BLOCK_JOB_READY")
    env.events.clear()
    target = FlakyTarget(job.target)
    job.target = target
    return job, target


async def _wait(predicate: Any, what: str, timeout: float = 20) -> None:
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.01)


@pytest.mark.parametrize("copy_mode", ["background", "write-blocking"])
async def test_engine_journals_a_loss_and_replays_in_acknowledgement_order(
        tmp_path: Path, copy_mode: str) -> None:
    from test_mirror_engine import engine

    async with engine(tmp_path) as env:
        job, target = await _flaky_job(env, tmp_path, copy_mode=copy_mode)
        await env.write(0, b"A" * 4096)
        await _wait(lambda: not job.bitmap.count(), "A on the target")
        target.down = True
        order = [8, 3, 5, 1]  # blocks, in the order the guest writes them
        for i, block in enumerate(order):
            await env.write(block * 4096, bytes([66 + i]) * 4096)
            if i == 1:
                await job.fsync(env.handle)  # a FLUSH record between the two pairs
        assert job.replica is Replica.JOURNALING and job.info()["__org.mirrorfs_replica-consistent"]
        kinds = [(r.kind, r.offset) for r in job.journal.replay()]
        assert kinds == [(Kind.WRITE, 8 * 4096), (Kind.WRITE, 3 * 4096), (Kind.FLUSH, 0),
                         (Kind.WRITE, 5 * 4096), (Kind.WRITE, 1 * 4096)]
        assert not job.bitmap.inconsistent
        target.writes.clear()
        target.down = False  # the reconnect (0.25 s) finds it and replays
        await env.wait_event("BLOCK_JOB_READY")
        assert target.writes[:4] == [b * 4096 for b in order]  # the journal's order, first
        assert job.replica is Replica.IN_SYNC and job.stats["replayed-records"] >= 4
        await _wait(lambda: job.journal.next_seq == job.journal.header.first_seq, "emptied")
        assert (tmp_path / "target.img").read_bytes() == env.source.read_bytes()
        assert INCONSISTENT not in env.event_names()


async def test_engine_resyncs_when_the_target_already_missed_a_write(tmp_path: Path) -> None:
    from test_mirror_engine import engine

    async with engine(tmp_path) as env:
        job, target = await _flaky_job(env, tmp_path)
        job.copy.hold()  # so that the copy does not clean it first
        job.bitmap.mark(0, 4096)  # as a skipped duplicate leaves it: no write in flight there
        target.down = True
        await env.write(8192, b"x" * 4096)
        await _wait(lambda: not job.target_ok, "the loss")
        job.copy.release()
        assert job.replica is Replica.RESYNCING and job.bitmap.inconsistent
        (event,) = [d for e, d in env.events if e == INCONSISTENT]
        assert "missed acknowledged writes" in event["reason"] and event["state"] == "resyncing"
        assert job.journal.next_seq == job.journal.header.first_seq  # nothing journaled
        target.down = False
        await env.wait_event("BLOCK_JOB_READY")
        assert job.replica is Replica.IN_SYNC and not job.bitmap.inconsistent
        assert (tmp_path / "target.img").read_bytes() == env.source.read_bytes()


async def test_engine_overflow_resyncs_and_a_lost_replay_goes_on_from_its_mark(
        tmp_path: Path) -> None:
    from test_mirror_engine import engine

    async with engine(tmp_path) as env:
        job, target = await _flaky_job(env, tmp_path, journal_size=MIN_CAPACITY)
        target.down = True
        for block in range(40):
            await env.write(block * 4096, bytes([block + 1]) * 4096)
            await job.fsync(env.handle)
        assert job.replica is Replica.JOURNALING
        # back, but lost again after three replayed records
        original = target.pwrite
        calls = 0

        async def failing_pwrite(offset: int, data: Any, *, direct: bool = False) -> None:
            nonlocal calls
            calls += 1
            if calls == 4:
                target.down = True
            await original(offset, data)

        target.pwrite = failing_pwrite  # type: ignore[method-assign]
        target.down = False
        await _wait(lambda: calls >= 4 and job.replica is Replica.JOURNALING, "the replay lost")
        assert job.journal.applied_through == 6  # three writes and their flushes
        assert [n for n, _ in env.events].count("MIRROR_TARGET_LOST") == 2
        for block in range(40, 400):  # the journal overflows while the target is away again
            await env.write(block * 4096, b"\x07" * 4096)
        assert job.replica is Replica.RESYNCING and job.journal.overflowed
        assert job.bitmap.inconsistent and not job.info()["__org.mirrorfs_replica-consistent"]
        target.down = False
        await env.wait_event("BLOCK_JOB_READY")
        assert not job.bitmap.inconsistent and job.replica is Replica.IN_SYNC
        await _wait(lambda: not job.journal.overflowed, "the journal to be emptied")
        assert (tmp_path / "target.img").read_bytes() == env.source.read_bytes()


async def test_engine_recovery_point_is_the_oldest_unapplied_record_until_ready(tmp_path: Path) -> None:
    from test_mirror_engine import engine

    async with engine(tmp_path) as env:
        job, target = await _flaky_job(env, tmp_path, copy_mode="write-blocking")
        assert (job.recovery_point_age(time.time_ns()), job.bytes_behind()) == (0, 0)
        target.down = True
        for _ in range(4):  # one cluster written four times: four writes for the replay to send
            await env.write(8 * 4096, b"A" * 4096)
        await job.fsync(env.handle)
        assert job.replica is Replica.JOURNALING
        now = time.time_ns()
        assert job.recovery_point_age(now) == (now - job.journal.oldest_pending_ns()) / 1e9 > 0
        assert job.bitmap.dirty_bytes() == 4096 and job.bytes_behind() == 4 * 4096
        await trio.sleep(0.4)
        before_b = time.time_ns()
        await env.write(3 * 4096, b"B" * 4096)  # after the FLUSH: the replay stops before it
        after_b = time.time_ns()

        stalled, go_on = trio.Event(), trio.Event()
        original = target.pwrite

        async def stall_at_b(offset: int, data: Any, *, direct: bool = False) -> None:
            if offset == 3 * 4096:
                stalled.set()
                await go_on.wait()
            await original(offset, data)

        target.pwrite = stall_at_b  # type: ignore[method-assign]
        target.down = False  # the reconnect replays A, flushes, marks it applied, then stalls at B
        with trio.fail_after(20):
            await stalled.wait()
        assert job.replica is Replica.REPLAYING and job.journal.pending_bytes() == 4096
        now = time.time_ns()
        age = job.recovery_point_age(now)
        # the age of B's record, not of the first write of the outage (0.4 s older)
        assert (now - after_b) / 1e9 <= age <= (now - before_b) / 1e9, age
        shown = job.info()["__org.mirrorfs_recovery-point-age"]
        assert shown <= round((time.time_ns() - before_b) / 1e9, 3) + 0.001, shown
        assert job.bytes_behind() == job.bitmap.dirty_bytes() == 2 * 4096
        go_on.set()
        await env.wait_event("BLOCK_JOB_READY")
        info = job.info()
        assert (info["__org.mirrorfs_recovery-point-age"], info["__org.mirrorfs_bytes-behind"]) == (0, 0)
        assert job.replica is Replica.IN_SYNC and job.recovery_point_age(time.time_ns()) == 0
        assert (tmp_path / "target.img").read_bytes() == env.source.read_bytes()
