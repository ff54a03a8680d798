"""The bitmap file format: an independent reader written from docs/bitmap-format.md alone agrees
with what PersistentBitmap writes, and every bad or mismatched file is refused unchanged."""

from __future__ import annotations

import hashlib
import os
import random
import struct
import time
import zlib

import numpy as np
import pytest

from mirrorfs.bitmap import PersistentBitmap
from mirrorfs.bitmap.format import BitmapHeader, decode_header, encode_header
from mirrorfs.errors import BitmapFormatError, UsageError

# ---- the independent reader: written from docs/bitmap-format.md, imports nothing of mirrorfs ----
DOC_HEADER = struct.Struct("<8sIIIIQQQQQII1024s1024sQQ")


def doc_read(path: str) -> dict:
    """Parse a bitmap file following docs/bitmap-format.md; assert every rule it states."""
    data = open(path, "rb").read()
    (magic, version, header_size, flags, gbits, image_size, cluster_count, generation, bits_offset,
     bits_length, checksum, reserved, src, tgt, ended_at, source_ctime) = DOC_HEADER.unpack_from(data, 0)
    assert DOC_HEADER.size == 2136
    assert magic == b"MFSBITMP"
    assert version == 3
    assert header_size == 2136
    zeroed = bytearray(data[:header_size])
    zeroed[64:68] = b"\0\0\0\0"
    assert zlib.crc32(zeroed) == checksum
    assert flags & ~15 == 0 and reserved == 0
    assert bool(flags & 4) == (ended_at != 0)
    assert source_ctime == 0 or flags & 5 == 1  # only in a file shut down (clean, not ended)
    assert 12 <= gbits <= 26
    g = 1 << gbits
    assert cluster_count == -(-image_size // g)
    assert bits_offset == 4096 and bits_length == -(-cluster_count // 64) * 8
    assert len(data) == bits_offset + bits_length
    # the ring of recently cleared clusters: recent_next, then 64 slots of cluster + 1 (0 empty)
    recent_next, *slots = struct.unpack_from("<Q64Q", data, 2136)
    start = recent_next % 64 if recent_next > 64 else 0
    recent = [s - 1 for s in (slots[start:] + slots[:start])[:recent_next] if 0 < s <= cluster_count]
    assert data[2656:bits_offset] == bytes(bits_offset - 2656)
    bits = data[bits_offset:bits_offset + bits_length]
    dirty = {8 * j + i for j, byte in enumerate(bits) for i in range(8) if byte >> i & 1}
    assert all(c < cluster_count for c in dirty), "tail bits must be zero"

    def ident(raw: bytes) -> str:
        text, _, pad = raw.partition(b"\0")
        assert set(pad) <= {0}
        return text.decode("utf-8")

    return {"image_size": image_size, "granularity": g, "clusters": cluster_count,
            "generation": generation, "clean": bool(flags & 1), "pivoted": bool(flags & 2),
            "ended": bool(flags & 4), "inconsistent": bool(flags & 8), "ended_at": ended_at,
            "source_ctime": source_ctime,
            "source": ident(src), "target": ident(tgt), "dirty": dirty, "recent": recent}
# ------------------------------------------------------------------------------------------------


def model_mark(dirty: set[int], off: int, length: int, g: int) -> None:
    if length:
        dirty.update(range(off // g, (off + length - 1) // g + 1))


@pytest.mark.parametrize("size,g", [(1 << 30, 65536), (10 * 4096 * 64 + 12345, 4096),
                                    (3 * (64 << 20) + 1, 64 << 20), (65536 * 64, 65536)])
def test_independent_reader_agrees_on_every_field_and_bit(tmp_path, size, g):
    path = str(tmp_path / "job.bitmap")
    rng = random.Random(size)
    src, tgt = "/srv/images/vm disk ü.qcow2", "nbd+unix:///export?socket=/run/nbd.sock"
    bm = PersistentBitmap.create(path, size, g, source_id=src, target_id=tgt, fill=False)
    model: set[int] = set()
    for _ in range(200):
        off = rng.randrange(size)
        length = rng.randrange(min(size - off, 5 * g) + 1)
        bm.mark(off, length)
        model_mark(model, off, length, g)
    bm.mark(size - 1, 1)  # the (possibly partial) last cluster
    model_mark(model, size - 1, 1, g)

    while_open = doc_read(path)  # the bits are in the file while in use
    assert while_open["dirty"] == model
    assert not while_open["clean"] and while_open["generation"] == 1
    bm.close()

    got = doc_read(path)
    assert got == {"image_size": size, "granularity": g, "clusters": -(-size // g), "generation": 1,
                   "clean": True, "pivoted": False, "ended": False, "inconsistent": False, "ended_at": 0,
                   "source_ctime": 0,
                   "source": src, "target": tgt, "dirty": model, "recent": []}

    again = PersistentBitmap.open(path, size=size, granularity=g, source_id=src, target_id=tgt)
    assert again.was_clean
    assert set(np.flatnonzero(np.unpackbits(np.frombuffer(again.to_bytes(), np.uint8),
                                            bitorder="little")).tolist()) == model
    assert doc_read(path)["generation"] == 2 and not doc_read(path)["clean"]
    again.close(pivoted=True)
    final = doc_read(path)
    assert final["clean"] and final["pivoted"] and final["ended"] and final["generation"] == 2
    assert abs(final["ended_at"] / 1e9 - time.time()) < 60


def test_fill_sets_every_cluster_and_no_tail_bit(tmp_path):
    path = str(tmp_path / "full.bitmap")
    size = 100 * 65536 + 7  # 101 clusters: two words, 27 tail bits
    PersistentBitmap.create(path, size, source_id="/a", target_id="/b", fill=True).close()
    got = doc_read(path)
    assert got["dirty"] == set(range(101))
    assert os.path.getsize(path) == 4096 + 16


def test_doc_example_byte(tmp_path):
    """The worked example at the end of docs/bitmap-format.md."""
    path = str(tmp_path / "ex.bitmap")
    with PersistentBitmap.create(path, 1 << 30, 65536, source_id="", target_id="", fill=False) as bm:
        bm.mark(1 << 20, 4096)
    data = open(path, "rb").read()
    assert len(data) == 6144 and data[4096 + 2] == 0x01 and data[4096:].count(0) == 2047


def test_codec_round_trip_and_checksum_position():
    h = BitmapHeader(image_size=12345678, granularity=1 << 16, source_id="s", target_id="t",
                     flags=7, generation=7, ended_at=1234567890 * 10**9)
    raw = encode_header(h)
    assert len(raw) == 4096 and decode_header(raw) == h
    assert struct.unpack_from("<I", raw, 64)[0] == zlib.crc32(raw[:64] + b"\0" * 4 + raw[68:2136])


def _make(tmp_path, name="b.bitmap", size=1 << 24) -> str:
    path = str(tmp_path / name)
    with PersistentBitmap.create(path, size, 65536, source_id="/src/img", target_id="/dst/img",
                                 fill=False) as bm:
        bm.mark(65536 * 3, 10)
    return path


def _patch_header(path: str, offset: int, fmt: str, value, *, fix_checksum: bool) -> None:
    data = bytearray(open(path, "rb").read())
    struct.pack_into(fmt, data, offset, value)
    if fix_checksum:
        struct.pack_into("<I", data, 64, 0)
        struct.pack_into("<I", data, 64, zlib.crc32(data[:2136]))
    open(path, "wb").write(data)


def _digest(path: str) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.mark.parametrize("damage,expect", [
    ("truncate", "is truncated: 4096 bytes, expected 4128"),
    ("extend", "longer than its header says"),
    ("magic", "is not a mirrorfs bitmap file"),
    ("checksum", "header checksum mismatch"),
    ("version", "format version 4; this mirrorfs reads versions 1, 2 and 3"),
    ("clusters", "invalid header field cluster_count"),
    ("flags", "invalid header field flags"),
    ("granularity", "invalid header field granularity_bits"),
    ("tail", "bits past the last cluster"),
    ("empty", "truncated (0 bytes"),
])
def test_open_refuses_damaged_files_and_changes_nothing(tmp_path, damage, expect):
    size = (1 << 24) if damage != "tail" else (1 << 24) - 65536 * 3  # 253 clusters: 3 tail bits
    path = _make(tmp_path, size=size)
    data = bytearray(open(path, "rb").read())
    if damage == "truncate":
        data = data[:4096]
    elif damage == "extend":
        data += b"\0" * 8
    elif damage == "magic":
        data[0:8] = b"QFI\xfb\0\0\0\3"
    elif damage == "checksum":
        data[200] ^= 0x40
    elif damage == "empty":
        data = bytearray()
    open(path, "wb").write(data)
    if damage == "version":
        _patch_header(path, 8, "<I", 4, fix_checksum=True)
    elif damage == "clusters":
        _patch_header(path, 32, "<Q", 999, fix_checksum=True)
    elif damage == "flags":
        _patch_header(path, 16, "<I", 1 << 5, fix_checksum=True)
    elif damage == "granularity":
        _patch_header(path, 20, "<I", 11, fix_checksum=True)
    elif damage == "tail":
        raw = bytearray(open(path, "rb").read())
        raw[-1] |= 0x80  # 253 clusters: the top bits of the last word are tail bits
        open(path, "wb").write(raw)
    before = _digest(path)
    with pytest.raises(BitmapFormatError) as info:
        PersistentBitmap.open(path, size=size)
    assert expect in str(info.value)
    assert path in str(info.value)
    assert "\n" not in str(info.value)
    assert _digest(path) == before
    assert sorted(os.listdir(tmp_path)) == ["b.bitmap"]  # no temp file left behind


@pytest.mark.parametrize("kw,expect", [
    ({"size": (1 << 24) + 1}, "is for an image of 16777216 bytes, but the image has 16777217 bytes"),
    ({"size": 1 << 24, "granularity": 4096}, "has granularity 65536, but 4096 was asked for"),
    ({"size": 1 << 24, "source_id": "/src/other"}, "was made for source '/src/img', not '/src/other'"),
    ({"size": 1 << 24, "target_id": "nbd://h/e"}, "was made for target '/dst/img', not 'nbd://h/e'"),
])
def test_open_refuses_mismatch(tmp_path, kw, expect):
    path = _make(tmp_path)
    before = _digest(path)
    with pytest.raises(BitmapFormatError, match=expect):
        PersistentBitmap.open(path, **kw)
    assert _digest(path) == before


def test_open_refuses_pivoted_and_missing(tmp_path):
    path = _make(tmp_path)
    PersistentBitmap.open(path, size=1 << 24).close(pivoted=True)
    with pytest.raises(BitmapFormatError, match="ended by pivot"):
        PersistentBitmap.open(path, size=1 << 24)
    with pytest.raises(BitmapFormatError, match="cannot read bitmap .*: No such file or directory"):
        PersistentBitmap.open(str(tmp_path / "nope"), size=1 << 24)


def test_unclean_file_is_accepted_and_says_so(tmp_path, caplog):
    path = _make(tmp_path)
    bm = PersistentBitmap.open(path, size=1 << 24)
    bm.mark(0, 1)
    bm.close(clean=False)
    with caplog.at_level("INFO", logger="mirrorfs.bitmap"):
        again = PersistentBitmap.open(path, size=1 << 24)
    assert not again.was_clean
    assert "not shut down cleanly" in caplog.text and "over-approximate" in caplog.text
    assert list(again.runs()) == [(0, 65536), (3 * 65536, 65536)]
    assert again.statistics()["generation"] == 3
    again.close()


def test_create_rejects_bad_parameters(tmp_path):
    with pytest.raises(UsageError, match="granularity"):
        PersistentBitmap.create(str(tmp_path / "x"), 1 << 20, 3000, source_id="", target_id="", fill=False)
    with pytest.raises(UsageError, match="at most 1023 bytes"):
        PersistentBitmap.create(str(tmp_path / "x"), 1 << 20, source_id="a" * 1024, target_id="", fill=False)
    with pytest.raises(UsageError, match="cannot create bitmap"):
        PersistentBitmap.create(str(tmp_path / "no" / "x"), 1 << 20, source_id="", target_id="", fill=False)
    assert os.listdir(tmp_path) == []


def test_create_replaces_a_bitmap_of_the_same_job_atomically_keeping_mode(tmp_path):
    path = str(tmp_path / "b.bitmap")
    PersistentBitmap.create(path, 1 << 24, source_id="n", target_id="m", fill=False).close()
    os.chmod(path, 0o640)
    old = open(path, "rb")  # a rename leaves this open file's contents as they were
    try:
        old_bytes = old.read()
        with PersistentBitmap.create(path, 1 << 20, source_id="n", target_id="m", fill=True):
            pass
        old.seek(0)
        assert old.read() == old_bytes
    finally:
        old.close()
    assert os.stat(path).st_mode & 0o777 == 0o640
    got = doc_read(path)
    assert got["dirty"] == set(range(16)) and got["source"] == "n" and got["image_size"] == 1 << 20
    assert sorted(os.listdir(tmp_path)) == ["b.bitmap"]


def test_new_file_is_0600_whatever_the_umask_and_rewrites_drop_group_write(tmp_path):
    path = str(tmp_path / "b.bitmap")
    old = os.umask(0)
    try:
        PersistentBitmap.create(path, 1 << 20, source_id="s", target_id="t", fill=False).close()
        assert os.stat(path).st_mode & 0o777 == 0o600
        os.chmod(path, 0o666)  # as an older mirrorfs left it under umask 0
        PersistentBitmap.open(path, size=1 << 20).close()
        assert os.stat(path).st_mode & 0o777 == 0o644
    finally:
        os.umask(old)


@pytest.mark.parametrize("what", ["image", "empty", "other-source", "other-target", "symlink",
                                  "dangling-symlink", "directory", "fifo"])
def test_create_refuses_anything_but_a_bitmap_of_the_same_job(tmp_path, what):
    path = str(tmp_path / "x")
    image = bytes(random.Random(1).randbytes(1 << 16))
    victim = tmp_path / "victim.raw"
    victim.write_bytes(image)
    if what == "image":
        victim = tmp_path / "x"
        victim.write_bytes(image)
    elif what == "empty":
        open(path, "wb").close()
    elif what in ("other-source", "other-target"):
        src, tgt = ("/other", "/dst") if what == "other-source" else ("/src", "/other")
        PersistentBitmap.create(path, 1 << 16, source_id=src, target_id=tgt, fill=False).close()
    elif what == "symlink":
        os.symlink(victim, path)
    elif what == "dangling-symlink":
        os.symlink(tmp_path / "nowhere", path)
    elif what == "directory":
        os.mkdir(path)
    elif what == "fifo":
        os.mkfifo(path)
    before = {p: (os.lstat(tmp_path / p).st_ino, _digest(tmp_path / p) if (tmp_path / p).is_file()
                  and what != "fifo" else None) for p in os.listdir(tmp_path)}
    with pytest.raises(BitmapFormatError) as info:
        PersistentBitmap.create(path, 1 << 16, source_id="/src", target_id="/dst", fill=True)
    message = str(info.value)
    assert "\n" not in message and path in message
    expect = {"symlink": "is a symbolic link", "dangling-symlink": "is a symbolic link",
              "directory": "not a regular file", "fifo": "not a regular file",
              "other-source": "not of this job", "other-target": "not of this job"}
    assert expect.get(what, "is not a valid mirrorfs bitmap: refusing to overwrite it") in message
    after = {p: (os.lstat(tmp_path / p).st_ino, _digest(tmp_path / p) if (tmp_path / p).is_file()
                 and what != "fifo" else None) for p in os.listdir(tmp_path)}
    assert after == before  # nothing replaced, no temp file left
    assert victim.read_bytes() == image


def test_open_refuses_a_symlink(tmp_path):
    path = _make(tmp_path)
    link = str(tmp_path / "link")
    os.symlink(path, link)
    with pytest.raises(BitmapFormatError, match="is a symbolic link"):
        PersistentBitmap.open(link, size=1 << 24)
    assert os.path.islink(link)


def test_ended_file_records_when_and_is_refused_unless_verified(tmp_path):
    path = _make(tmp_path)
    bm = PersistentBitmap.open(path, size=1 << 24)
    before = time.time_ns()
    bm.close(ended=True)
    got = doc_read(path)
    assert got["clean"] and got["ended"] and not got["pivoted"]
    assert before <= got["ended_at"] <= time.time_ns()
    digest = _digest(path)
    with pytest.raises(BitmapFormatError, match="stopped recording when its job ended at 20..-..-..T"
                                                ".*--verify-resync"):
        PersistentBitmap.open(path, size=1 << 24)
    assert _digest(path) == digest
    again = PersistentBitmap.open(path, size=1 << 24, verify=True)
    got = doc_read(path)  # in use again: recording, so no longer ended
    assert not got["ended"] and got["ended_at"] == 0 and not got["clean"]
    again.close()
    PersistentBitmap.open(path, size=1 << 24).close()  # an unmount's close: resumable


def test_pivoted_file_is_refused_even_for_a_verified_resync(tmp_path):
    path = _make(tmp_path)
    PersistentBitmap.open(path, size=1 << 24).close(pivoted=True)
    assert doc_read(path)["ended"]
    with pytest.raises(BitmapFormatError, match="ended by pivot at 20"):
        PersistentBitmap.open(path, size=1 << 24, verify=True)


def _to_version1(path: str) -> None:
    """Rewrite a (clean, not ended) file as an older mirrorfs wrote it: version 1, no ended_at."""
    data = bytearray(open(path, "rb").read())
    struct.pack_into("<II", data, 8, 1, 2120)
    data[2120:2656] = bytes(536)
    struct.pack_into("<I", data, 64, 0)
    struct.pack_into("<I", data, 64, zlib.crc32(data[:2120]))
    open(path, "wb").write(data)


def test_version1_files_are_read_and_a_clean_one_needs_a_verified_resync(tmp_path):
    path = _make(tmp_path)
    _to_version1(path)
    header = decode_header(open(path, "rb").read())
    assert header.version == 1 and header.clean and header.legacy_clean
    with pytest.raises(BitmapFormatError, match="format version 1, which cannot tell"):
        PersistentBitmap.open(path, size=1 << 24)
    bm = PersistentBitmap.open(path, size=1 << 24, verify=True)
    assert doc_read(path)["generation"] == 2  # upgraded to version 3 (doc_read asserts it)
    bm.close(clean=False)
    _to_version1(path)  # a crashed version 1 file: in use when it died, its bits are trusted
    PersistentBitmap.open(path, size=1 << 24).close()


@pytest.mark.parametrize("flags,ended_at", [(5, 0), (1, 12345)])
def test_ended_flag_and_ended_at_must_agree(tmp_path, flags, ended_at):
    path = _make(tmp_path)
    _patch_header(path, 16, "<I", flags, fix_checksum=False)
    _patch_header(path, 2120, "<Q", ended_at, fix_checksum=True)
    with pytest.raises(BitmapFormatError, match="invalid header field ended_at"):
        PersistentBitmap.open(path, size=1 << 24)


def test_failed_ending_close_sets_every_bit(tmp_path, monkeypatch):
    from mirrorfs.bitmap import persistent

    path = _make(tmp_path)
    bm = PersistentBitmap.open(path, size=1 << 24)

    def failing_write(*args, **kwargs):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(persistent, "atomic_write", failing_write)
    with pytest.raises(BitmapFormatError, match="Input/output error.*every bit is set"):
        bm.close(ended=True)
    got = doc_read(path)
    assert not got["clean"] and not got["ended"] and got["dirty"] == set(range(256))


def test_a_shut_down_file_notes_the_image_ctime_and_a_resume_sees_later_writes(tmp_path):
    image = tmp_path / "vm.raw"
    image.write_bytes(bytes(1 << 16))
    path = str(tmp_path / "b.bitmap")
    src = str(image)
    PersistentBitmap.create(path, 1 << 16, 4096, source_id=src, target_id="/t", fill=False).close()
    assert doc_read(path)["source_ctime"] == os.stat(image).st_ctime_ns
    PersistentBitmap.open(path, size=1 << 16, source_id=src).close()  # unchanged: resumes
    time.sleep(0.01)
    with open(image, "r+b") as f:  # a write while nothing recorded writes
        f.write(b"x")
    digest = _digest(path)
    with pytest.raises(BitmapFormatError, match="changed after its job was stopped by an unmount"):
        PersistentBitmap.open(path, size=1 << 16, source_id=src)
    assert _digest(path) == digest
    bm = PersistentBitmap.open(path, size=1 << 16, source_id=src, verify=True)
    assert doc_read(path)["source_ctime"] == 0 and bm.count() == 16
    bm.close(ended=True)
    assert doc_read(path)["source_ctime"] == 0  # an ended file needs no ctime: it is never trusted


def test_source_ctime_only_in_a_shut_down_file(tmp_path):
    path = _make(tmp_path)
    PersistentBitmap.open(path, size=1 << 24).close(ended=True)
    _patch_header(path, 2128, "<Q", 12345, fix_checksum=True)
    with pytest.raises(BitmapFormatError, match="invalid header field source_ctime"):
        PersistentBitmap.open(path, size=1 << 24, verify=True)


def test_inconsistent_flag_is_switched_in_place_and_kept_across_opens(tmp_path):
    path = str(tmp_path / "b.bitmap")
    bm = PersistentBitmap.create(path, 1 << 24, source_id="/s", target_id="/t", fill=True,
                                 inconsistent=True)
    assert doc_read(path)["inconsistent"] and bm.inconsistent
    bm.set_inconsistent(False)
    assert not doc_read(path)["inconsistent"]  # on the file at once, checksum right
    bm.set_inconsistent(True)
    bm.close()
    got = doc_read(path)
    assert got["inconsistent"] and got["clean"]
    bm = PersistentBitmap.open(path, size=1 << 24)
    assert bm.inconsistent and doc_read(path)["inconsistent"]  # a resume starts inconsistent
    bm.set_inconsistent(False)
    bm.close(ended=True)
    got = doc_read(path)
    assert not got["inconsistent"] and got["ended"]


def test_version2_files_are_read_and_upgraded(tmp_path):
    path = _make(tmp_path)
    _patch_header(path, 8, "<I", 2, fix_checksum=True)
    header = decode_header(open(path, "rb").read())
    assert header.version == 2 and not header.inconsistent
    PersistentBitmap.open(path, size=1 << 24).close()
    assert not doc_read(path)["inconsistent"]  # doc_read asserts version 3
    _patch_header(path, 8, "<I", 2, fix_checksum=False)
    _patch_header(path, 16, "<I", 8 | 1, fix_checksum=True)  # INCONSISTENT is unknown to version 2
    with pytest.raises(BitmapFormatError, match="invalid header field flags"):
        PersistentBitmap.open(path, size=1 << 24)
