"""The CLI's client side against a real QMPServer (in a thread) driving a fake engine.

The server, the socket, the client and the CLI are the real ones; only the engine behind the
QMP commands is a small model (``FakeEngine``) that keeps QEMU's job rules: complete only when
ready, transactions all or nothing, BLOCK_JOB_* events. The mount is stood in for by a plain
directory holding ``.mirrorfs/socket``, which is all the CLI reads from it.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from qmp_thread import QMPServerThread
from mirrorfs.cli import main
from mirrorfs.control.render import (format_eta, job_eta, job_percent, render_status_table,
                                     status_row)
from mirrorfs.control.qmp_server import QMPServer
from mirrorfs.errors import ControlError, QMPCommandError

MIRRORFS = str(Path(sys.executable).with_name("mirrorfs"))
MiB = 1 << 20


class FakeEngine:
    """QMP commands over a dict of jobs, with QEMU's preconditions and events."""

    def __init__(self) -> None:
        self.server: QMPServer | None = None
        self.jobs: dict[str, dict[str, Any]] = {}
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def command_names(self) -> list[str]:
        return ["query-block-jobs", "drive-mirror", "block-job-complete", "block-job-cancel",
                "block-job-pause", "block-job-resume", "block-job-set-speed", "transaction"]

    def add_job(self, device: str, *, ready: bool = False, length: int = 8 * MiB,
                progress_rate: float | None = None, target: str = "/t/x.img") -> None:
        self.jobs[device] = {"device": device, "len": length, "offset": length if ready else 0,
                             "ready": ready, "paused": False, "speed": 0, "target": target,
                             "progress_rate": progress_rate, "start": time.monotonic()}

    def _info(self, job: dict[str, Any]) -> dict[str, Any]:
        offset = job["offset"]
        if job["progress_rate"] and not job["ready"]:
            offset = min(job["len"], int((time.monotonic() - job["start"]) * job["progress_rate"]))
            if offset == job["len"]:
                job["ready"] = True
        ready = job["ready"]
        return {"type": "mirror", "device": job["device"], "len": job["len"],
                "offset": job["len"] if ready else offset, "busy": not ready, "paused": job["paused"],
                "speed": job["speed"], "io-status": "ok", "ready": ready,
                "status": "paused" if job["paused"] else ("ready" if ready else "running"),
                "auto-finalize": True, "auto-dismiss": True, "target": job["target"],
                "dirty-bytes": 0 if ready else job["len"] - offset, "copy-mode": "background",
                **({"rate": job["progress_rate"]} if job["progress_rate"] and not ready else {})}

    def _job(self, device: Any) -> dict[str, Any]:
        if device not in self.jobs:
            # The real engine's JobNotFoundError: QEMU's class for "no active job on that device".
            raise ControlError(f"Block job '{device}' not found", qmp_class="DeviceNotActive", exit_code=2)
        return self.jobs[device]

    def _check(self, action: str, data: dict[str, Any]) -> None:
        job = self._job(data.get("device"))
        if action == "block-job-complete" and not self._info(job)["ready"]:
            raise ControlError(f"Job '{data['device']}' in state 'running' cannot accept command verb "
                               f"'complete'", qmp_class="GenericError")

    def _finish(self, action: str, data: dict[str, Any]) -> None:
        job = self.jobs.pop(data["device"])
        info = self._info(job)
        base = {"type": "mirror", "device": job["device"], "len": info["len"], "offset": info["offset"],
                "speed": job["speed"]}
        assert self.server is not None
        if action == "block-job-complete" or (info["ready"] and not data.get("force")):
            self.server.emit("BLOCK_JOB_COMPLETED", base)
        else:
            self.server.emit("BLOCK_JOB_CANCELLED", base)

    async def execute(self, name: str, args: dict[str, Any]) -> Any:
        self.calls.append((name, copy.deepcopy(args)))
        if name == "query-block-jobs":
            return [self._info(j) for j in self.jobs.values()]
        if name == "drive-mirror":
            device = args.get("job-id", args["device"])
            if args["device"] == "missing.img":
                raise ControlError("image 'missing.img' does not exist under the mount",
                                   qmp_class="DeviceNotFound", exit_code=2)
            if device in self.jobs:
                raise ControlError(f"a job '{device}' already exists", qmp_class="GenericError")
            self.add_job(device, target=args["target"])
            return {}
        if name in ("block-job-complete", "block-job-cancel"):
            self._check(name, args)
            self._finish(name, args)
            return {}
        if name == "transaction":
            actions = args["actions"]
            for action in actions:  # every precondition first: all or nothing
                self._check(action["type"], action["data"])
            for action in actions:
                self._finish(action["type"], action["data"])
            return {}
        if name in ("block-job-pause", "block-job-resume"):
            self._job(args["device"])["paused"] = name == "block-job-pause"
            return {}
        if name == "block-job-set-speed":
            self._job(args["device"])["speed"] = args["speed"]
            return {}
        raise AssertionError(name)


class ServerThread(QMPServerThread):
    """A QMPServer with a FakeEngine in its own thread and trio loop."""

    def __init__(self, path: str) -> None:
        self.engine = FakeEngine()
        super().__init__(path, self.engine)


@pytest.fixture
def mount(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, ServerThread]]:
    """A directory that looks like a mount to the CLI, and the server behind its socket file."""
    d = tempfile.mkdtemp(prefix="mfc", dir="/tmp")
    try:
        mnt = os.path.join(d, "mnt")
        os.makedirs(os.path.join(mnt, ".mirrorfs"))
        sock = os.path.join(d, "qmp.sock")
        Path(mnt, ".mirrorfs", "socket").write_text(sock + "\n")
        monkeypatch.chdir(d)
        with ServerThread(sock) as st:
            yield mnt, st
    finally:
        shutil.rmtree(d, ignore_errors=True)


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def sent(st: ServerThread, name: str) -> list[dict[str, Any]]:
    return [args for n, args in st.engine.calls if n == name]


# ---------------------------------------------------------------------------- mirror

def test_mirror_translates_every_option(mount: Any, capsys: Any) -> None:
    mnt, st = mount
    code, out, err = run_cli(capsys, "mirror", mnt, "./vm/../vm/a.img", "out/t.img", "--sync", "top",
                             "--granularity", "1M", "--speed", "10M", "--buf-size", "2MiB", "--create",
                             "--bitmap", "bm/a.bitmap", "--copy-mode", "write-blocking",
                             "--on-target-error", "stop", "--job-id", "j1")
    assert (code, err) == (0, "")
    cwd = os.getcwd()
    assert sent(st, "drive-mirror") == [{
        "device": "vm/a.img", "target": os.path.join(cwd, "out/t.img"), "sync": "top", "create": True,
        "copy-mode": "write-blocking", "on-target-error": "stop", "granularity": MiB, "speed": 10 * MiB,
        "buf-size": 2 * MiB, "bitmap": os.path.join(cwd, "bm/a.bitmap"), "job-id": "j1"}]
    assert "mirroring vm/a.img" in out and "job j1" in out


def test_mirror_defaults_and_nbd_target(mount: Any, capsys: Any) -> None:
    mnt, st = mount
    code, _, _ = run_cli(capsys, "mirror", mnt, "a.img", "nbd+unix:///exp?socket=/run/x.sock")
    assert code == 0
    # Options not given are not sent: the daemon's validator applies the same defaults.
    assert sent(st, "drive-mirror") == [{"device": "a.img", "target": "nbd+unix:///exp?socket=/run/x.sock"}]


def test_mirror_says_what_it_started_on_one_line(mount: Any, capsys: Any) -> None:
    """An image's name may hold a newline or a terminal escape; the line printed holds neither."""
    mnt, st = mount
    code, out, err = run_cli(capsys, "mirror", mnt, "a\nb\x1b[2J.img", "/t/x.img")
    assert (code, err) == (0, "")
    assert out == ("mirroring a\\nb\\x1b[2J.img to /t/x.img (job a\\nb\\x1b[2J.img); "
                   f"'mirrorfs status {mnt}' shows its progress\n")


@pytest.mark.parametrize("argv, message", [
    (["../../etc/passwd", "t.img"], "image '../../etc/passwd' leaves the mount"),
    (["a/../../x", "t.img"], "leaves the mount"),
    (["/etc/passwd", "t.img"], "must be a path relative to the mount"),
    ([".", "t.img"], "names the mount itself"),
    (["a.img", "t.img", "--granularity", "3000"], "invalid granularity 3000: must be a power of two"),
    (["a.img", "t.img", "--granularity", "128M"], "invalid granularity 134217728: must be a power of two"),
    (["a.img", "t.img", "--speed", "fast"], "invalid speed 'fast'"),
    (["a.img", "t.img", "--buf-size", "0"], "buf-size 0 must be at least the granularity"),
    (["a.img", "t.img", "--buf-size", "32K"], "must be at least the granularity (65536 bytes)"),
    (["a.img", "t.img", "--buf-size", "64K", "--granularity", "1M"], "at least the granularity (1048576"),
    (["a.img", "t.img", "--sync", "dirty"], "sync 'dirty' copies the clusters set in a bitmap"),
    (["a.img", "mnt/inside.img"], "lies inside the mount"),
    (["a.img", "http://example.com/x"], "unsupported target URI"),
    (["a.img", "nbd+tcp://host/x"], "unsupported target URI 'nbd+tcp://host/x'"),
    (["a.img", "t.img", "--sync", "sideways"], "parameter 'sync' must be one of"),
])
def test_mirror_bad_input_exit_2_and_nothing_sent(mount: Any, capsys: Any, argv: list[str], message: str) -> None:
    mnt, st = mount
    code, out, err = run_cli(capsys, "mirror", mnt, *argv)
    assert code == 2 and out == ""
    assert err.startswith("mirrorfs mirror: ") and message in err and err.count("\n") == 1
    assert st.engine.calls == [], "bad input must be refused before anything is sent"


def test_mirror_refusals_from_the_server(mount: Any, capsys: Any) -> None:
    mnt, st = mount
    assert run_cli(capsys, "mirror", mnt, "missing.img", "t.img") == \
        (2, "", "mirrorfs mirror: image 'missing.img' does not exist under the mount\n")
    assert run_cli(capsys, "mirror", mnt, "a.img", "t.img")[0] == 0
    assert run_cli(capsys, "mirror", mnt, "a.img", "t.img") == \
        (1, "", "mirrorfs mirror: a job 'a.img' already exists\n")


# ---------------------------------------------------------------------------- status

def test_status_no_jobs_table_and_json(mount: Any, capsys: Any) -> None:
    mnt, st = mount
    assert run_cli(capsys, "status", mnt) == (0, "no jobs\n", "")
    assert run_cli(capsys, "status", mnt, "--json") == (0, "[]\n", "")
    st.call(st.engine.add_job, "vm/a.img", ready=True)
    st.call(st.engine.add_job, "b.img", length=4 * MiB, target="nbd://h/b")
    code, out, _ = run_cli(capsys, "status", mnt, "--json")
    jobs = json.loads(out)
    assert code == 0 and [j["device"] for j in jobs] == ["vm/a.img", "b.img"]
    assert jobs[0]["ready"] is True and jobs[0]["status"] == "ready" and jobs[1]["target"] == "nbd://h/b"
    code, out, _ = run_cli(capsys, "status", mnt)
    assert out == render_status_table(jobs)
    header, row_a, row_b = out.splitlines()
    assert header.split() == ["JOB", "IMAGE", "STATE", "PROGRESS", "DIRTY", "RATE", "ETA", "LAG", "TARGET", "IO-STATUS",
                              "PAUSED", "REPLICA"]
    assert row_a.split() == ["vm/a.img", "vm/a.img", "ready", "8.0", "MiB/8.0", "MiB", "100.0%", "0", "B", "-", "0:00", "-",
                             "/t/x.img", "ok", "no", "-"]
    assert "0 B/4.0 MiB 0.0%" in row_b and "4.0 MiB" in row_b and "nbd://h/b" in row_b


def test_status_via_real_console_script(mount: Any) -> None:
    mnt, st = mount
    st.call(st.engine.add_job, "a.img")
    result = subprocess.run([MIRRORFS, "status", mnt, "--json"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert [j["device"] for j in json.loads(result.stdout)] == ["a.img"]
    result = subprocess.run([MIRRORFS, "complete", mnt, "a.img"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr == ("mirrorfs complete: Job 'a.img' in state 'running' cannot accept command verb "
                             "'complete'\n")


# ---------------------------------------------------------------------------- complete / cancel

def test_complete_single_refused_then_done(mount: Any, capsys: Any) -> None:
    mnt, st = mount
    st.call(st.engine.add_job, "a.img")
    code, out, err = run_cli(capsys, "complete", mnt, "a.img")
    assert code == 1 and "cannot accept command verb 'complete'" in err
    assert "a.img" in st.engine.jobs
    st.engine.jobs["a.img"]["ready"] = True
    code, out, err = run_cli(capsys, "complete", mnt, "a.img")
    assert (code, err) == (0, "") and "completed a.img: the mount now serves the target" in out
    assert sent(st, "block-job-complete") == [{"device": "a.img", "pivot": True}] * 2
    assert st.engine.jobs == {}
    assert run_cli(capsys, "complete", mnt, "a.img") == \
        (2, "", "mirrorfs complete: Block job 'a.img' not found\n")


def test_complete_several_is_one_transaction_all_or_nothing(mount: Any, capsys: Any) -> None:
    mnt, st = mount
    st.call(st.engine.add_job, "a.img", ready=True)
    st.call(st.engine.add_job, "b.img")
    code, _, err = run_cli(capsys, "complete", mnt, "a.img", "b.img", "--no-pivot")
    assert code == 1 and "Job 'b.img'" in err
    assert set(st.engine.jobs) == {"a.img", "b.img"}, "a refused transaction changes nothing"
    st.engine.jobs["b.img"]["ready"] = True
    code, out, err = run_cli(capsys, "complete", mnt, "a.img", "./b.img", "--no-pivot")
    assert (code, err) == (0, "")
    assert out.count("the target is an exact copy, the mount stays on the source") == 2
    expected = {"actions": [{"type": "block-job-complete", "data": {"device": "a.img", "pivot": False}},
                            {"type": "block-job-complete", "data": {"device": "b.img", "pivot": False}}]}
    assert sent(st, "transaction") == [expected, expected]
    assert sent(st, "block-job-complete") == [] and st.engine.jobs == {}


def test_cancel_single_and_transaction(mount: Any, capsys: Any) -> None:
    mnt, st = mount
    for name, ready in (("a.img", False), ("b.img", True), ("c.img", True)):
        st.call(st.engine.add_job, name, ready=ready)
    code, out, _ = run_cli(capsys, "cancel", mnt, "a.img")
    assert code == 0 and out == "cancelled a.img\n"
    code, out, _ = run_cli(capsys, "cancel", mnt, "b.img", "c.img", "--force")
    assert code == 0 and out == "cancelled b.img\ncancelled c.img\n"
    assert sent(st, "block-job-cancel") == [{"device": "a.img", "force": False}]
    assert sent(st, "transaction") == [{"actions": [
        {"type": "block-job-cancel", "data": {"device": "b.img", "force": True}},
        {"type": "block-job-cancel", "data": {"device": "c.img", "force": True}}]}]
    st.call(st.engine.add_job, "d.img", ready=True)
    code, out, _ = run_cli(capsys, "cancel", mnt, "d.img")
    assert code == 0 and out == "cancelled d.img after ready: the target is an exact copy\n"


@pytest.mark.parametrize("cmd", ["complete", "cancel"])
def test_complete_cancel_bad_input(mount: Any, capsys: Any, cmd: str) -> None:
    mnt, st = mount
    code, _, err = run_cli(capsys, cmd, mnt, "a.img", "a.img")
    assert code == 2 and err == f"mirrorfs {cmd}: 'a.img' is given twice: name each job once\n"
    code, _, err = run_cli(capsys, cmd, mnt, "a.img", "../x")
    assert code == 2 and "leaves the mount" in err
    assert st.engine.calls == []
    assert run_cli(capsys, cmd, mnt, "nope.img") == (2, "", f"mirrorfs {cmd}: Block job 'nope.img' not found\n")


# ---------------------------------------------------------------------------- pause / resume / set-speed

def test_pause_resume_set_speed(mount: Any, capsys: Any) -> None:
    mnt, st = mount
    st.call(st.engine.add_job, "a.img")
    assert run_cli(capsys, "pause", mnt, "a.img") == (0, "paused a.img\n", "")
    assert st.engine.jobs["a.img"]["paused"] is True
    assert run_cli(capsys, "resume", mnt, "a.img") == (0, "resumed a.img\n", "")
    assert st.engine.jobs["a.img"]["paused"] is False
    assert run_cli(capsys, "set-speed", mnt, "a.img", "2M") == (0, "a.img: speed limit 2.0 MiB/s\n", "")
    assert st.engine.jobs["a.img"]["speed"] == 2 * MiB
    assert run_cli(capsys, "set-speed", mnt, "a.img", "0")[1] == "a.img: speed limit none\n"
    code, _, err = run_cli(capsys, "set-speed", mnt, "a.img", "-5")
    assert code == 2 and "invalid speed '-5'" in err
    for cmd in ("pause", "resume"):
        assert run_cli(capsys, cmd, mnt, "x.img") == (2, "", f"mirrorfs {cmd}: Block job 'x.img' not found\n")
    assert sent(st, "block-job-set-speed") == [{"device": "a.img", "speed": 2 * MiB}, {"device": "a.img", "speed": 0}]


# ---------------------------------------------------------------------------- qmp

def test_qmp_one_command(mount: Any, capsys: Any) -> None:
    mnt, st = mount
    st.call(st.engine.add_job, "a.img")
    code, out, _ = run_cli(capsys, "qmp", mnt, '{"execute": "query-block-jobs", "id": "mine"}')
    reply = json.loads(out)
    assert code == 0 and reply["id"] == "mine" and reply["return"][0]["device"] == "a.img"
    code, out, _ = run_cli(capsys, "qmp", mnt, '{"execute": "block-job-complete", "arguments": {"device": "a.img"}}')
    assert code == 1 and json.loads(out) == {"error": {"class": "GenericError", "desc":
                                            "Job 'a.img' in state 'running' cannot accept command verb 'complete'",
                                            "__org.mirrorfs_exit-code": 1}}
    code, out, _ = run_cli(capsys, "qmp", mnt, '{"execute": "nope"}')
    assert code == 1 and json.loads(out)["error"]["class"] == "CommandNotFound"
    code, out, _ = run_cli(capsys, "qmp", mnt, '{"execute": 5}')
    assert code == 1 and json.loads(out)["error"]["desc"] == "QMP input member 'execute' must be a string"
    assert run_cli(capsys, "qmp", mnt, "{not json")[0:2] == (2, "")
    code, _, err = run_cli(capsys, "qmp", mnt, "[1]")
    assert code == 2 and "must be a JSON object" in err


def test_qmp_interactive(mount: Any) -> None:
    mnt, st = mount
    st.call(st.engine.add_job, "a.img", ready=True)
    stdin = ('{"execute": "query-version"}\n'
             'block-job-set-speed device=a.img speed=1024\n'
             'garbage=\n'
             'block-job-complete device=a.img\n'
             '\n')
    result = subprocess.run([MIRRORFS, "qmp", mnt], input=stdin, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert lines[0]["return"]["package"].startswith("mirrorfs ")
    assert lines[1] == {"return": {}}
    assert lines[2] == {"error": {"class": "CommandNotFound", "desc": "The command garbage= has not been found",
                                  "__org.mirrorfs_exit-code": 2}}
    assert lines[3] == {"return": {}}
    assert lines[4]["event"] == "BLOCK_JOB_COMPLETED" and lines[4]["data"]["device"] == "a.img"
    assert len(lines) == 5
    assert ("block-job-set-speed", {"device": "a.img", "speed": 1024}) in st.engine.calls


# ---------------------------------------------------------------------------- finding the mount

def test_no_mount_errors(tmp_path: Path, capsys: Any) -> None:
    plain = tmp_path / "plain"
    plain.mkdir()
    code, _, err = run_cli(capsys, "status", str(plain))
    assert code == 2 and err.startswith(f"mirrorfs status: no mirrorfs mount serves {plain}") \
        and "mirrorfs mount SOURCE_DIR" in err and err.count("\n") == 1
    code, _, err = run_cli(capsys, "pause", str(tmp_path / "absent"), "a.img")
    assert code == 2 and "is not a directory" in err
    # A socket file that nobody serves any more (the mount process was killed).
    (plain / ".mirrorfs").mkdir()
    dead = f"/tmp/mfc-dead-{os.getpid()}.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(dead)
    s.close()
    try:
        (plain / ".mirrorfs" / "socket").write_text(dead + "\n")
        code, _, err = run_cli(capsys, "status", str(plain))
        assert code == 2 and "refused the connection" in err
    finally:
        os.unlink(dead)
    code, _, err = run_cli(capsys, "status", str(plain))
    assert code == 2 and "does not exist" in err


# ---------------------------------------------------------------------------- render (pure)

@pytest.mark.parametrize("qmp_class, code", [("DeviceNotFound", 2), ("DeviceNotActive", 2),
                                             ("CommandNotFound", 2), ("GenericError", 1)])
def test_qmp_error_class_to_exit_code(qmp_class: str, code: int) -> None:
    exc = QMPCommandError(qmp_class, "desc text")
    assert (exc.exit_code, exc.qmp_class, str(exc)) == (code, qmp_class, "desc text")


def test_render_pure_functions() -> None:
    job = {"device": "a", "len": 100 * MiB, "offset": 25 * MiB, "rate": 5 * MiB, "status": "running",
           "dirty-bytes": 75 * MiB, "target": "/t", "io-status": "ok", "paused": False}
    assert job_percent(job) == 25.0
    assert job_eta(job) == 15.0 and format_eta(15.0) == "0:15" and format_eta(3725) == "1:02:05"
    assert status_row(job) == ["a", "a", "running", "25.0 MiB/100.0 MiB 25.0%", "75.0 MiB", "5.0 MiB/s", "0:15",
                               "-", "/t", "ok", "no", "-"]
    lags = [status_row({**job, "__org.mirrorfs_recovery-point-age": age})[7] for age in (0, 12.34, 3725.2)]
    assert lags == ["0s", "12.3s", "1:02:06"]
    assert job_eta({**job, "paused": True}) is None and format_eta(None) == "-"
    assert job_eta({**job, "ready": True}) == 0.0
    assert job_percent({"len": 0, "offset": 0}) == 100.0
    failed = status_row({"device": "b", "status": "concluded", "error": "Input/output error", "len": 1})
    assert failed[2] == "concluded: Input/output error" and failed[5] == "-"
    assert render_status_table([]) == "no jobs\n"
    table = render_status_table([job, {**job, "device": "long/name.img"}])
    lines = table.splitlines()
    assert len(lines) == 3 and table.endswith("\n") and "\x1b" not in table
    assert lines[1].index("running") == lines[2].index("running") == lines[0].index("STATE")


# ---------------------------------------------------------------------------- --watch in a terminal

@pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux")
def test_status_watch_in_tmux(mount: Any) -> None:
    mnt, st = mount
    st.call(st.engine.add_job, "wd.img", length=64 * MiB, progress_rate=16 * MiB)
    # Our own tmux server on a socket in the test's directory: nothing shared, nothing left over.
    tmux = ["tmux", "-S", os.path.join(os.path.dirname(mnt), "tmux.sock")]
    subprocess.run(tmux + ["new-session", "-d", "-x", "150", "-y", "15", f"{MIRRORFS} status {mnt} --watch"],
                   check=True, timeout=30)
    try:
        def pane() -> str:
            return subprocess.run(tmux + ["capture-pane", "-p"], capture_output=True, text=True,
                                  timeout=30).stdout

        percents: list[float] = []
        rate_shown = False
        deadline = time.monotonic() + 40
        screen = ""
        while time.monotonic() < deadline:
            screen = pane()
            line = next((ln for ln in screen.splitlines() if "wd.img" in ln), "")
            m = re.search(r"(\d+\.\d)%", line)
            if m:
                percents.append(float(m.group(1)))
                rate_shown |= "16.0 MiB/s" in line and "ETA 0:0" in line
                if "ready" in line:
                    break
            time.sleep(0.1)
        assert "ready" in screen, f"never showed ready:\n{screen}"
        moving = [p for p in percents if 0 < p < 100]
        assert len(set(moving)) >= 2 and moving == sorted(moving), f"the bar did not advance: {percents}"
        assert percents[-1] == 100.0
        assert "━" in screen or "█" in screen or "─" in screen, f"no bar drawn:\n{screen}"
        assert rate_shown, "rate and ETA were never shown while copying"
        subprocess.run(tmux + ["send-keys", "C-c"], check=True, timeout=30)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            alive = subprocess.run(tmux + ["has-session"], capture_output=True, timeout=30).returncode == 0
            if not alive:
                break
            time.sleep(0.1)
        assert not alive, "Ctrl-C did not end mirrorfs status --watch"
    finally:
        subprocess.run(tmux + ["kill-server"], capture_output=True, timeout=30)
