"""Host side of the guest's self-checking records and markers (twin of ``guestrec.c``).

A record is one 4 KiB block (little endian)::

    0     8   magic b"MFSREC01"
    8     8   run id
    16    8   sequence number, 1, 2, 3, ...
    24    8   slot index (byte offset / 4096)
    32    4060 payload (xorshift64* stream from run id and sequence number)
    4092  4   CRC-32 (zlib) of bytes 0..4091

The guest writer puts sequence number ``i + 1`` into slot ``i``, one O_DIRECT write at a time,
so a disk that holds what the guest wrote is: slots ``0 .. N-1`` valid records of one run with
sequence numbers ``1 .. N``, then zeroes to the end. :func:`verify_file` demands exactly that;
anything else (a torn or stale block, a gap, data after the end) raises :class:`RecordError`.
"""

from __future__ import annotations

import struct
import subprocess
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path

from . import GuestError, RecordError

RECORD_SIZE = 4096
MAGIC = b"MFSREC01"
CRC_OFFSET = RECORD_SIZE - 4
PAYLOAD_OFFSET = 32
SECTOR = 512
_ZERO = bytes(RECORD_SIZE)
_CHUNK = 1 << 20
_M64 = (1 << 64) - 1


@dataclass(frozen=True)
class Record:
    """One valid record as found on a disk."""

    slot: int
    seq: int
    run_id: int


@dataclass(frozen=True)
class RecordRun:
    """The unbroken run of records on a disk: sequence numbers ``first .. last``."""

    records: list[Record]
    run_id: int | None
    slots: int

    @property
    def count(self) -> int:
        """Number of records."""
        return len(self.records)

    @property
    def first(self) -> int:
        """First sequence number (1), or 0 when there are none."""
        return self.records[0].seq if self.records else 0

    @property
    def last(self) -> int:
        """Last sequence number, or 0 when there are none."""
        return self.records[-1].seq if self.records else 0


def make_record(run_id: int, seq: int, slot: int | None = None) -> bytes:
    """The exact 4 KiB the guest writer writes for ``seq`` (into ``slot``, default ``seq - 1``)."""
    slot = seq - 1 if slot is None else slot
    head = MAGIC + struct.pack("<QQQ", run_id, seq, slot)
    x = (run_id ^ (seq * 0x9E3779B97F4A7C15) ^ 0xD1B54A32D192ED03) & _M64 or 1
    words = []
    for _ in range((CRC_OFFSET - PAYLOAD_OFFSET) // 8):
        x ^= x >> 12
        x ^= (x << 25) & _M64
        x ^= x >> 27
        words.append((x * 0x2545F4914F6CDD1D) & _M64)
    body = head + struct.pack(f"<{len(words)}Q", *words) + b"\xa5" * 4
    return body + struct.pack("<I", zlib.crc32(body))


def check_record(block: bytes, slot: int) -> Record:
    """Parse the record in ``block`` read from ``slot``.

    Raises:
        RecordError: bad magic, bad checksum, or the record belongs to another slot.
    """
    if block[:8] != MAGIC:
        raise RecordError(f"slot {slot}: bad-magic ({block[:8]!r})")
    crc, = struct.unpack_from("<I", block, CRC_OFFSET)
    if zlib.crc32(block[:CRC_OFFSET]) != crc:
        raise RecordError(f"slot {slot}: bad-checksum (torn or corrupted record)")
    run_id, seq, where = struct.unpack_from("<QQQ", block, 8)
    if where != slot:
        raise RecordError(f"slot {slot}: misplaced (record written for slot {where})")
    return Record(slot=slot, seq=seq, run_id=run_id)


def verify_file(path: Path, *, fmt: str = "raw") -> RecordRun:
    """Check that ``path`` holds an unbroken run of records from slot 0, then only zeroes.

    Args:
        path: the disk image.
        fmt: ``raw``, or any format ``qemu-img convert`` reads (converted to a temporary raw).

    Raises:
        RecordError: a corrupt record, a sequence gap, a second run id, or data after the end.
        GuestError: ``qemu-img convert`` failed.
    """
    if fmt != "raw":
        with tempfile.TemporaryDirectory(prefix="mirrorfs-records.") as tmp:
            raw = Path(tmp) / "disk.raw"
            proc = subprocess.run(["qemu-img", "convert", "-U", "-f", fmt, "-O", "raw",
                                   str(path), str(raw)], capture_output=True, text=True)
            if proc.returncode != 0:
                raise GuestError(f"qemu-img convert {path}: {proc.stderr.strip()}")
            return verify_file(raw)
    records: list[Record] = []
    run_id: int | None = None
    end: int | None = None
    slot = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            for off in range(0, len(chunk) - RECORD_SIZE + 1, RECORD_SIZE):
                block = chunk[off:off + RECORD_SIZE]
                if block == _ZERO:
                    if end is None:
                        end = slot
                elif end is not None:
                    raise RecordError(f"slot {slot}: data-after-end (records end at slot {end},"
                                      f" {len(records)} records before)")
                else:
                    rec = check_record(block, slot)
                    if rec.seq != slot + 1:
                        raise RecordError(f"slot {slot}: sequence-gap (holds seq {rec.seq},"
                                          f" expected {slot + 1})")
                    if run_id is None:
                        run_id = rec.run_id
                    elif rec.run_id != run_id:
                        raise RecordError(f"slot {slot}: run-id-mismatch"
                                          f" ({rec.run_id} != {run_id})")
                    records.append(rec)
                slot += 1
    return RecordRun(records=records, run_id=run_id, slots=slot)


def assert_same_records(a: Path, b: Path, count: int) -> None:
    """Check that raw files ``a`` and ``b`` hold identical bytes in slots ``0 .. count-1``
    (e.g. the source and the target up to the pivot).

    Raises:
        RecordError: the first slot that differs.
    """
    with open(a, "rb") as fa, open(b, "rb") as fb:
        for base in range(0, count, _CHUNK // RECORD_SIZE):
            n = min(count - base, _CHUNK // RECORD_SIZE) * RECORD_SIZE
            ca, cb = fa.read(n), fb.read(n)
            if ca != cb:
                slot = base + next((i for i in range(0, n, RECORD_SIZE)
                                    if ca[i:i + RECORD_SIZE] != cb[i:i + RECORD_SIZE]),
                                   n) // RECORD_SIZE
                raise RecordError(f"{a} and {b} differ at slot {slot} (seq {slot + 1})")


# ---- markers (guest mode write-marker) ------------------------------------------------------

def marker_regions(size: int) -> list[tuple[int, int]]:
    """``(offset, length)`` of the regions the guest's write-marker mode writes on a disk of
    ``size`` bytes (at least 2 MiB): the first block, a block pair across the 64 KiB boundary,
    128 KiB at 1 MiB, and the last block."""
    return [(0, 4096), (61440, 8192), (1 << 20, 128 << 10), (size - 4096, 4096)]


def marker_bytes(token: str, offset: int, length: int) -> bytes:
    """The bytes write-marker puts at ``offset`` (sector aligned) for ``token``."""
    out = bytearray()
    for o in range(offset, offset + length, SECTOR):
        head = f"MFSMARK {token} {o:016x}\n".encode()
        out += head + bytes([(o // SECTOR) & 0xFF]) * (SECTOR - len(head))
    return bytes(out)


def check_markers(path: Path, token: str) -> None:
    """Check that the raw file ``path`` holds the markers for ``token`` in every region.

    Raises:
        RecordError: a region differs; says which and the first differing offset.
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        for offset, length in marker_regions(size):
            want = marker_bytes(token, offset, length)
            f.seek(offset)
            have = f.read(length)
            if have != want:
                first = next((i for i, (a, b) in enumerate(zip(have, want)) if a != b),
                             min(len(have), len(want)))
                raise RecordError(f"{path}: marker region at {offset} (+{length}) differs first"
                                  f" at byte {offset + first}: {have[first:first + 40]!r}")
