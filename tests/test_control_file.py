"""``MOUNTPOINT/.mirrorfs/`` against a real mount and the real engine (issue 5, "Done when" 4, 5).

- every control command (mirror, complete, complete pivot=false, cancel, cancel force=true,
  pause, resume, set-speed) succeeds, and fails with its documented errno (EINVAL malformed or
  unknown image, EBUSY refused by state); reading ``control`` shows each line with ``ok`` or
  ``error: <reason>``;
- ``status`` and ``status.json`` say what ``mirrorfs status`` and ``query-block-jobs`` say;
- image names that leave the mount and targets inside it are refused alike by the control file
  (EINVAL), the CLI (exit 2) and QMP (an error class), and nothing is created;
- only the owner (and root) may write ``control``: ``nobody`` gets EACCES even with
  ``--allow-other``; the QMP socket is 0600 and ``nobody`` cannot connect to it.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest

from mounting import Mount, random_image, wait_for

MiB = 1 << 20


def control(mount: Mount, text: str | bytes) -> int:
    """Write ``text`` to ``control`` in one write(2); 0 on success, else the errno."""
    data = text.encode() if isinstance(text, str) else text
    fd = os.open(mount.control / "control", os.O_WRONLY)
    try:
        n = os.write(fd, data)
        assert n == len(data)
        return 0
    except OSError as exc:
        return exc.errno
    finally:
        os.close(fd)


def history(mount: Mount) -> list[str]:
    return (mount.control / "control").read_text().splitlines()


def last_outcome(mount: Mount) -> str:
    """The outcome part of the newest history line (after ``" -> "``)."""
    return history(mount)[-1].split(" -> ", 1)[1]


def jobs(mount: Mount) -> dict[str, dict[str, Any]]:
    return {j["device"]: j for j in json.loads((mount.control / "status.json").read_text())}


def wait_jobs(mount: Mount, pred: Any, what: str, timeout: float = 60.0) -> dict[str, dict[str, Any]]:
    seen: list[Any] = [None]

    def check() -> bool:
        seen[0] = jobs(mount)
        return bool(pred(seen[0]))

    try:
        wait_for(check, timeout, what, interval=0.05)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; last status: {seen[0]}") from None
    return seen[0]


def qmp(sock_path: str, name: str, arguments: dict | None = None) -> dict[str, Any]:
    """One command on a fresh raw connection; returns the reply (``return`` or ``error``)."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(30)
        s.connect(sock_path)
        f = s.makefile("rb")
        assert "QMP" in json.loads(f.readline())
        s.sendall(b'{"execute": "qmp_capabilities"}\n')
        assert json.loads(f.readline()) == {"return": {}}
        msg: dict[str, Any] = {"execute": name, "id": 1}
        if arguments is not None:
            msg["arguments"] = arguments
        s.sendall(json.dumps(msg).encode() + b"\n")
        while True:
            reply = json.loads(f.readline())
            if "event" not in reply:
                assert reply.get("id") == 1, reply
                return reply


def sock_of(mount: Mount) -> str:
    return (mount.control / "socket").read_text().strip()


def test_every_control_command_succeeds_and_is_recorded(mounted: Mount, tmp_path: Path) -> None:
    data = random_image(mounted, "a.img")
    target = tmp_path / "a-target.img"
    # mirror with keys: slow, small chunks, so pause / set-speed meet a running job.
    assert control(mounted, f"mirror a.img {target} create=true speed=64K buf-size=256K "
                            f"granularity=64K copy-mode=write-blocking on-target-error=stop\n") == 0
    j = jobs(mounted)["a.img"]
    assert (j["target"], j["speed"], j["copy-mode"], j["ready"]) == (str(target), 64 << 10, "write-blocking", False)
    assert control(mounted, "pause a.img\n") == 0
    j = wait_jobs(mounted, lambda js: js["a.img"]["paused"], "paused")
    assert j["a.img"]["status"] in ("paused", "standby")
    assert control(mounted, "resume a.img\n") == 0
    assert jobs(mounted)["a.img"]["paused"] is False
    assert control(mounted, "set-speed a.img 0\n") == 0
    assert jobs(mounted)["a.img"]["speed"] == 0
    wait_jobs(mounted, lambda js: js["a.img"]["ready"], "ready")
    assert control(mounted, "complete a.img pivot=false\n") == 0
    assert jobs(mounted) == {}
    assert target.read_bytes() == data

    # cancel after ready: an exact copy; cancel force=true; then complete with pivot.
    for line in (f"mirror a.img {target} sync=none", "cancel a.img"):
        assert control(mounted, line + "\n") == 0
        if line.startswith("mirror"):
            wait_jobs(mounted, lambda js: js["a.img"]["ready"], "ready (sync none)")
    assert jobs(mounted) == {}
    assert control(mounted, f"mirror a.img {target} speed=64K buf-size=256K\n") == 0
    assert control(mounted, "cancel a.img force=true\n") == 0
    assert jobs(mounted) == {}
    assert control(mounted, f"mirror a.img {target} job-id=pivot-job\n") == 0
    wait_jobs(mounted, lambda js: js.get("pivot-job", {}).get("ready"), "ready (job-id)")
    assert control(mounted, "complete pivot-job\n") == 0
    assert jobs(mounted) == {}
    # After the pivot the mount serves the target: a write through it lands there only.
    with open(mounted.mountpoint / "a.img", "r+b") as f:
        f.write(b"after the pivot")
    assert target.read_bytes()[:15] == b"after the pivot"
    assert (mounted.source / "a.img").read_bytes() == data

    lines = history(mounted)
    commands = [ln.split(" ", 1)[1].rsplit(" -> ", 1) for ln in lines]
    assert [c for c, _ in commands] == [
        f"mirror a.img {target} create=true speed=64K buf-size=256K granularity=64K "
        f"copy-mode=write-blocking on-target-error=stop",
        "pause a.img", "resume a.img", "set-speed a.img 0", "complete a.img pivot=false",
        f"mirror a.img {target} sync=none", "cancel a.img",
        f"mirror a.img {target} speed=64K buf-size=256K", "cancel a.img force=true",
        f"mirror a.img {target} job-id=pivot-job", "complete pivot-job"]
    assert all(outcome == "ok" for _, outcome in commands)
    assert all(ln[:4].isdigit() and ln[10] == "T" for ln in lines)  # each line starts with its time


# (line, errno, message in the history) -- the failure of each command, with one job "a.img"
# running slowly (not ready) and no job "nope.img".
FAILURES = [
    ("mirror a.img {t}/elsewhere.img", errno.EBUSY, "job id 'a.img' is in use"),
    ("mirror nope.img {t}/x.img create=true", errno.EINVAL, "nope.img"),
    ("mirror a.img", errno.EINVAL, "usage: mirror IMAGE TARGET"),
    ("mirror a.img {t}/x.img colour=blue", errno.EINVAL, "Parameter 'colour' is unexpected"),
    ("mirror a.img {t}/x.img job-id=b sync=sideways", errno.EINVAL, "parameter 'sync' must be one of"),
    ("mirror a.img {t}/x.img job-id=b granularity=3K", errno.EINVAL, "power of two"),
    ("complete a.img", errno.EBUSY, "job 'a.img' cannot be completed: it is not ready yet"),
    ("complete a.img pivot=false", errno.EBUSY, "job 'a.img' cannot be completed: it is not ready yet"),
    ("complete a.img pivot=maybe", errno.EINVAL, "parameter 'pivot' must be true or false (got 'maybe')"),
    ("complete nope.img", errno.EINVAL, "no mirror job 'nope.img' (jobs: a.img)"),
    ("complete", errno.EINVAL, "usage: complete IMAGE..."),
    ("cancel nope.img", errno.EINVAL, "no mirror job 'nope.img'"),
    ("cancel nope.img force=true", errno.EINVAL, "no mirror job 'nope.img'"),
    ("cancel a.img a.img", errno.EINVAL, "each job only once"),
    ("pause nope.img", errno.EINVAL, "no mirror job 'nope.img'"),
    ("pause", errno.EINVAL, "usage: pause IMAGE"),
    ("resume nope.img", errno.EINVAL, "no mirror job 'nope.img'"),
    ("set-speed a.img fast", errno.EINVAL, "invalid speed 'fast'"),
    ("set-speed nope.img 1M", errno.EINVAL, "no mirror job 'nope.img'"),
    ("set-speed a.img", errno.EINVAL, "usage: set-speed IMAGE RATE"),
    ("frobnicate a.img", errno.EINVAL, "unknown command 'frobnicate'"),
    ("mirror 'a.img", errno.EINVAL, "cannot parse"),
]


def test_every_control_command_fails_with_its_errno_and_changes_nothing(mounted: Mount, tmp_path: Path) -> None:
    random_image(mounted, "a.img")
    target = tmp_path / "a-target.img"
    assert control(mounted, f"mirror a.img {target} create=true speed=32K buf-size=256K\n") == 0
    keys = ("status", "ready", "paused", "target", "speed", "io-status", "copy-mode")
    before = {k: jobs(mounted)["a.img"][k] for k in keys}
    for line, code, message in FAILURES:
        line = line.format(t=tmp_path)
        got = control(mounted, line + "\n")
        assert got == code, f"{line!r}: errno {got}, expected {code}"
        outcome = last_outcome(mounted)
        assert outcome.startswith("error: ") and message in outcome, (line, outcome)
        assert history(mounted)[-1].split(" ", 1)[1].startswith(line.strip())
        assert set(jobs(mounted)) == {"a.img"}
        assert {k: jobs(mounted)["a.img"][k] for k in keys} == before, line
    assert not (tmp_path / "x.img").exists() and not (tmp_path / "elsewhere.img").exists()
    # A write with a bad line stops there: the lines after it do not run.
    assert control(mounted, "pause nope.img\npause a.img\n") == errno.EINVAL
    assert jobs(mounted)["a.img"]["paused"] is False
    # Blank lines and comments are no commands.
    assert control(mounted, "\n# a comment\n   \n") == 0
    assert control(mounted, "cancel a.img force=true\n") == 0
    assert jobs(mounted) == {}


def test_status_files_match_the_cli_and_qmp(mounted: Mount, tmp_path: Path) -> None:
    assert (mounted.control / "status").read_text() == "no jobs\n"
    assert json.loads((mounted.control / "status.json").read_text()) == []
    random_image(mounted, "a.img")
    random_image(mounted, "b.img", 4 * MiB)
    assert control(mounted, f"mirror a.img {tmp_path / 'ta.img'} create=true sync=none\n") == 0
    assert control(mounted, f"mirror b.img {tmp_path / 'tb.img'} create=true\n") == 0
    assert control(mounted, "pause b.img\n") == 0
    wait_jobs(mounted, lambda js: js["a.img"]["ready"] and js["b.img"]["status"] in ("paused", "standby"),
              "a ready, b paused")
    # Nothing moves now (a is ready and idle, b is paused): every view must agree exactly.
    files_json = json.loads((mounted.control / "status.json").read_text())
    qmp_json = qmp(sock_of(mounted), "query-block-jobs")["return"]
    cli_json = json.loads(mounted.cli("status", mounted.mountpoint, "--json").stdout)
    # a sliding-window meter that decays with time; b is behind (paused), its age grows
    volatile = ("rate", "__org.mirrorfs_recovery-point-age")

    def stable(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{k: v for k, v in e.items() if k not in volatile} for e in entries]

    assert stable(files_json) == stable(qmp_json) == stable(cli_json)
    assert sorted(j["device"] for j in files_json) == ["a.img", "b.img"]
    table = (mounted.control / "status").read_text()

    def without_lag(text: str) -> list[str]:
        start, end = text.index("LAG"), text.index("TARGET")
        return [line[:start] + line[end:] for line in text.splitlines()]

    assert without_lag(table) == without_lag(mounted.cli("status", mounted.mountpoint).stdout)
    rows = {ln.split()[0]: ln.split() for ln in table.splitlines()[1:]}
    assert table.splitlines()[0].split()[:4] == ["JOB", "IMAGE", "STATE", "PROGRESS"]
    assert rows["a.img"][2] == "ready" and rows["b.img"][2] in ("paused", "standby")
    assert str(tmp_path / "ta.img") in table and str(tmp_path / "tb.img") in table
    assert control(mounted, "cancel a.img b.img force=true\n") == 0
    assert (mounted.control / "status").read_text() == "no jobs\n"


ESCAPES = ["../../etc/passwd", "/etc/passwd", "../escape.img", "a/../../escape.img",
           ".mirrorfs/control", ".mirrorfs/status"]


def test_names_that_leave_the_mount_are_refused_everywhere(mounted: Mount, tmp_path: Path) -> None:
    random_image(mounted, "a.img")
    (mounted.mountpoint / "a").mkdir()
    sock = sock_of(mounted)
    target = tmp_path / "escape-target.img"
    for name in ESCAPES:
        assert control(mounted, f"mirror {name} {target} create=true\n") == errno.EINVAL, name
        assert "error: image" in last_outcome(mounted), last_outcome(mounted)
        r = mounted.cli("mirror", mounted.mountpoint, name, target, "--create", check=False)
        assert r.returncode == 2, (name, r.stderr)
        assert r.stderr.startswith("mirrorfs mirror: ") and r.stderr.count("\n") == 1, r.stderr
        reply = qmp(sock, "drive-mirror", {"device": name, "target": str(target), "mode": "absolute-paths"})
        assert reply["error"]["class"] in ("GenericError", "DeviceNotFound"), reply
        assert "image" in reply["error"]["desc"], reply
    # A target inside the mount (which would mirror the mount into itself) is refused too.
    inside = mounted.mountpoint / "inside.img"
    assert control(mounted, f"mirror a.img {inside} create=true\n") == errno.EINVAL
    assert "inside the mount" in last_outcome(mounted)
    r = mounted.cli("mirror", mounted.mountpoint, "a.img", inside, "--create", check=False)
    assert r.returncode == 2 and "inside the mount" in r.stderr, r.stderr
    reply = qmp(sock, "drive-mirror", {"device": "a.img", "target": str(inside), "mode": "absolute-paths"})
    assert reply["error"]["class"] == "GenericError" and "inside the mount" in reply["error"]["desc"]
    # A relative target in the control file (no cwd to resolve it against) is refused.
    assert control(mounted, "mirror a.img relative.img create=true\n") == errno.EINVAL
    assert "absolute path" in last_outcome(mounted)
    assert jobs(mounted) == {}
    assert not target.exists() and not inside.exists() and not (mounted.source / "inside.img").exists()
    assert not (mounted.source.parent / "escape.img").exists()


@pytest.fixture
def public_dir() -> Any:
    """A directory every user can reach (pytest's tmp_path is under a 0700 directory, where
    nobody's EACCES would prove nothing). Removed after the mounts in it are gone."""
    path = Path(tempfile.mkdtemp(prefix="mirrorfs-ctl-", dir="/tmp"))
    os.chmod(path, 0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def test_only_the_owner_may_write_control_and_use_the_socket(public_dir: Path, mount_factory: Any,
                                                             tmp_path: Path) -> None:
    (public_dir / "source").mkdir()
    (public_dir / "mnt").mkdir()
    mount = mount_factory(source=public_dir / "source", mountpoint=public_dir / "mnt",
                          extra_args=["--allow-other"])
    random_image(mount, "a.img")
    os.chmod(mount.source / "a.img", 0o666)
    nobody = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]
    probe = r"""
import errno, os, socket, sys
path, sock = sys.argv[1:3]
out = []
try:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, b"pause a.img\n")
        out.append("write ok")
    except OSError as e:
        out.append("write " + errno.errorcode[e.errno])
except OSError as e:
    out.append("open " + errno.errorcode[e.errno])
out.append("read " + str(len(open(path).read()) >= 0))
s = socket.socket(socket.AF_UNIX)
try:
    s.connect(sock)
    out.append("connect ok")
except OSError as e:
    out.append("connect " + errno.errorcode[e.errno])
print(" ".join(out))
"""
    sock = sock_of(mount)
    st = os.lstat(sock)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == os.getuid()
    r = subprocess.run(nobody + [sys.executable, "-c", probe, str(mount.control / "control"), sock],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["open", "EACCES", "read", "True", "connect", "EACCES"], r.stdout
    # The same shell line as root (the owner here) works; nobody's attempt left no trace.
    assert control(mount, f"mirror a.img {tmp_path / 't.img'} create=true sync=none\n") == 0
    assert all("pause" not in ln for ln in history(mount))
    assert jobs(mount)["a.img"]["paused"] is False
    assert control(mount, "cancel a.img\n") == 0
