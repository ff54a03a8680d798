"""Hostile input to ``MOUNTPOINT/.mirrorfs/``: separators that are not newlines, NUL bytes in
paths, image names that are not UTF-8. Each gets a one-line error (or is served), changes
nothing and leaves the mount log free of tracebacks and BUG lines.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest

from mounting import Mount, random_image
from test_control_file import control, jobs, last_outcome, qmp, sock_of

# Every character str.splitlines() treats as a line break except "\n" itself.
NOT_NEWLINES = ["\r", "\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\x85", "\u2028", "\u2029"]


@pytest.mark.parametrize("sep", NOT_NEWLINES, ids=[f"U+{ord(c):04X}" for c in NOT_NEWLINES])
def test_only_newline_ends_a_control_line(mounted: Mount, tmp_path: Path, sep: str) -> None:
    random_image(mounted, "a.img")
    random_image(mounted, "b.img")
    target = tmp_path / "a-target.img"
    assert control(mounted, f"mirror a.img {target} create=true speed=64K\n") == 0
    # Split on sep, this is two valid commands; as one line it is pause with one word too many.
    assert control(mounted, f"pause a.img{sep}resume a.img\n") == errno.EINVAL
    assert last_outcome(mounted).startswith("error: usage: pause IMAGE"), last_outcome(mounted)
    assert jobs(mounted)["a.img"]["paused"] is False
    other = tmp_path / f"b{sep}target.img"
    # Inside quotes the separator is part of the path: one command, that exact target.
    assert control(mounted, f"mirror b.img '{other}' create=true speed=64K\n") == 0, last_outcome(mounted)
    assert jobs(mounted)["b.img"]["target"] == str(other)
    assert other.exists()
    assert control(mounted, "cancel a.img b.img force=true\n") == 0
    assert jobs(mounted) == {}


def test_nul_in_a_path_is_a_one_line_error_and_changes_nothing(mounted: Mount, tmp_path: Path) -> None:
    random_image(mounted, "a.img")
    before = sorted(os.listdir(tmp_path))
    for line in (f"mirror a.img {tmp_path}/t\0x.img create=true",
                 f"mirror a.img {tmp_path}/t.img create=true bitmap={tmp_path}/b\0m",
                 "mirror a\0.img /tmp/x.img", "pause a.img\0", "set-speed a.img 1\0M"):
        assert control(mounted, line.encode() + b"\n") == errno.EINVAL, line
        outcome = last_outcome(mounted)
        assert outcome.startswith("error: ") and "NUL" in outcome, (line, outcome)
        assert jobs(mounted) == {}
    assert sorted(os.listdir(tmp_path)) == before
    # The same through QMP: an error reply, and the connection and mount stay usable.
    reply = qmp(sock_of(mounted), "drive-mirror", {"device": "a.img", "target": f"{tmp_path}/q\0.img",
                                                  "sync": "full", "mode": "absolute-paths"})
    assert reply["error"]["class"] == "GenericError" and "NUL" in reply["error"]["desc"], reply
    assert sorted(os.listdir(tmp_path)) == before
    assert qmp(sock_of(mounted), "query-block-jobs")["return"] == []


def test_non_utf8_image_name_shows_in_status_and_status_json(mount_factory: object, tmp_path: Path) -> None:
    source = tmp_path / "src"
    source.mkdir()
    name = os.fsdecode(b"\xff\x1b[2J.raw")  # not UTF-8, and a terminal escape sequence
    data = os.urandom(1 << 20)
    with open(os.path.join(os.fsencode(source), b"\xff\x1b[2J.raw"), "wb") as f:
        f.write(data)
    mount = mount_factory(source=source)  # type: ignore[operator]
    target = tmp_path / os.fsdecode(b"t\xfe.raw")
    reply = qmp(sock_of(mount), "drive-mirror", {"device": name, "target": str(target), "sync": "full",
                                                "mode": "absolute-paths", "speed": 65536})
    assert reply == {"return": {}, "id": 1}, reply
    status = (mount.control / "status").read_bytes()
    text = status.decode("ascii")  # readable, and printable: no raw escape reaches a terminal
    assert "\\xff\\x1b[2J.raw" in text and "\\xfe.raw" in text, text
    assert "\x1b" not in text
    [job] = json.loads((mount.control / "status.json").read_bytes())
    assert job["device"] == name and job["target"] == str(target)
    # The CLI's status table (the same renderer) prints it too.
    out = mount.cli("status", mount.mountpoint)
    assert "\\xff\\x1b[2J.raw" in out.stdout, out
    assert qmp(sock_of(mount), "block-job-cancel", {"device": name, "force": True}) == {"return": {}, "id": 1}
    assert (mount.mountpoint / name).read_bytes() == data
