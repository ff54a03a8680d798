"""``mirrorfs bitmap inspect``: exit codes 0/1/2, verdict lines and error messages, through the
real console script (subprocess) and, for the damage matrix, through ``cli.main`` in-process."""

from __future__ import annotations

import hashlib
import json
import re
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

from mirrorfs import cli
from mirrorfs.bitmap import PersistentBitmap

MIRRORFS = str(Path(sys.executable).with_name("mirrorfs"))
G = 65536
SIZE = 100 * G + 4096  # 101 clusters, the last one partial (4096 bytes)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([MIRRORFS, "bitmap", "inspect", *args], capture_output=True, text=True,
                          timeout=60)


def make(tmp_path, name: str, *, marks=(), clears=(), close: str = "clean") -> str:
    path = str(tmp_path / name)
    bm = PersistentBitmap.create(path, SIZE, G, source_id="/images/vm1.qcow2",
                                 target_id="nbd://backup:10809/vm1", fill=False)
    for off, length in marks:
        bm.mark(off, length)
    for off, length in clears:
        bm.clear(off, length)
    bm.finish_clear_commit(bm.begin_clear_commit())
    if close == "clean":
        bm.close()
    elif close == "pivoted":
        bm.close(pivoted=True)
    elif close == "ended":
        bm.close(ended=True)
    else:
        bm.close(clean=False)
    return path


def test_clean_file_exits_0(tmp_path):
    path = make(tmp_path, "clean.bitmap", marks=[(0, SIZE)], clears=[(0, SIZE)])
    before = hashlib.sha256(open(path, "rb").read()).hexdigest()
    r = run_cli(path)
    assert r.returncode == 0, r.stderr
    out = r.stdout.splitlines()
    assert out[-1] == "clean: the target is identical to the source"
    assert f"image size:     {SIZE} bytes (6.3 MiB)" in out
    assert "granularity:    65536 bytes (64.0 KiB)" in out
    assert "clusters:       101" in out and "dirty clusters: 0" in out and "dirty bytes:    0 (0 B)" in out
    assert "clean shutdown: yes" in out and "pivoted:        no" in out and "in use:         no" in out
    assert "source:         /images/vm1.qcow2" in out and "target:         nbd://backup:10809/vm1" in out
    assert "generation:     1" in out
    assert r.stderr == ""
    assert hashlib.sha256(open(path, "rb").read()).hexdigest() == before  # read-only


def test_dirty_file_exits_1_with_ranges_and_restart_hint(tmp_path):
    # clusters 1-2 and the partial last cluster: 2 * 64K + 4096 bytes in two runs
    path = make(tmp_path, "dirty.bitmap", marks=[(G + 5, G - 5), (SIZE - 1, 1), (2 * G, 1)],
                close="unclean")
    r = run_cli(path)
    assert r.returncode == 1, r.stderr
    out = r.stdout.splitlines()
    assert out[-1] == f"dirty: {2 * G + 4096} bytes differ; restart with --sync dirty --bitmap {path}"
    assert "dirty clusters: 3" in out
    assert "  offset 65536 length 131072 (64.0 KiB +128.0 KiB)" in out
    assert f"  offset {100 * G} length 4096 (6.2 MiB +4.0 KiB)" in out
    assert ("clean shutdown: no (not shut down cleanly: set bits are still trustworthy "
            "(they over-approximate))") in out

    r = run_cli(path, "--json")
    assert r.returncode == 1
    info = json.loads(r.stdout)
    assert info["dirty-bytes"] == 2 * G + 4096 and info["dirty-clusters"] == 3
    assert info["dirty-ranges"] == [{"offset": G, "length": 2 * G}, {"offset": 100 * G, "length": 4096}]
    assert info["clean-shutdown"] is False and info["pivoted"] is False
    assert info["size"] == SIZE and info["granularity"] == G and info["clusters"] == 101
    assert info["source"] == "/images/vm1.qcow2" and info["generation"] == 1


def test_pivoted_file_exits_0_and_says_restart_from_target(tmp_path):
    path = make(tmp_path, "pivot.bitmap", marks=[(0, 10)], clears=[(0, G)], close="pivoted")
    r = run_cli(path, "--json")
    assert r.returncode == 0
    info = json.loads(r.stdout)
    assert info["pivoted"] is True and info["clean-shutdown"] is True
    assert info["verdict"] == ("pivoted: the target is the live image and holds every write; "
                               "restart from the target")


def test_ended_file_exits_1_even_with_no_bit_set(tmp_path):
    path = make(tmp_path, "ended.bitmap", marks=[(0, 10)], clears=[(0, G)], close="ended")
    r = run_cli(path)
    assert r.returncode == 1, r.stderr
    out = r.stdout.splitlines()
    assert "dirty clusters: 0" in out
    assert any(re.fullmatch(r"ended:          yes, at 20\d\d-\d\d-\d\dT\d\d:\d\d:\d\dZ \(writes "
                            r"after this time are not recorded\)", line) for line in out), out
    assert re.fullmatch(rf"ended: its job ended at 20\S+Z \(0 bytes differed then\) and writes since are not recorded, so the "
                        rf"target may differ anywhere; resync with --sync dirty --bitmap {path} "
                        rf"--verify-resync \(compares every cluster\)", out[-1]), out
    info = json.loads(run_cli(path, "--json").stdout)
    assert info["ended"] is True and info["ended-at"].endswith("Z") and info["ended-at-ns"] > 0
    assert info["version"] == 3 and info["exit-code"] == 1


def test_clean_version1_file_cannot_be_called_clean(tmp_path):
    from test_bitmap_format import _to_version1

    path = make(tmp_path, "old.bitmap", close="clean")
    _to_version1(path)  # as an older mirrorfs wrote it
    r = run_cli(path, "--json")
    assert r.returncode == 1, r.stderr
    info = json.loads(r.stdout)
    assert info["version"] == 1 and info["ended"] is False and info["dirty-bytes"] == 0
    assert info["verdict"].startswith("unknown: a version 1 file cannot tell whether its job ended")


def test_many_ranges_are_capped(tmp_path):
    path = make(tmp_path, "many.bitmap", marks=[(i * 2 * G, 1) for i in range(40)])
    r = run_cli(path)
    assert r.returncode == 1
    lines = r.stdout.splitlines()
    assert sum(1 for line in lines if line.startswith("  offset ")) == 10
    assert "  ..." in lines


def _damage(path: str, how: str) -> None:
    data = bytearray(open(path, "rb").read())
    if how == "truncated":
        data = data[:-8]
    elif how == "wrong-magic":
        data[:8] = b"NOTABMP!"
    elif how == "bad-checksum":
        data[100] ^= 1
    elif how == "size-mismatch":
        data += b"\0" * 4096
    elif how == "header-only":
        data = data[:1000]
    elif how == "cluster-count":
        struct.pack_into("<Q", data, 32, 7)
        struct.pack_into("<I", data, 64, 0)
        struct.pack_into("<I", data, 64, zlib.crc32(data[:2136]))
    elif how == "tail-bit":
        data[-1] |= 0x80
    open(path, "wb").write(data)


@pytest.mark.parametrize("how,message", [
    ("truncated", "is truncated: 4104 bytes, expected 4112 for an image of 6557696 bytes (6.3 MiB) "
                  "at granularity 64.0 KiB: the file is damaged; start a new job with --sync full"),
    ("wrong-magic", "is not a mirrorfs bitmap file (magic b'NOTABMP!', expected b'MFSBITMP'): pass the "
                    "--bitmap file the job was started with"),
    ("bad-checksum", "header checksum mismatch"),
    ("size-mismatch", "is longer than its header says: 8208 bytes, expected 4112"),
    ("header-only", "is truncated (1000 bytes, the header alone is 2136)"),
    ("cluster-count", "invalid header field cluster_count: 7, but an image of 6557696 bytes at "
                      "granularity 65536 has 101"),
    ("tail-bit", "bits past the last cluster (101) are set"),
])
def test_invalid_files_exit_2_with_one_line(tmp_path, capsys, how, message):
    path = make(tmp_path, "b.bitmap", marks=[(0, G)], close="clean")
    _damage(path, how)
    assert cli.main(["bitmap", "inspect", path]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1 and err.startswith("mirrorfs bitmap inspect: ")
    assert message in err and path in err


@pytest.mark.parametrize("how", ["truncated", "wrong-magic", "bad-checksum", "size-mismatch"])
def test_invalid_files_exit_2_through_the_real_cli(tmp_path, how):
    path = make(tmp_path, "b.bitmap", marks=[(0, G)], close="clean")
    _damage(path, how)
    r = run_cli(path, "--json")
    assert r.returncode == 2
    assert r.stdout == "" and len(r.stderr.splitlines()) == 1
    assert "Traceback" not in r.stderr and path in r.stderr


def test_unreadable_files_exit_2(tmp_path):
    r = run_cli(str(tmp_path / "missing.bitmap"))
    assert r.returncode == 2
    assert r.stderr.strip() == (f"mirrorfs bitmap inspect: cannot read bitmap {tmp_path}/missing.bitmap: "
                                f"No such file or directory")
    r = run_cli(str(tmp_path))
    assert r.returncode == 2 and "it is a directory" in r.stderr
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    r = run_cli(str(empty))
    assert r.returncode == 2 and "is truncated (0 bytes" in r.stderr
