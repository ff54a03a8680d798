"""Codec of the persistent bitmap file format (``docs/bitmap-format.md``): pure, no I/O.

The file is a 4096-byte header block followed by the bits. The header is one little-endian
``struct`` (:data:`HEADER_STRUCT`; version 1 files lack the trailing ``ended_at`` and
``source_ctime``), then (version 3) the ring of recently cleared clusters (:data:`RECENT_STRUCT`),
zero padded to ``bits_offset``; the bits are
``ceil(clusters / 64) * 8`` bytes where bit ``i`` of byte ``j`` is cluster ``8j + i``.

Everything that decides whether a file may be trusted lives here, so that ``open`` and
``inspect`` refuse exactly the same files: :func:`decode_header` checks magic, version, checksum
and the consistency of every field; :func:`check_file_size` the length of the file;
:func:`check_tail_bits` that the bits past the last cluster are zero. Every refusal is a
:class:`BitmapFormatError` naming the field and saying what to do.
"""

from __future__ import annotations

import dataclasses
import datetime
import struct
import zlib
from dataclasses import dataclass

from ..errors import BitmapFormatError, UsageError
from ..units import format_size

MAGIC = b"MFSBITMP"
#: the version written. Version 1 lacked ENDED: a reader of version 1 refuses version 2 files,
#: so an older mirrorfs can never read an ended bitmap as clean. Version 3 added INCONSISTENT,
#: which a version 2 reader would not know to honour, and the ring of recently cleared
#: clusters (``RECENT_*``).
VERSION = 3
READABLE_VERSIONS = (1, 2, 3)
#: where the bits start: one page, so they can be mapped (and msync'ed) on their own pages.
BITS_OFFSET = 4096
#: bytes of each identity field (UTF-8, NUL padded; at most IDENTITY_SIZE - 1 bytes of text).
IDENTITY_SIZE = 1024

FLAG_CLEAN = 1 << 0  # the file was closed cleanly
FLAG_PIVOTED = 1 << 1  # the job ended by pivot: the target is the live image
FLAG_ENDED = 1 << 2  # the job ended (any way): writes after ended_at are not recorded
#: the target is a mix of older and newer clusters (a copy driven by the bitmap is under way):
#: not a state the image ever had
FLAG_INCONSISTENT = 1 << 3
KNOWN_FLAGS = {1: FLAG_CLEAN | FLAG_PIVOTED, 2: FLAG_CLEAN | FLAG_PIVOTED | FLAG_ENDED,
               3: FLAG_CLEAN | FLAG_PIVOTED | FLAG_ENDED | FLAG_INCONSISTENT}

# magic, version, header_size, flags, granularity_bits, image_size, cluster_count, generation,
# bits_offset, bits_length, checksum, reserved, source_id, target_id, then (version 2) ended_at,
# source_ctime
HEADER_STRUCT = struct.Struct(f"<8sIIII QQQ QQ II {IDENTITY_SIZE}s{IDENTITY_SIZE}s QQ")
HEADER_SIZE = HEADER_STRUCT.size  # 2136
V1_HEADER_SIZE = HEADER_SIZE - 16  # 2120: no ended_at, no source_ctime
HEADER_SIZES = {1: V1_HEADER_SIZE, 2: HEADER_SIZE, 3: HEADER_SIZE}
CHECKSUM_OFFSET = 64
#: the flags and the checksum share the first 512-byte sector, which a disk writes whole: the
#: INCONSISTENT flag is switched by rewriting that sector in place (``flags_sector``).
FLAGS_SECTOR = 512
assert HEADER_SIZE <= BITS_OFFSET and CHECKSUM_OFFSET + 4 <= FLAGS_SECTOR

# Version 3: the clusters whose bits the last clear commits cleared, for a resume to sample.
# Outside the checksum on purpose: each clear commit updates it in place through the mapping,
# as it does the bits, with no header rewrite. A torn or stale ring only changes which clean
# clusters a resume compares, never what the file calls clean.
RECENT_OFFSET = HEADER_SIZE  # 2136, where version 2 had padding
RECENT_SLOTS = 64
#: recent_next (indexes ever recorded; the next goes to slot recent_next % RECENT_SLOTS), then
#: the slots: cluster index + 1, 0 for an empty slot
RECENT_STRUCT = struct.Struct(f"<Q{RECENT_SLOTS}Q")
RECENT_END = RECENT_OFFSET + RECENT_STRUCT.size  # 2656
assert RECENT_END <= BITS_OFFSET

_MIN_GRAN_BITS, _MAX_GRAN_BITS = 12, 26


def _clusters(image_size: int, granularity: int) -> int:
    return (image_size + granularity - 1) // granularity


def bits_length_for(clusters: int) -> int:
    """Bytes of the bit area for ``clusters`` clusters: whole 64-bit words."""
    return ((clusters + 63) // 64) * 8


def _flag(bit: int, doc: str) -> property:
    """A read-only boolean view of one bit of ``flags``."""
    return property(lambda header: bool(header.flags & bit), doc=doc)


@dataclass(frozen=True)
class BitmapHeader:
    """The decoded header of a bitmap file.

    Attributes:
        image_size: bytes of the image the bitmap describes.
        granularity: bytes per cluster (power of two, 4 KiB..64 MiB).
        source_id: identity of the source (the engine writes the source image's absolute path).
        target_id: identity of the target (absolute path of a local target, or its NBD URI).
        flags: FLAG_CLEAN | FLAG_PIVOTED | FLAG_ENDED | FLAG_INCONSISTENT.
        generation: bumped every time the file is opened for use.
        version: format version (3; 1 or 2 for a file written by an older mirrorfs).
        bits_offset: where the bits start.
        ended_at: when the job ended (ns since the Unix epoch), 0 unless FLAG_ENDED.
        source_ctime: the source image's ctime (ns) when an unmount closed the file, so that a
            resume can tell whether anything wrote to the image since; 0 if unknown or not shut
            down.
        recent_cleared: (version 3) indexes of the clusters cleared last, oldest first, at most
            RECENT_SLOTS; empty for older versions.
    """

    image_size: int
    granularity: int
    source_id: str = ""
    target_id: str = ""
    flags: int = 0
    generation: int = 0
    version: int = VERSION
    bits_offset: int = BITS_OFFSET
    ended_at: int = 0
    source_ctime: int = 0
    recent_cleared: tuple[int, ...] = ()

    @property
    def clusters(self) -> int:
        return _clusters(self.image_size, self.granularity)

    @property
    def words(self) -> int:
        return (self.clusters + 63) // 64

    @property
    def bits_length(self) -> int:
        return bits_length_for(self.clusters)

    @property
    def file_size(self) -> int:
        return self.bits_offset + self.bits_length

    clean = _flag(FLAG_CLEAN, "The file was closed in order.")
    pivoted = _flag(FLAG_PIVOTED, "The job ended by a pivot.")
    ended = _flag(FLAG_ENDED, "The job ended: writes after ``ended_at`` are not recorded.")
    inconsistent = _flag(FLAG_INCONSISTENT, "The target is not a state the image ever had (an "
                         "initial copy or a resync ran).")

    @property
    def legacy_clean(self) -> bool:
        """A clean version 1 file: it cannot say whether its job ended (and stopped recording)
        or the mount was only shut down, so it is not trusted as a resume point."""
        return self.version == 1 and self.clean and not self.pivoted

    def replace(self, **changes: object) -> "BitmapHeader":
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]


def _encode_identity(text: str, what: str) -> bytes:
    raw = text.encode("utf-8")
    if b"\0" in raw:
        raise UsageError(f"{what} identity {text!r} contains a NUL character")
    if len(raw) >= IDENTITY_SIZE:
        raise UsageError(f"{what} identity is {len(raw)} bytes long; at most {IDENTITY_SIZE - 1} "
                         f"bytes fit in a bitmap file: use a shorter path")
    return raw


def encode_header(header: BitmapHeader) -> bytes:
    """The header block: ``bits_offset`` bytes (struct, checksum filled in, zero padding).

    Raises:
        UsageError: a field cannot be represented (bad granularity, identity too long).
    """
    g = header.granularity
    if g <= 0 or g & (g - 1) or not _MIN_GRAN_BITS <= g.bit_length() - 1 <= _MAX_GRAN_BITS:
        raise UsageError(f"invalid granularity {g}: must be a power of two from 4K to 64M")
    if header.image_size < 0:
        raise UsageError(f"invalid image size {header.image_size}")
    if header.version != VERSION:
        raise UsageError(f"mirrorfs writes bitmap format version {VERSION}, not {header.version}")
    if header.flags & ~KNOWN_FLAGS[VERSION]:
        raise UsageError(f"unknown flag bits {header.flags:#x}")
    if header.ended != bool(header.ended_at):
        raise UsageError("ended_at must be set exactly when the ENDED flag is")
    if header.source_ctime and (header.ended or not header.clean):
        raise UsageError("source_ctime belongs to a file closed as shut down (clean, not ended)")
    fields = (MAGIC, header.version, HEADER_SIZE, header.flags, g.bit_length() - 1,
              header.image_size, header.clusters, header.generation, header.bits_offset,
              header.bits_length, 0, 0,
              _encode_identity(header.source_id, "source"),
              _encode_identity(header.target_id, "target"), header.ended_at, header.source_ctime)
    raw = bytearray(HEADER_STRUCT.pack(*fields))
    struct.pack_into("<I", raw, CHECKSUM_OFFSET, zlib.crc32(raw))
    return bytes(raw) + encode_recent(header.recent_cleared) + bytes(header.bits_offset - RECENT_END)


def encode_recent(clusters: tuple[int, ...] | list[int]) -> bytes:
    """The version 3 ring holding ``clusters`` (oldest first; only the last RECENT_SLOTS kept)."""
    kept = list(clusters)[-RECENT_SLOTS:]
    slots = [c + 1 for c in kept] + [0] * (RECENT_SLOTS - len(kept))
    return RECENT_STRUCT.pack(len(kept), *slots)


def decode_recent(data: bytes | memoryview, clusters: int) -> tuple[int, ...]:
    """The cluster indexes of a version 3 ring (``data`` from RECENT_OFFSET on), oldest first.
    Empty slots and indexes past the last cluster are left out: the ring is a hint."""
    recent_next, *slots = RECENT_STRUCT.unpack_from(data)
    if recent_next > RECENT_SLOTS:
        start = recent_next % RECENT_SLOTS
        slots = slots[start:] + slots[:start]
    else:
        slots = slots[:recent_next]
    return tuple(s - 1 for s in slots if 0 < s <= clusters)


def flags_sector(header: BitmapHeader) -> bytes:
    """The first ``FLAGS_SECTOR`` bytes of ``header``'s block: what changes when only its flags
    do (the flags and the checksum), to be written in place as one sector."""
    return encode_header(header)[:FLAGS_SECTOR]


def _decode_identity(raw: bytes, what: str, name: str) -> str:
    text, _, pad = raw.partition(b"\0")
    if pad.strip(b"\0"):
        raise BitmapFormatError(f"bitmap {name}: the {what} identity field has bytes after its NUL "
                                f"terminator: the header is corrupt; start a new job with --sync full")
    try:
        return text.decode("utf-8")
    except UnicodeDecodeError:
        raise BitmapFormatError(f"bitmap {name}: the {what} identity is not valid UTF-8: the header "
                                f"is corrupt; start a new job with --sync full") from None


def decode_header(data: bytes, *, name: str = "file") -> BitmapHeader:
    """Decode and validate a header.

    Args:
        data: the first bytes of the file (at least HEADER_SIZE, more is ignored).
        name: how to name the file in error messages (its path).

    Raises:
        BitmapFormatError: too short, wrong magic, unknown version, bad checksum, inconsistent
            fields; the message names the field and what to do.
    """
    if len(data) < 8 and MAGIC.startswith(bytes(data)):
        raise BitmapFormatError(f"bitmap {name} is truncated ({len(data)} bytes, the header alone is "
                                f"{HEADER_SIZE}): the file is damaged; start a new job with --sync full")
    if data[:8] != MAGIC:
        raise BitmapFormatError(f"{name} is not a mirrorfs bitmap file (magic {bytes(data[:8])!r}, "
                                f"expected {MAGIC!r}): pass the --bitmap file the job was started with")
    if len(data) < 12:
        raise BitmapFormatError(f"bitmap {name} is truncated ({len(data)} bytes, the header alone is "
                                f"{HEADER_SIZE}): the file is damaged; start a new job with --sync full")
    version = struct.unpack_from("<I", data, 8)[0]
    if version not in READABLE_VERSIONS:
        raise BitmapFormatError(f"bitmap {name} has format version {version}; this mirrorfs reads "
                                f"versions {', '.join(map(str, READABLE_VERSIONS[:-1]))} and "
                                f"{READABLE_VERSIONS[-1]}: use the "
                                f"mirrorfs release that wrote it")
    size = HEADER_SIZES[version]
    if len(data) < size:
        raise BitmapFormatError(f"bitmap {name} is truncated ({len(data)} bytes, the header alone is "
                                f"{size}): the file is damaged; start a new job with --sync full")
    if version >= 3 and len(data) < RECENT_END:
        raise BitmapFormatError(f"bitmap {name} is truncated ({len(data)} bytes, the header alone is "
                                f"{RECENT_END}): the file is damaged; start a new job with --sync full")
    if version == 1:
        fields = HEADER_STRUCT.unpack(bytes(data[:V1_HEADER_SIZE]) + bytes(16))
    else:
        fields = HEADER_STRUCT.unpack_from(data)
    (_, _, header_size, flags, gbits, image_size, clusters, generation, bits_offset, bits_length,
     checksum, reserved, src, tgt, ended_at, source_ctime) = fields
    raw = bytearray(data[:size])
    struct.pack_into("<I", raw, CHECKSUM_OFFSET, 0)
    computed = zlib.crc32(raw)
    if checksum != computed:
        raise BitmapFormatError(f"bitmap {name}: header checksum mismatch (stored {checksum:#010x}, "
                                f"computed {computed:#010x}): the header is corrupt and cannot be "
                                f"trusted; start a new job with --sync full")

    def bad(field: str, why: str) -> BitmapFormatError:
        return BitmapFormatError(f"bitmap {name}: invalid header field {field}: {why}; the file is "
                                 f"corrupt or not written by mirrorfs; start a new job with --sync full")

    if header_size != size:
        raise bad("header_size", f"{header_size}, expected {size} for version {version}")
    if flags & ~KNOWN_FLAGS[version]:
        raise bad("flags", f"unknown bits {flags & ~KNOWN_FLAGS[version]:#x}")
    if bool(flags & FLAG_ENDED) != bool(ended_at):
        raise bad("ended_at", f"{ended_at}, but the ENDED flag is "
                              f"{'set' if flags & FLAG_ENDED else 'clear'}")
    if source_ctime and (flags & FLAG_ENDED or not flags & FLAG_CLEAN):
        raise bad("source_ctime", f"{source_ctime}, but the file is not closed as shut down")
    if not _MIN_GRAN_BITS <= gbits <= _MAX_GRAN_BITS:
        raise bad("granularity_bits", f"{gbits}, expected {_MIN_GRAN_BITS}..{_MAX_GRAN_BITS}")
    granularity = 1 << gbits
    if clusters != _clusters(image_size, granularity):
        raise bad("cluster_count", f"{clusters}, but an image of {image_size} bytes at granularity "
                                   f"{granularity} has {_clusters(image_size, granularity)}")
    least = RECENT_END if version >= 3 else HEADER_SIZE
    if bits_offset % 4096 or bits_offset < least:
        raise bad("bits_offset", f"{bits_offset}, expected a multiple of 4096 of at least {least}")
    if bits_length != bits_length_for(clusters):
        raise bad("bits_length", f"{bits_length}, expected {bits_length_for(clusters)} for {clusters} "
                                 f"clusters")
    if reserved:
        raise bad("reserved", f"{reserved:#x}, expected 0")
    return BitmapHeader(image_size=image_size, granularity=granularity,
                        source_id=_decode_identity(src, "source", name),
                        target_id=_decode_identity(tgt, "target", name),
                        flags=flags, generation=generation, version=version, bits_offset=bits_offset,
                        ended_at=ended_at, source_ctime=source_ctime,
                        recent_cleared=decode_recent(data[RECENT_OFFSET:], clusters)
                        if version >= 3 else ())


def check_file_size(header: BitmapHeader, file_size: int, *, name: str = "file") -> None:
    """Refuse a file that is shorter or longer than its header says.

    Raises:
        BitmapFormatError: the size differs.
    """
    if file_size != header.file_size:
        kind = "truncated" if file_size < header.file_size else "longer than its header says"
        raise BitmapFormatError(
            f"bitmap {name} is {kind}: {file_size} bytes, expected {header.file_size} for an image of "
            f"{header.image_size} bytes ({format_size(header.image_size)}) at granularity "
            f"{format_size(header.granularity)}: the file is damaged; start a new job with --sync full")


def check_tail_bits(header: BitmapHeader, last_word: int, *, name: str = "file") -> None:
    """Refuse set bits past the last cluster (they cannot be written by mirrorfs).

    Args:
        header: the decoded header.
        last_word: the value of the last 64-bit word of the bits (0 when there are none).

    Raises:
        BitmapFormatError: a tail bit is set.
    """
    rem = header.clusters & 63
    if rem and last_word >> rem:
        raise BitmapFormatError(f"bitmap {name}: bits past the last cluster ({header.clusters}) are "
                                f"set: the file is corrupt; start a new job with --sync full")


def check_match(header: BitmapHeader, *, size: int, granularity: int | None = None,
                source_id: str | None = None, target_id: str | None = None,
                name: str = "file") -> None:
    """Refuse a bitmap that belongs to another image, granularity, source or target.

    Raises:
        BitmapFormatError: a field differs; the message says which and what to do.
    """
    # (what was asked, what the file holds, what differs and what to do short of a new job)
    checks = (
        (source_id, header.source_id,
         f"was made for source {header.source_id!r}, not {source_id!r}: use the bitmap of this "
         f"image's job"),
        (target_id, header.target_id,
         f"was made for target {header.target_id!r}, not {target_id!r}: mirror to the target "
         f"the bitmap belongs to"),
        (size, header.image_size,
         f"is for an image of {header.image_size} bytes, but the image has {size} bytes: use the "
         f"bitmap made for this image"),
        (granularity, header.granularity,
         f"has granularity {header.granularity}, but {granularity} was asked for: omit "
         f"--granularity to use the bitmap's"),
    )
    for asked, held, problem in checks:
        if asked is not None and held != asked:
            raise BitmapFormatError(f"bitmap {name} {problem}, or start a new job with --sync full")


def format_time(ns: int) -> str:
    """An ``ended_at`` value as an ISO 8601 UTC time, to the second."""
    when = datetime.datetime.fromtimestamp(ns / 1e9, tz=datetime.timezone.utc)
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


def check_not_pivoted(header: BitmapHeader, *, name: str = "file") -> None:
    """Refuse a pivoted file, even for a verified resync: the target holds the newer data, and a
    resync from the old source would overwrite it. Checked before the identities: after a pivot
    the image is served from the target, so its identity no longer matches either.

    Raises:
        BitmapFormatError: the job ended by pivot.
    """
    if header.pivoted:
        when = f" at {format_time(header.ended_at)}" if header.ended_at else ""
        raise BitmapFormatError(
            f"bitmap {name} records that its job ended by pivot{when}: the target is the live image "
            f"and the source is older; start a new job (--sync full) with a new bitmap")


def check_resumable(header: BitmapHeader, *, verify: bool, name: str = "file") -> None:
    """Refuse to resume (``--sync dirty``) from a bitmap whose bits no longer cover every write.

    An ended file (and a clean version 1 file, which cannot tell) is accepted only for a verified
    resync, which compares every cluster.

    Raises:
        BitmapFormatError: the file cannot be resumed from; the message says what to do.
    """
    check_not_pivoted(header, name=name)
    if verify:
        return
    if header.ended:
        raise BitmapFormatError(
            f"bitmap {name} stopped recording when its job ended at {format_time(header.ended_at)}: "
            f"later writes are not in it; resume with --verify-resync (compares every cluster) "
            f"or start a new job with --sync full")
    if header.legacy_clean:
        raise BitmapFormatError(
            f"bitmap {name} has format version 1, which cannot tell whether its job ended and "
            f"stopped recording: resume with --verify-resync (compares every cluster) or start a "
            f"new job with --sync full")


def check_source_unchanged(header: BitmapHeader, ctime: int | None, *, verify: bool,
                           name: str = "file") -> None:
    """Refuse to resume from a shut-down file when the image changed after the unmount: nothing
    recorded those writes (a mount that served the image before the job was restarted, a write
    behind the mount).

    Args:
        ctime: the source image's ctime now (ns), None if it cannot be read.

    Raises:
        BitmapFormatError: the image's ctime is not the one recorded at the unmount.
    """
    if verify or not header.source_ctime or ctime == header.source_ctime:
        return
    raise BitmapFormatError(
        f"bitmap {name}: the image {header.source_id} changed after its job was stopped by an "
        f"unmount (its ctime differs), and nothing recorded those writes; resume with "
        f"--verify-resync (compares every cluster) or start a new job with --sync full")
