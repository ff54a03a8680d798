"""Codec of the write journal file format (``docs/journal-format.md``): pure, no I/O.

A journal file is a 4096-byte header block followed by records, back to back. The header block
holds the header struct (:data:`HEADER_STRUCT`, CRC-32 checked) and, in its last 8 bytes, the
*state word* (0 while the journal is trustworthy, :data:`STATE_OVERFLOWED` once it missed a
write). Each record is a 48-byte record header (:data:`RECORD_STRUCT`) and, for WRITE, its
payload; its CRC-32 covers both.

Everything that decides whether bytes may be trusted lives here, so that the file class and any
reader refuse exactly the same bytes: :func:`decode_header` refuses a bad header with a
:class:`JournalFormatError` (the file cannot be used); :func:`decode_record_header` and
:func:`check_payload` return None for a record that is not whole and valid, which ends the
journal (a torn tail after a crash looks exactly like that).
"""

from __future__ import annotations

import dataclasses
import enum
import struct
import zlib
from dataclasses import dataclass

# The identities are the job's bitmap's, encoded the same way (what fits one fits the other).
from ..bitmap.format import IDENTITY_SIZE, _encode_identity
from ..errors import JournalFormatError, UsageError

MAGIC = b"MFSJOURN"
VERSION = 1
#: where the first record starts; the header block is one page.
RECORDS_OFFSET = 4096

# magic, version, header_size, flags, image_size, capacity, first_seq, created_at, source_id,
# target_id, checksum
HEADER_STRUCT = struct.Struct(f"<8sIII QQQQ {IDENTITY_SIZE}s{IDENTITY_SIZE}s I")
HEADER_SIZE = HEADER_STRUCT.size  # 2092
CHECKSUM_OFFSET = HEADER_SIZE - 4
#: the state word: alone in the last sector of the header block, so that rewriting it in place
#: can tear nothing else (a sector is written whole or not at all).
STATE_OFFSET = RECORDS_OFFSET - 8
STATE_STRUCT = struct.Struct("<Q")
STATE_OK = 0
STATE_OVERFLOWED = int.from_bytes(b"OVERFLOW", "little")
assert HEADER_SIZE <= RECORDS_OFFSET - 512

RECORD_MAGIC = b"MFJR"
# magic, kind, flags, seq, offset, length, time_ns, reserved, checksum
RECORD_STRUCT = struct.Struct("<4sHH QQQQ II")
RECORD_HEADER_SIZE = RECORD_STRUCT.size  # 48
#: the largest WRITE payload in one record; longer writes are split (a reader refuses longer
#: lengths without reading them, so a garbage length never makes it read a gigabyte).
MAX_PAYLOAD = 1 << 20
#: the smallest capacity a journal may have: the header block and one largest record.
MIN_CAPACITY = RECORDS_OFFSET + RECORD_HEADER_SIZE + MAX_PAYLOAD


class Kind(enum.IntEnum):
    """What a record says."""

    #: the guest wrote ``payload`` at ``offset`` (``length`` bytes).
    WRITE = 1
    #: the guest zeroed or discarded ``length`` bytes at ``offset``; no payload.
    ZERO = 2
    #: the guest flushed: every earlier record must be on the target, flushed, before any later.
    FLUSH = 3
    #: records up to ``offset`` (a sequence number) are on the target and flushed there: a
    #: restarted replay begins after them. ``length`` is 0.
    APPLIED = 4


@dataclass(frozen=True)
class JournalHeader:
    """The decoded header of a journal file.

    Attributes:
        image_size: bytes of the image whose writes the journal holds.
        capacity: the bound on the file's size in bytes (``--journal-size``).
        first_seq: the sequence number of the first record (numbers go on across resets, so a
            record left from before a reset can never pass for a current one).
        created_at: when this journal (or its last reset) was written, ns since the Unix epoch.
        source_id: identity of the source image (as a bitmap's).
        target_id: identity of the target (as a bitmap's).
    """

    image_size: int
    capacity: int
    first_seq: int = 1
    created_at: int = 0
    source_id: str = ""
    target_id: str = ""
    version: int = VERSION

    def replace(self, **changes: object) -> "JournalHeader":
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]


@dataclass(frozen=True)
class RecordHeader:
    """A decoded record header (its checksum not yet checked against the payload)."""

    kind: Kind
    seq: int
    offset: int
    length: int
    time_ns: int
    checksum: int

    @property
    def payload_length(self) -> int:
        return self.length if self.kind is Kind.WRITE else 0

    @property
    def size(self) -> int:
        """Bytes of the whole record in the file."""
        return RECORD_HEADER_SIZE + self.payload_length


@dataclass(frozen=True)
class Record:
    """One journal entry as replay yields it.

    Attributes:
        kind: WRITE, ZERO or FLUSH (APPLIED records are the journal's own bookkeeping).
        seq: its sequence number; replay yields them consecutively.
        offset: image offset (for APPLIED: the sequence number applied through).
        length: bytes the record covers in the image.
        time_ns: when it was appended (ns since the Unix epoch): the recovery point's clock.
        payload: the data of a WRITE, else empty.
    """

    kind: Kind
    seq: int
    offset: int
    length: int
    time_ns: int
    payload: bytes = b""


def encode_header(header: JournalHeader, state: int = STATE_OK) -> bytes:
    """The header block: RECORDS_OFFSET bytes (struct with its checksum, padding, state word).

    Raises:
        UsageError: a field cannot be represented.
    """
    if header.version != VERSION:
        raise UsageError(f"mirrorfs writes journal format version {VERSION}, not {header.version}")
    if header.image_size < 0 or header.first_seq < 1 or header.created_at < 0:
        raise UsageError("journal header fields must not be negative (and first_seq at least 1)")
    if header.capacity < MIN_CAPACITY:
        raise UsageError(f"invalid journal size {header.capacity}: at least {MIN_CAPACITY} bytes "
                         f"(or 0 to turn the journal off)")
    raw = bytearray(HEADER_STRUCT.pack(
        MAGIC, VERSION, HEADER_SIZE, 0, header.image_size, header.capacity, header.first_seq,
        header.created_at, _encode_identity(header.source_id, "source"),
        _encode_identity(header.target_id, "target"), 0))
    struct.pack_into("<I", raw, CHECKSUM_OFFSET, zlib.crc32(raw[:CHECKSUM_OFFSET]))
    block = bytearray(RECORDS_OFFSET)
    block[:HEADER_SIZE] = raw
    STATE_STRUCT.pack_into(block, STATE_OFFSET, state)
    return bytes(block)


def _decode_identity(raw: bytes, what: str, name: str) -> str:
    text, _, pad = raw.partition(b"\0")
    try:
        if pad.strip(b"\0"):
            raise UnicodeDecodeError("utf-8", b"", 0, 1, "bytes after the NUL")
        return text.decode("utf-8")
    except UnicodeDecodeError:
        raise JournalFormatError(f"journal {name}: the {what} identity field is corrupt: "
                                 f"remove the journal; the job resyncs from its bitmap") from None


def decode_header(data: bytes, *, name: str = "file") -> tuple[JournalHeader, int]:
    """Decode and validate a header block.

    Args:
        data: the first bytes of the file (RECORDS_OFFSET, or at least HEADER_SIZE).
        name: how to name the file in error messages.

    Returns:
        the header and the state word (:data:`STATE_OK` unless the journal overflowed; a block
        too short to hold it reads as STATE_OK).

    Raises:
        JournalFormatError: not a journal, unknown version, checksum mismatch, bad field.
    """
    fix = "remove the journal; the job resyncs from its bitmap"
    if bytes(data[:8]) != MAGIC:
        if len(data) < 8 and MAGIC.startswith(bytes(data)):
            raise JournalFormatError(f"journal {name} is truncated ({len(data)} bytes): {fix}")
        raise JournalFormatError(f"{name} is not a mirrorfs journal file (magic {bytes(data[:8])!r}, "
                                 f"expected {MAGIC!r})")
    if len(data) < 12:
        raise JournalFormatError(f"journal {name} is truncated ({len(data)} bytes): {fix}")
    version = struct.unpack_from("<I", data, 8)[0]
    if version != VERSION:
        raise JournalFormatError(f"journal {name} has format version {version}; this mirrorfs "
                                 f"reads version {VERSION}: use the mirrorfs release that wrote it")
    if len(data) < HEADER_SIZE:
        raise JournalFormatError(f"journal {name} is truncated ({len(data)} bytes, the header "
                                 f"alone is {HEADER_SIZE}): {fix}")
    (_, _, header_size, flags, image_size, capacity, first_seq, created_at, src, tgt,
     checksum) = HEADER_STRUCT.unpack_from(data)
    computed = zlib.crc32(bytes(data[:CHECKSUM_OFFSET]))
    if checksum != computed:
        raise JournalFormatError(f"journal {name}: header checksum mismatch (stored {checksum:#010x}, "
                                 f"computed {computed:#010x}): {fix}")
    for field, value, ok in (("header_size", header_size, header_size == HEADER_SIZE),
                             ("flags", flags, flags == 0),
                             ("capacity", capacity, capacity >= MIN_CAPACITY),
                             ("first_seq", first_seq, first_seq >= 1)):
        if not ok:
            raise JournalFormatError(f"journal {name}: invalid header field {field}: {value}: {fix}")
    state = STATE_OK
    if len(data) >= RECORDS_OFFSET:
        state = STATE_STRUCT.unpack_from(data, STATE_OFFSET)[0]
    header = JournalHeader(image_size=image_size, capacity=capacity, first_seq=first_seq,
                           created_at=created_at, source_id=_decode_identity(src, "source", name),
                           target_id=_decode_identity(tgt, "target", name))
    return header, state


def check_match(header: JournalHeader, *, size: int, source_id: str, target_id: str,
                name: str = "file") -> None:
    """Refuse a journal of another image or target, or of an image that changed size.

    Raises:
        JournalFormatError: a field differs; the message says which.
    """
    for what, have, want in (("source", header.source_id, source_id),
                             ("target", header.target_id, target_id)):
        if have != want:
            raise JournalFormatError(f"journal {name} was made for {what} {have!r}, not {want!r}: "
                                     f"give the job its own journal")
    if header.image_size != size:
        raise JournalFormatError(f"journal {name} is for an image of {header.image_size} bytes, but "
                                 f"the image has {size}: remove the journal; the job resyncs from "
                                 f"its bitmap")


def encode_record(kind: Kind, seq: int, offset: int, length: int, time_ns: int,
                  payload: bytes | memoryview = b"") -> bytes:
    """The record header for these fields, its checksum computed over header and payload.

    The payload is not copied into the result: write it right after the header (``pwritev``).

    Raises:
        UsageError: the payload does not match the kind and length, or a field is out of range.
    """
    want = length if kind is Kind.WRITE else 0
    if len(payload) != want or (kind is Kind.WRITE and length > MAX_PAYLOAD):
        raise UsageError(f"a {kind.name} record of length {length} takes {want} payload bytes "
                         f"(at most {MAX_PAYLOAD}), not {len(payload)}")
    if min(seq, offset, length, time_ns) < 0 or seq < 1:
        raise UsageError("journal record fields must not be negative")
    head = bytearray(RECORD_STRUCT.pack(RECORD_MAGIC, kind, 0, seq, offset, length, time_ns, 0, 0))
    crc = zlib.crc32(payload, zlib.crc32(head[:RECORD_HEADER_SIZE - 4]))
    struct.pack_into("<I", head, RECORD_HEADER_SIZE - 4, crc)
    return bytes(head)


def decode_record_header(data: bytes | memoryview, *, expected_seq: int) -> RecordHeader | None:
    """The record header in ``data`` if it can start a valid record with that sequence number.

    None for anything else: too short, wrong magic, unknown kind or flags, a sequence number out
    of order, a length a record cannot have. A reader stops at the first None: that is where the
    journal ends (a torn or stale tail).
    """
    if len(data) < RECORD_HEADER_SIZE:
        return None
    magic, kind, flags, seq, offset, length, time_ns, reserved, checksum = \
        RECORD_STRUCT.unpack_from(data)
    if magic != RECORD_MAGIC or flags or reserved or seq != expected_seq:
        return None
    try:
        kind = Kind(kind)
    except ValueError:
        return None
    if kind is Kind.WRITE and not 0 < length <= MAX_PAYLOAD:
        return None
    if kind in (Kind.FLUSH, Kind.APPLIED) and length:
        return None
    if kind is Kind.APPLIED and offset >= seq:
        return None
    return RecordHeader(kind, seq, offset, length, time_ns, checksum)


def check_payload(header_bytes: bytes | memoryview, record: RecordHeader,
                  payload: bytes | memoryview) -> bool:
    """Whether the record's checksum covers exactly these header bytes and this payload."""
    if len(payload) != record.payload_length:
        return False
    crc = zlib.crc32(payload, zlib.crc32(bytes(header_bytes[:RECORD_HEADER_SIZE - 4])))
    return crc == record.checksum


def decode_records(data: bytes, *, first_seq: int) -> tuple[list[Record], int]:
    """Every whole, valid record at the start of ``data`` (records only, no header block).

    For tests and tools that hold the bytes in memory; the file class reads record by record.

    Returns:
        the records (APPLIED included) and the number of bytes they take; the rest is the tail a
        reader discards.
    """
    records: list[Record] = []
    pos = 0
    view = memoryview(data)
    while True:
        rec = decode_record_header(view[pos:], expected_seq=first_seq + len(records))
        if rec is None:
            break
        start = pos + RECORD_HEADER_SIZE
        payload = view[start:start + rec.payload_length]
        if not check_payload(view[pos:start], rec, payload):
            break
        records.append(Record(rec.kind, rec.seq, rec.offset, rec.length, rec.time_ns, bytes(payload)))
        pos = start + rec.payload_length
    return records, pos
