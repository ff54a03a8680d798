"""Done-when 3: fio random 4k and sequential 1M writes with crc32c verification, direct and buffered."""

from __future__ import annotations

import hashlib
import json
import subprocess

import pytest

from mounting import Mount


@pytest.mark.parametrize("direct", [1, 0], ids=["direct", "buffered"])
@pytest.mark.parametrize("rw,bs,iodepth", [("randwrite", "4k", 4), ("write", "1M", 2)], ids=["rand4k", "seq1M"])
def test_fio_verify(mounted: Mount, rw: str, bs: str, iodepth: int, direct: int) -> None:
    image = mounted.mountpoint / "fio.img"
    argv = [
        "fio", "--name=verify", f"--filename={image}", "--size=8M", f"--rw={rw}", f"--bs={bs}",
        f"--direct={direct}", "--ioengine=libaio", f"--iodepth={iodepth}", "--verify=crc32c",
        "--do_verify=1", "--verify_fatal=1", "--randrepeat=0", "--output-format=json",
    ]
    # In the test's own directory: fio leaves a verify state file in its working directory.
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=240,
                          cwd=mounted.mountpoint.parent)
    assert proc.returncode == 0, f"fio failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    job = json.loads(proc.stdout[proc.stdout.index("{"):])["jobs"][0]
    assert job["error"] == 0
    assert job["write"]["io_bytes"] == 8 << 20
    # The verify pass read everything back through the mount.
    assert job["read"]["io_bytes"] == 8 << 20
    # What fio verified through the mount is what the source file holds.
    assert (mounted.source / "fio.img").read_bytes() == image.read_bytes()
    assert hashlib.sha256(image.read_bytes()).hexdigest() != hashlib.sha256(bytes(8 << 20)).hexdigest()
