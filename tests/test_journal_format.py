"""The journal codec (``journal/format.py``): round trips, and every damaged byte refused."""

from __future__ import annotations

import struct
import zlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mirrorfs.errors import JournalFormatError, UsageError
from mirrorfs.journal import format as fmt
from mirrorfs.journal.format import Kind

HEADER = fmt.JournalHeader(image_size=1 << 30, capacity=fmt.MIN_CAPACITY, first_seq=7,
                           created_at=123, source_id="/src/vm.raw", target_id="nbd://h:10809/x")


def _record(kind: Kind, seq: int, offset: int = 0, payload: bytes = b"", length: int | None = None
            ) -> bytes:
    length = len(payload) if length is None else length
    return fmt.encode_record(kind, seq, offset, length, 99, payload) + payload


records = st.lists(st.one_of(
    st.tuples(st.just(Kind.WRITE), st.integers(0, 1 << 40), st.binary(min_size=1, max_size=300)),
    st.tuples(st.just(Kind.ZERO), st.integers(0, 1 << 40), st.integers(0, 1 << 40)),
    st.tuples(st.just(Kind.FLUSH), st.just(0), st.just(0)),
), max_size=20)


def _stream(items: list, first_seq: int) -> bytes:
    out = b""
    for i, (kind, offset, extra) in enumerate(items):
        if kind is Kind.WRITE:
            out += _record(kind, first_seq + i, offset, extra)
        else:
            out += _record(kind, first_seq + i, offset, length=extra)
    return out


@given(records, st.integers(1, 1 << 40))
def test_records_round_trip(items: list, first_seq: int) -> None:
    data = _stream(items, first_seq)
    decoded, used = fmt.decode_records(data, first_seq=first_seq)
    assert used == len(data)
    assert [r.seq for r in decoded] == list(range(first_seq, first_seq + len(items)))
    for rec, (kind, offset, extra) in zip(decoded, items):
        assert (rec.kind, rec.offset, rec.time_ns) == (kind, offset, 99)
        if kind is Kind.WRITE:
            assert (rec.payload, rec.length) == (extra, len(extra))
        else:
            assert (rec.payload, rec.length) == (b"", extra)


def _ends(whole: list[fmt.Record]) -> list[int]:
    """Where each record ends in the stream, after a leading 0."""
    ends = [0]
    for rec in whole:
        ends.append(ends[-1] + fmt.RECORD_HEADER_SIZE + len(rec.payload))
    return ends


@given(records.filter(bool), st.data())
def test_any_damaged_byte_ends_the_journal_at_that_record(items: list, data: st.DataObject) -> None:
    stream = _stream(items, 1)
    pos = data.draw(st.integers(0, len(stream) - 1))
    damaged = bytearray(stream)
    damaged[pos] ^= data.draw(st.integers(1, 255))
    decoded, used = fmt.decode_records(bytes(damaged), first_seq=1)
    # the records before the damaged one survive intact; the damaged one and all after are gone
    whole, _ = fmt.decode_records(stream, first_seq=1)
    ends = _ends(whole)
    hit = max(i for i, end in enumerate(ends) if end <= pos)
    assert decoded == whole[:hit]
    assert used == ends[hit]


@given(records.filter(bool), st.data())
def test_a_torn_tail_keeps_exactly_the_whole_records(items: list, data: st.DataObject) -> None:
    stream = _stream(items, 1)
    cut = data.draw(st.integers(0, len(stream)))
    decoded, used = fmt.decode_records(stream[:cut], first_seq=1)
    whole, _ = fmt.decode_records(stream, first_seq=1)
    ends = _ends(whole)
    keep = max(i for i, end in enumerate(ends) if end <= cut)
    assert decoded == whole[:keep]
    assert used == ends[keep]


def test_records_out_of_sequence_end_the_journal() -> None:
    # a stale record from before a reset (a lower sequence number) must not be replayed
    data = _record(Kind.WRITE, 5, 0, b"new") + _record(Kind.WRITE, 3, 0, b"old")
    decoded, used = fmt.decode_records(data, first_seq=5)
    assert [r.payload for r in decoded] == [b"new"]
    assert fmt.decode_records(data, first_seq=4) == ([], 0)


@pytest.mark.parametrize(("field", "value"), [
    ("magic", b"MFJX"), ("kind", 9), ("flags", 1), ("reserved", 1),
])
def test_a_record_header_with_a_bad_field_is_not_a_record(field: str, value: object) -> None:
    fields = dict(magic=fmt.RECORD_MAGIC, kind=Kind.ZERO, flags=0, seq=1, offset=0, length=8,
                  time_ns=0, reserved=0)
    fields[field] = value
    head = bytearray(fmt.RECORD_STRUCT.pack(*fields.values(), 0))
    struct.pack_into("<I", head, fmt.RECORD_HEADER_SIZE - 4, zlib.crc32(head[:-4]))
    assert fmt.decode_record_header(bytes(head), expected_seq=1) is None


def test_impossible_lengths_are_not_records() -> None:
    def head(kind: Kind, offset: int, length: int, seq: int = 2) -> bytes:
        return fmt.RECORD_STRUCT.pack(fmt.RECORD_MAGIC, kind, 0, seq, offset, length, 0, 0, 0)
    assert fmt.decode_record_header(head(Kind.WRITE, 0, fmt.MAX_PAYLOAD + 1), expected_seq=2) is None
    assert fmt.decode_record_header(head(Kind.WRITE, 0, 0), expected_seq=2) is None
    assert fmt.decode_record_header(head(Kind.FLUSH, 0, 1), expected_seq=2) is None
    assert fmt.decode_record_header(head(Kind.APPLIED, 2, 0), expected_seq=2) is None
    assert fmt.decode_record_header(head(Kind.APPLIED, 1, 0), expected_seq=2) is not None


def test_encode_refuses_a_payload_that_does_not_fit_the_kind() -> None:
    with pytest.raises(UsageError, match="payload"):
        fmt.encode_record(Kind.FLUSH, 1, 0, 0, 0, b"x")
    with pytest.raises(UsageError, match="payload"):
        fmt.encode_record(Kind.WRITE, 1, 0, 4, 0, b"xyz")
    with pytest.raises(UsageError, match="payload"):
        fmt.encode_record(Kind.WRITE, 1, 0, fmt.MAX_PAYLOAD + 1, 0, bytes(fmt.MAX_PAYLOAD + 1))


@given(st.integers(0, 1 << 62), st.integers(fmt.MIN_CAPACITY, 1 << 62), st.integers(1, 1 << 62),
       st.text(max_size=50).filter(lambda t: "\0" not in t), st.sampled_from([fmt.STATE_OK,
                                                                               fmt.STATE_OVERFLOWED]))
def test_header_round_trip(size: int, capacity: int, first_seq: int, ident: str, state: int) -> None:
    header = fmt.JournalHeader(image_size=size, capacity=capacity, first_seq=first_seq,
                               created_at=5, source_id=ident, target_id=ident[::-1])
    block = fmt.encode_header(header, state)
    assert len(block) == fmt.RECORDS_OFFSET
    assert fmt.decode_header(block) == (header, state)


def test_every_header_byte_is_checked() -> None:
    block = fmt.encode_header(HEADER)
    for pos in range(fmt.HEADER_SIZE):
        damaged = bytearray(block)
        damaged[pos] ^= 0x40
        with pytest.raises(JournalFormatError):
            fmt.decode_header(bytes(damaged), name="J")


@pytest.mark.parametrize(("data", "message"), [
    (b"", "truncated"),
    (b"MFSJ", "truncated"),
    (b"GARBAGE!" + bytes(4088), "not a mirrorfs journal"),
    (fmt.MAGIC + struct.pack("<I", 2) + bytes(4084), "version 2"),
    (fmt.encode_header(HEADER)[:100], "truncated"),
])
def test_header_refusals_say_why(data: bytes, message: str) -> None:
    with pytest.raises(JournalFormatError, match=message) as info:
        fmt.decode_header(data, name="J")
    assert "\n" not in str(info.value)


def test_the_state_word_is_outside_the_checksum_and_alone_in_its_sector() -> None:
    block = bytearray(fmt.encode_header(HEADER))
    block[fmt.STATE_OFFSET:] = b"\xff" * 8  # garbage there reads as "not trustworthy"
    header, state = fmt.decode_header(bytes(block))
    assert header == HEADER and state != fmt.STATE_OK
    assert fmt.HEADER_SIZE <= fmt.RECORDS_OFFSET - 512


def test_check_match_names_the_field() -> None:
    fmt.check_match(HEADER, size=1 << 30, source_id="/src/vm.raw", target_id="nbd://h:10809/x")
    with pytest.raises(JournalFormatError, match="for source '/src/vm.raw', not '/other'"):
        fmt.check_match(HEADER, size=1 << 30, source_id="/other", target_id="nbd://h:10809/x")
    with pytest.raises(JournalFormatError, match="for target"):
        fmt.check_match(HEADER, size=1 << 30, source_id="/src/vm.raw", target_id="/t")
    with pytest.raises(JournalFormatError, match="image has 4096"):
        fmt.check_match(HEADER, size=4096, source_id="/src/vm.raw", target_id="nbd://h:10809/x")


def test_encode_header_refuses_what_it_cannot_represent() -> None:
    with pytest.raises(UsageError, match="journal size"):
        fmt.encode_header(HEADER.replace(capacity=4096))
    with pytest.raises(UsageError, match="NUL"):
        fmt.encode_header(HEADER.replace(source_id="a\0b"))
    with pytest.raises(UsageError, match="shorter path"):  # the limit of the bitmap's identities
        fmt.encode_header(HEADER.replace(target_id="x" * fmt.IDENTITY_SIZE))


def test_the_format_page_states_the_structs_the_codec_uses() -> None:
    from pathlib import Path
    page = (Path(__file__).resolve().parents[1] / "docs" / "journal-format.md").read_text()
    assert f"`{fmt.HEADER_STRUCT.format.replace(' ', '')}`" in page
    assert f"`{fmt.RECORD_STRUCT.format.replace(' ', '')}`" in page
    assert f"Header ({fmt.HEADER_SIZE} bytes" in page
    assert f"| {fmt.CHECKSUM_OFFSET} " in page and f"| {fmt.STATE_OFFSET} " in page
    assert f"`0x{fmt.STATE_OVERFLOWED:x}`" in page and f"at least {fmt.MIN_CAPACITY}" in page
    assert f"1..{fmt.MAX_PAYLOAD}" in page
