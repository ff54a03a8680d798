"""The journal file (``journal/file.py``): order, bound, reopen, and what a crash leaves."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from mirrorfs.errors import JournalFormatError, JournalFullError, UsageError
from mirrorfs.journal import format as fmt
from mirrorfs.journal.file import DEFAULT_SIZE, WriteJournal, parse_journal_size
from mirrorfs.journal.format import Kind

SIZE = 1 << 30
IDS = dict(image_size=SIZE, source_id="/src/vm.raw", target_id="nbd+unix:///x?socket=/s")


def _create(path: Path, capacity: int = 4 * fmt.MIN_CAPACITY) -> WriteJournal:
    return WriteJournal.create(path, capacity=capacity, **IDS)


def _open(path: Path) -> WriteJournal:
    return WriteJournal.open(path, **IDS)


def _summary(journal: WriteJournal) -> list[tuple]:
    return [(r.kind.name, r.seq, r.offset, r.length, r.payload) for r in journal.replay()]


def _fill(journal: WriteJournal, n: int = 5) -> list[tuple]:
    """n writes with a flush after each even one; the records replay must yield."""
    want = []
    for i in range(n):
        seq = journal.append_write(i * 4096, bytes([i + 1]) * (100 + i))
        want.append(("WRITE", seq, i * 4096, 100 + i, bytes([i + 1]) * (100 + i)))
        if i % 2 == 0:
            want.append(("FLUSH", journal.append_flush(), 0, 0, b""))
    want.append(("ZERO", journal.append_zero(1 << 20, 1 << 20), 1 << 20, 1 << 20, b""))
    return want


def test_replay_yields_every_record_in_order_and_again_after_reopen(tmp_path: Path) -> None:
    path = tmp_path / "j"
    with _create(path) as journal:
        want = _fill(journal)
        assert [w[1] for w in want] == list(range(1, len(want) + 1))
        assert _summary(journal) == want
    with _open(path) as journal:
        assert _summary(journal) == want
        assert journal.discarded_bytes == 0
        assert journal.next_seq == len(want) + 1
        assert journal.pending == len(want)


def test_the_file_is_private_exclusive_and_locked(tmp_path: Path) -> None:
    path = tmp_path / "j"
    os.umask(0)
    try:
        journal = _create(path)
    finally:
        os.umask(0o022)
    assert os.stat(path).st_mode & 0o777 == 0o600
    with pytest.raises(JournalFormatError, match="in use by a running job"):
        _open(path)
    journal.close()
    with pytest.raises(JournalFormatError, match="exists already"):
        _create(path)
    _open(path).close()


def test_a_link_or_a_fifo_is_refused_and_left_alone(tmp_path: Path) -> None:
    real = tmp_path / "real"
    _create(real).close()
    link = tmp_path / "link"
    link.symlink_to(real)
    with pytest.raises(JournalFormatError, match="symbolic link"):
        _open(link)
    with pytest.raises(JournalFormatError, match="exists already"):
        _create(link)
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "nowhere")
    with pytest.raises(JournalFormatError):
        _create(dangling)
    assert not (tmp_path / "nowhere").exists()
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(JournalFormatError, match="not a regular file"):
        _open(fifo)


def test_a_journal_of_another_job_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "j"
    _create(path).close()
    with pytest.raises(JournalFormatError, match="for target"):
        WriteJournal.open(path, image_size=SIZE, source_id=IDS["source_id"], target_id="/other")
    with pytest.raises(JournalFormatError, match="image has 4096:"):
        WriteJournal.open(path, image_size=4096, source_id=IDS["source_id"],
                          target_id=IDS["target_id"])
    whole = path.read_bytes()
    for cut in (fmt.HEADER_SIZE, fmt.RECORDS_OFFSET - 1):
        path.write_bytes(whole[:cut])
        with pytest.raises(JournalFormatError, match="truncated"):
            _open(path)
        assert path.read_bytes() == whole[:cut]  # refused, and left as it was
    (tmp_path / "not").write_bytes(b"hello")
    with pytest.raises(JournalFormatError, match="not a mirrorfs journal"):
        _open(tmp_path / "not")


def test_every_torn_tail_is_cut_to_the_last_whole_record(tmp_path: Path) -> None:
    path = tmp_path / "j"
    with _create(path) as journal:
        want = _fill(journal, 3)
    whole = path.read_bytes()
    ends = [fmt.RECORDS_OFFSET]
    for rec in want:
        ends.append(ends[-1] + fmt.RECORD_HEADER_SIZE + len(rec[4]))
    assert ends[-1] == len(whole)
    for cut in range(fmt.RECORDS_OFFSET, len(whole) + 1):
        path.write_bytes(whole[:cut])
        keep = max(i for i, end in enumerate(ends) if end <= cut)
        with _open(path) as journal:
            assert _summary(journal) == want[:keep], cut
            assert journal.discarded_bytes == cut - ends[keep]
            assert journal.used == ends[keep]
        assert path.stat().st_size == ends[keep]  # cut off on disk too
        with _open(path) as journal:  # and appending goes on after it
            assert journal.append_flush() == keep + 1


@pytest.mark.parametrize("tail", [b"\xff" * 100, b"\0" * 5000, b"MFJR" + bytes(60)])
def test_a_garbage_tail_is_cut_and_a_stale_record_never_replays(tmp_path: Path, tail: bytes) -> None:
    path = tmp_path / "j"
    with _create(path) as journal:
        want = _fill(journal, 2)
    with open(path, "ab") as f:
        f.write(tail)
    with _open(path) as journal:
        assert _summary(journal) == want
        assert journal.discarded_bytes == len(tail)


def test_a_damaged_record_ends_the_journal_there(tmp_path: Path) -> None:
    path = tmp_path / "j"
    with _create(path) as journal:
        want = _fill(journal, 3)
    whole = path.read_bytes()
    second_payload = fmt.RECORDS_OFFSET + fmt.RECORD_HEADER_SIZE + len(want[0][4]) \
        + fmt.RECORD_HEADER_SIZE + fmt.RECORD_HEADER_SIZE + 10  # inside record 3's payload
    damaged = bytearray(whole)
    damaged[second_payload] ^= 1
    path.write_bytes(bytes(damaged))
    with _open(path) as journal:
        assert _summary(journal) == want[:2]
        assert journal.discarded_bytes == len(whole) - journal.used


def test_an_applied_mark_going_back_is_not_a_record_mirrorfs_wrote(tmp_path: Path) -> None:
    path = tmp_path / "j"
    with _create(path) as journal:
        want = _fill(journal, 2)
        journal.truncate_to(3)
        seq = journal.next_seq
    with open(path, "ab") as f:
        f.write(fmt.encode_record(Kind.APPLIED, seq, 1, 0, 0))
        f.write(fmt.encode_record(Kind.FLUSH, seq + 1, 0, 0, 0))
    with _open(path) as journal:
        assert journal.applied_through == 3
        assert _summary(journal) == want[3:]
        assert journal.discarded_bytes == 2 * fmt.RECORD_HEADER_SIZE


def test_a_record_left_behind_by_a_reset_is_never_replayed(tmp_path: Path) -> None:
    path = tmp_path / "j"
    with _create(path) as journal:
        _fill(journal, 2)
        old = path.read_bytes()[fmt.RECORDS_OFFSET:]
        journal.truncate_to(journal.next_seq - 1)
        journal.reset()
        assert journal.next_seq == 6 and journal.used == fmt.RECORDS_OFFSET
    with open(path, "ab") as f:  # as if the reset's new file still had the old records
        f.write(old)
    with _open(path) as journal:
        assert _summary(journal) == []
        assert journal.discarded_bytes == len(old)


def test_applied_records_are_not_replayed_again_after_a_reopen(tmp_path: Path) -> None:
    path = tmp_path / "j"
    with _create(path) as journal:
        want = _fill(journal, 4)
        first_flush = next(w[1] for w in want if w[0] == "FLUSH")
        journal.truncate_to(first_flush)
        assert _summary(journal) == want[first_flush:]
        assert journal.applied_through == first_flush
        with pytest.raises(UsageError, match="cannot mark"):
            journal.truncate_to(first_flush - 1)
        with pytest.raises(UsageError, match="still holds"):
            journal.reset()
    with _open(path) as journal:
        assert _summary(journal) == want[first_flush:]
        journal.truncate_to(journal.next_seq - 1)
        assert journal.pending == 0 and journal.oldest_pending_ns() is None
    with _open(path) as journal:
        assert _summary(journal) == []
        journal.reset()
        assert _summary(journal) == []


def test_replay_follows_appends_made_while_it_runs(tmp_path: Path) -> None:
    with _create(tmp_path / "j") as journal:
        journal.append_write(0, b"a")
        seen = []
        for rec in journal.replay():
            seen.append(rec.payload)
            if len(seen) < 4:
                journal.append_write(0, b"bcd"[len(seen) - 1:len(seen)])
        assert seen == [b"a", b"b", b"c", b"d"]


def test_a_long_write_is_split_into_records_in_order(tmp_path: Path) -> None:
    data = os.urandom(fmt.MAX_PAYLOAD * 2 + 5)
    with _create(tmp_path / "j") as journal:
        assert journal.append_write(4096, data) == 3
        recs = list(journal.replay())
    assert [r.offset for r in recs] == [4096, 4096 + fmt.MAX_PAYLOAD, 4096 + 2 * fmt.MAX_PAYLOAD]
    assert b"".join(r.payload for r in recs) == data


def test_overflow_is_refused_durably_until_reset(tmp_path: Path) -> None:
    path = tmp_path / "j"
    chunk = bytes(fmt.MAX_PAYLOAD)
    journal = _create(path, capacity=fmt.MIN_CAPACITY + 3 * fmt.RECORD_HEADER_SIZE)
    journal.append_write(0, chunk)
    journal.append_flush()
    journal.append_flush()
    assert journal.used == journal.capacity - fmt.RECORD_HEADER_SIZE
    assert not journal.overflowed
    with pytest.raises(JournalFullError, match="size bound") as info:
        journal.append_write(0, b"x")
    assert "resyncs from its bitmap" in str(info.value) and "\n" not in str(info.value)
    assert journal.overflowed
    with pytest.raises(JournalFullError, match="overflowed"):
        journal.append_flush()  # even a record that would fit: the stream has a gap now
    journal.close()
    with _open(path) as journal:
        assert journal.overflowed  # a reopen knows replay is not enough
        assert [r.kind for r in journal.replay()] == [Kind.WRITE, Kind.FLUSH, Kind.FLUSH]
        journal.reset()
        assert not journal.overflowed and journal.used == fmt.RECORDS_OFFSET
        journal.append_write(0, chunk)
    with _open(path) as journal:
        assert not journal.overflowed and journal.pending == 1


def test_the_recovery_point_is_the_oldest_unapplied_record(tmp_path: Path) -> None:
    with _create(tmp_path / "j") as journal:
        assert journal.oldest_pending_ns() is None
        before = time.time_ns()
        journal.append_write(0, b"a")
        first = journal.oldest_pending_ns()
        assert first is not None and before <= first <= time.time_ns()
        journal.append_flush()
        journal.append_write(0, b"b")
        journal.truncate_to(2)
        assert journal.oldest_pending_ns() == list(journal.replay())[0].time_ns > first


def test_pending_bytes_count_the_unapplied_writes_and_zeroes_also_after_a_reopen(
        tmp_path: Path) -> None:
    path = tmp_path / "j"
    with _create(path) as journal:
        assert journal.pending_bytes() == 0
        journal.append_write(0, b"a" * 100)
        journal.append_write(0, b"b" * 100)  # the same range again: the replay writes it twice
        seq = journal.append_flush()
        journal.append_zero(4096, 4096)
        assert journal.pending_bytes() == 200 + 4096
        journal.truncate_to(seq)
        assert journal.pending_bytes() == 4096 == journal.statistics()["pending_bytes"]
    with _open(path) as journal:
        assert journal.pending_bytes() == 4096
        journal.truncate_to(journal.next_seq - 1)
        assert journal.pending_bytes() == 0
        journal.reset()
        assert journal.pending_bytes() == 0
        journal.append_write(0, b"c" * 7)
        assert journal.pending_bytes() == 7


def test_journal_size_parsing() -> None:
    assert parse_journal_size(None) == DEFAULT_SIZE == 1 << 30
    assert parse_journal_size("0") == 0
    assert parse_journal_size("64M") == 64 << 20
    with pytest.raises(UsageError, match="at least"):
        parse_journal_size("4K")
    with pytest.raises(UsageError, match="journal size"):
        parse_journal_size("lots")


_WRITER = textwrap.dedent("""
    import os, sys
    from mirrorfs.journal.file import WriteJournal
    journal = WriteJournal.open(sys.argv[1], image_size=1 << 30, source_id="/src/vm.raw",
                                target_id="nbd+unix:///x?socket=/s")
    i = 0
    while True:
        i += 1
        journal.append_write(i * 512, i.to_bytes(8, "little") * (1 + i % 700))
        if i % 10 == 0:
            journal.append_flush()
            # what was acknowledged: every record up to here is durable
            os.write(1, f"{journal.next_seq - 1}\\n".encode())
""")


def test_sigkill_while_appending_leaves_a_prefix_with_every_flushed_record(tmp_path: Path) -> None:
    path = tmp_path / "j"
    _create(path).close()
    first = 1
    for round_ in range(5):
        child = subprocess.Popen([sys.executable, "-c", _WRITER, str(path)], stdout=subprocess.PIPE)
        try:
            assert child.stdout is not None
            acked = [int(child.stdout.readline()) for _ in range(3 + round_ * 7)][-1]
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait()
        with _open(path) as journal:
            recs = list(journal.replay())
            assert [r.seq for r in recs] == list(range(first, first + len(recs)))
            assert recs[-1].seq >= acked
            for rec in recs:
                if rec.kind is Kind.WRITE:
                    i = rec.offset // 512
                    assert rec.payload == i.to_bytes(8, "little") * (1 + i % 700)
            journal.truncate_to(journal.next_seq - 1)
            journal.reset()
            first = journal.next_seq


class JournalModel(RuleBasedStateMachine):
    """The file against a list: whatever is appended, applied, reopened, torn or reset, replay
    yields exactly the model's unapplied records, in order."""

    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="journal-model-")
        self.path = os.path.join(self.dir, "j")
        self.journal = WriteJournal.create(self.path, capacity=fmt.MIN_CAPACITY, **IDS)
        self.records: list[tuple] = []  # (seq, kind, offset, length, payload), APPLIED left out
        self.applied = 0
        self.overflowed = False

    def _append(self, call, kind: str, offset: int, length: int, payload: bytes) -> None:
        try:
            seq = call()
        except JournalFullError:
            assert self.overflowed or self.journal.used + fmt.RECORD_HEADER_SIZE + len(payload) \
                > self.journal.capacity
            self.overflowed = True
            return
        assert not self.overflowed
        self.records.append((seq, kind, offset, length, payload))

    @rule(offset=st.integers(0, SIZE), data=st.binary(min_size=1, max_size=64) | st.sampled_from(
        [bytes(300_000)]))
    def write(self, offset: int, data: bytes) -> None:
        self._append(lambda: self.journal.append_write(offset, data), "WRITE", offset, len(data),
                     data)

    @rule(offset=st.integers(0, SIZE), length=st.integers(0, SIZE))
    def zero(self, offset: int, length: int) -> None:
        self._append(lambda: self.journal.append_zero(offset, length), "ZERO", offset, length, b"")

    @rule()
    def flush(self) -> None:
        self._append(self.journal.append_flush, "FLUSH", 0, 0, b"")

    @precondition(lambda self: not self.overflowed and any(r[0] > self.applied for r in self.records))
    @rule(data=st.data())
    def apply(self, data: st.DataObject) -> None:
        seq = data.draw(st.sampled_from([r[0] for r in self.records if r[0] > self.applied]))
        try:
            self.journal.truncate_to(seq)
        except JournalFullError:
            self.overflowed = True
            return
        self.applied = seq

    @rule()
    def reopen(self) -> None:
        self.journal.close()
        self.journal = WriteJournal.open(self.path, **IDS)

    @precondition(lambda self: self.overflowed or all(r[0] <= self.applied for r in self.records))
    @rule()
    def reset(self) -> None:
        self.journal.reset()
        self.records, self.overflowed = [], False
        self.applied = self.journal.next_seq - 1

    @precondition(lambda self: not self.overflowed and self.records
                  and self.records[-1][0] == self.journal.next_seq - 1)
    @rule(cut=st.integers(1, fmt.RECORD_HEADER_SIZE))
    def tear_the_last_record(self, cut: int) -> None:
        self.journal.close()
        os.truncate(self.path, os.path.getsize(self.path) - cut)
        self.records.pop()
        self.journal = WriteJournal.open(self.path, **IDS)

    @invariant()
    def replay_matches(self) -> None:
        got = [(r.seq, r.kind.name, r.offset, r.length, r.payload) for r in self.journal.replay()]
        assert got == [r for r in self.records if r[0] > self.applied]
        assert self.journal.overflowed == self.overflowed
        assert self.journal.used == os.path.getsize(self.path) <= self.journal.capacity

    def teardown(self) -> None:
        self.journal.close()
        shutil.rmtree(self.dir)


JournalModel.TestCase.settings = settings(max_examples=40, stateful_step_count=25, deadline=None)
test_journal_against_a_model = JournalModel.TestCase


_NO_SPACE = textwrap.dedent("""
    import resource, signal, sys
    from mirrorfs.errors import JournalFullError
    from mirrorfs.journal.file import WriteJournal
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
    journal = WriteJournal.open(sys.argv[1], image_size=1 << 30, source_id="/src/vm.raw",
                                target_id="nbd+unix:///x?socket=/s")
    resource.setrlimit(resource.RLIMIT_FSIZE, (8192, 8192))
    journal.append_write(0, b"a" * 1000)
    try:
        journal.append_write(0, b"b" * 5000)
    except JournalFullError as exc:
        print(exc)
""")


def test_a_failed_append_marks_the_journal_overflowed(tmp_path: Path) -> None:
    path = tmp_path / "j"
    _create(path).close()
    out = subprocess.run([sys.executable, "-c", _NO_SPACE, str(path)], capture_output=True,
                         text=True, check=True).stdout
    assert "is full (short write): the job resyncs from its bitmap" in out  # EFBIG after 8K
    with _open(path) as journal:
        assert journal.overflowed
        assert [r.payload for r in journal.replay()] == [b"a" * 1000]  # the torn one is cut off


def test_a_flush_is_fsynced_before_it_returns_and_a_write_is_not(tmp_path: Path) -> None:
    # Power loss cannot be simulated here; this pins the discipline the crash argument rests on.
    with _create(tmp_path / "j") as journal:
        journal.append_write(0, b"a")
        journal.append_zero(0, 4096)
        assert journal.statistics()["fsyncs"] == 0
        journal.append_flush()
        assert journal.statistics()["fsyncs"] == 1
        journal.append_flush()
        assert journal.statistics()["fsyncs"] == 2
        journal.sync()  # nothing new: free
        assert journal.statistics()["fsyncs"] == 2


def test_rebinding_the_source_keeps_every_record_and_the_overflow_state(tmp_path: Path) -> None:
    """Another job of the image pivoted it to a new file: the journal now names that file, its
    records and its overflow state stay, and the old file's identity no longer opens it."""
    path = tmp_path / "j"
    journal = _create(path)
    journal.append_write(4096, b"a" * 512)
    journal.append_flush()
    before = _summary(journal)
    journal.rebind_source("/new/disk.raw")
    journal.append_write(8192, b"b" * 512)
    journal.close()
    with pytest.raises(JournalFormatError, match="/new/disk.raw"):
        _open(path)
    again = WriteJournal.open(path, image_size=SIZE, source_id="/new/disk.raw",
                              target_id=IDS["target_id"])
    assert _summary(again)[:len(before)] == before and len(_summary(again)) == len(before) + 1
    again.close()
