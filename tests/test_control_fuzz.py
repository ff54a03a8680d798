"""Fuzz the real QMP socket and the real ``.mirrorfs/control`` of a mount (issue 5, "Done when" 3).

hypothesis sends malformed JSON, JSON of the wrong shape, wrong argument types, unknown commands
and arguments, huge lines and binary junk. For every input: an error reply (socket) or a failed
write(2) with EINVAL / EBUSY (control file), never a success; a second client that stays
connected the whole time keeps being served; and no job changes state: one job is ready, one is
paused mid-copy, and both keep their status, target, speed and flags. (The protocol core's own
fuzz, without a mount, is ``tests/test_qmp_proto.py``; a fixed junk corpus is in
``tests/test_qmp_mount.py``.)

Inputs never name a real job without also carrying something invalid, so a generated input
cannot be a valid command by chance.
"""

from __future__ import annotations

import errno
import json
import os
import socket
from pathlib import Path
from typing import Any, Iterator

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from mounting import Mount, wait_for

MiB = 1 << 20
JOBS = ("r.img", "p.img")
KEYS = ("status", "ready", "paused", "target", "speed", "io-status", "copy-mode", "len", "device")
COMMANDS = ("drive-mirror", "block-job-complete", "block-job-cancel", "block-job-pause",
            "block-job-resume", "block-job-set-speed", "transaction", "query-block-jobs",
            "qmp_capabilities", "query-version", "bogus-command", "")
ARG_NAMES = ("device", "target", "sync", "speed", "force", "pivot", "mode", "granularity",
             "buf-size", "job-id", "actions", "bitmap", "copy-mode", "bogus")

FUZZ = settings(max_examples=40, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                       HealthCheck.data_too_large])

# ---------------------------------------------------------------------------- strategies

json_scalar = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=False),
                        st.text(max_size=20), st.sampled_from(["nope.img", "../../etc/passwd", "/etc/passwd",
                                                               ".mirrorfs/control", "", "0", "-1"]))
json_value = st.recursive(json_scalar, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                                st.dictionaries(st.text(max_size=8), inner,
                                                                                max_size=4)), max_leaves=10)


@st.composite
def bad_commands(draw: Any) -> dict[str, Any]:
    """A QMP command that must fail: wrong names, types, arguments; a real job only with junk."""
    name = draw(st.one_of(st.sampled_from(COMMANDS), st.text(max_size=30)))
    args = draw(st.dictionaries(st.one_of(st.sampled_from(ARG_NAMES), st.text(max_size=10)), json_value,
                                max_size=5))
    if draw(st.booleans()):
        # A real job, made invalid by an unknown argument (every command rejects "bogus").
        args["device"] = draw(st.sampled_from(JOBS))
        args["bogus"] = draw(json_value)
    elif "device" in args and args["device"] in JOBS:
        args["device"] = "nope.img"
    if name.startswith("query-") or name == "":
        args["bogus"] = 1  # queries take no argument, so this one fails
    msg: dict[str, Any] = {"execute": name, "arguments": args}
    shape = draw(st.sampled_from(["ok", "args-not-object", "execute-not-string", "extra-key", "no-execute"]))
    if shape == "args-not-object":
        msg["arguments"] = draw(st.one_of(st.lists(json_scalar, max_size=3), json_scalar))
    elif shape == "execute-not-string":
        msg["execute"] = draw(st.one_of(st.integers(), st.lists(st.text(max_size=5), max_size=2), st.none()))
    elif shape == "extra-key":
        msg[draw(st.sampled_from(["extra", "exec", "Execute", "oob"]))] = draw(json_scalar)
    elif shape == "no-execute":
        del msg["execute"]
    return msg


# A complete input (each must get at least one error reply), with a name for the failure report.
complete_inputs = st.one_of(
    bad_commands().map(lambda m: json.dumps(m).encode()),
    json_value.filter(lambda v: not isinstance(v, dict)).map(lambda v: json.dumps(v).encode()),
    # malformed JSON that still ends (no quote or backslash left open)
    st.text(alphabet=st.characters(blacklist_characters='"\\{}[]', blacklist_categories=("Cs",)),
            min_size=1, max_size=60).map(lambda t: b'{"execute": ' + t.encode() + b"}"),
    st.sampled_from([1, 2, 3]).map(lambda n: b'{"execute": "query-version", "arguments": {"pad": "'
                                   + b"p" * (n * MiB) + b'"}}'),
)
# Anything at all: only "no success, the server survives, nothing changes" is required.
junk_inputs = st.one_of(st.binary(min_size=1, max_size=600),
                        st.text(max_size=200).map(lambda t: t.encode("utf-8", "surrogatepass")))


# ---------------------------------------------------------------------------- the mount


@pytest.fixture
def two_jobs(mounted: Mount, tmp_path: Path) -> Iterator[Mount]:
    """``r.img`` ready (sync none), ``p.img`` paused mid-copy; both cancelled at the end."""
    for name in JOBS:
        with open(mounted.mountpoint / name, "wb") as f:
            f.write(os.urandom(2 * MiB))
    mounted.cli("mirror", mounted.mountpoint, "r.img", tmp_path / "r-t.img", "--create", "--sync", "none")
    mounted.cli("mirror", mounted.mountpoint, "p.img", tmp_path / "p-t.img", "--create", "--speed", "64K",
                "--buf-size", "256K")
    mounted.cli("pause", mounted.mountpoint, "p.img")
    wait_for(lambda: (lambda j: j["r.img"]["ready"] and j["p.img"]["status"] in ("paused", "standby"))(jobs(mounted)),
             60, "r ready, p paused")
    yield mounted
    r = mounted.cli("cancel", mounted.mountpoint, *JOBS, "--force", check=False)
    assert r.returncode == 0, r.stderr


def jobs(mount: Mount) -> dict[str, dict[str, Any]]:
    return {j["device"]: j for j in json.loads((mount.control / "status.json").read_text())}


def snapshot(mount: Mount) -> dict[str, dict[str, Any]]:
    return {d: {k: j[k] for k in KEYS} | {"offset": j["offset"]} for d, j in jobs(mount).items()}


class Connection:
    """A raw, negotiated QMP connection that reads replies line by line with a timeout."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(20)
        self.sock.connect(path)
        self.file = self.sock.makefile("rb")
        assert "QMP" in json.loads(self.file.readline())
        self.sock.sendall(b'{"execute": "qmp_capabilities"}\n')
        assert json.loads(self.file.readline()) == {"return": {}}

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def replies_until(self, msg_id: str) -> list[dict[str, Any]]:
        """Every message until the reply with ``msg_id`` (inclusive); stops early at EOF."""
        out = []
        while True:
            line = self.file.readline()
            if not line:
                return out
            msg = json.loads(line)
            out.append(msg)
            if msg.get("id") == msg_id:
                return out

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def test_socket_fuzz(two_jobs: Mount) -> None:
    mount = two_jobs
    path = (mount.control / "socket").read_text().strip()
    before = snapshot(mount)
    bystander = Connection(path)
    counter = iter(range(10**9))

    def bystander_ok() -> None:
        tag = f"bystander-{next(counter)}"
        bystander.send(json.dumps({"execute": "query-block-jobs", "id": tag}).encode() + b"\n")
        reply = [m for m in bystander.replies_until(tag) if "event" not in m][-1]
        assert reply["id"] == tag and {j["device"] for j in reply["return"]} == set(JOBS)

    def check_unchanged(data: bytes) -> None:
        bystander_ok()
        assert snapshot(mount) == before, f"{data[:100]!r} changed a job"

    @FUZZ
    @given(data=complete_inputs)
    @example(data=b'{"execute": "block-job-cancel", "arguments": {"device": "' + b"p" * (2 * MiB) + b'"}}')
    @example(data=b"{" * 5000 + b"}" * 5000)
    def complete(data: bytes) -> None:
        tried.append(data)
        conn = Connection(path)
        try:
            conn.send(data + b"\n" + b'{"execute": "query-version", "id": "sentinel"}\n')
            msgs = conn.replies_until("sentinel")
        finally:
            conn.close()
        assert msgs and msgs[-1].get("id") == "sentinel" and "return" in msgs[-1], (data[:100], msgs[-3:])
        answers = [m for m in msgs[:-1] if "event" not in m]
        assert answers, f"no reply to {data[:100]!r}"
        assert all("error" in m and {"class", "desc"} <= set(m["error"]) for m in answers), (data[:100], answers)
        check_unchanged(data)

    @FUZZ
    @given(data=junk_inputs)
    @example(data=bytes(range(256)) * 64)
    @example(data=b'{"execute": "block-job-cancel", "arguments": {"device": "p.img"}')  # unterminated
    def junk(data: bytes) -> None:
        tried.append(data)
        conn = Connection(path)
        try:
            # A quote and closing brackets end whatever the junk left open; then the sentinel.
            conn.send(data + b'\n"' + b"}]" * 100 + b"\n" + b'{"execute": "query-version", "id": "sentinel"}\n')
            try:
                msgs = conn.replies_until("sentinel")
            except (socket.timeout, TimeoutError):
                msgs = []  # the junk left the parser inside a string: the server still waits
        finally:
            conn.close()
        assert not any("return" in m for m in msgs if m.get("id") != "sentinel"), (data[:100], msgs)
        check_unchanged(data)

    tried: list[bytes] = []
    try:
        complete()
        junk()
    finally:
        bystander.close()
    assert len(tried) >= 60, f"hypothesis ran only {len(tried)} examples"


CONTROL_WORDS = ("mirror", "complete", "cancel", "pause", "resume", "set-speed", "frobnicate", "")


@st.composite
def bad_lines(draw: Any) -> bytes:
    """A control line that must fail (EINVAL or EBUSY), never a valid command."""
    command = draw(st.sampled_from(CONTROL_WORDS))
    words = draw(st.lists(st.one_of(
        st.sampled_from(["nope.img", "../../etc/passwd", "/etc/passwd", ".mirrorfs/control", "pivot=maybe",
                         "force=perhaps", "speed=fast", "sync=sideways", "colour=blue", "'unclosed",
                         "granularity=3K", "1M", "0", "=", "a=b=c"]),
        st.text(alphabet=st.characters(blacklist_categories=("Cs", "Cc")), max_size=15)), max_size=4))
    if draw(st.booleans()):
        words = [draw(st.sampled_from(JOBS))] + words + [draw(st.sampled_from(["bogus=1", "colour=blue"]))]
        if command in ("pause", "resume", "set-speed"):
            words.append("extra")  # one word too many for these
    else:
        words = [w if w not in JOBS else "nope.img" for w in words]
    if command == "":
        command = draw(st.text(alphabet="abcdefghij-", min_size=1, max_size=12).filter(
            lambda c: c not in CONTROL_WORDS))
    return " ".join([command, *words]).encode() + b"\n"


control_inputs = st.one_of(
    bad_lines(),
    st.binary(min_size=1, max_size=600).filter(lambda b: b.strip(b" \t\r\n\x0b\x0c\x1c\x1d\x1e\x85") != b""),
    st.sampled_from([70_000, 200_000, 1_000_000]).map(lambda n: b"pause " + b"x" * n + b"\n"),
)


def _effective(data: bytes) -> bool:
    """Whether a write holds any line the control file would run (not blank, not a comment)."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return any(ln.strip() and not ln.lstrip().startswith("#") for ln in text.splitlines())


def test_control_file_fuzz(two_jobs: Mount) -> None:
    mount = two_jobs
    path = (mount.control / "socket").read_text().strip()
    before = snapshot(mount)
    bystander = Connection(path)

    @FUZZ
    @given(data=control_inputs)
    @example(data=b"cancel " + b"p" * (1 * MiB) + b"\n")
    @example(data=b"\xff\xfe cancel p.img force=true\n")
    @example(data=b"cancel p.img\0 force=true\n")
    def one(data: bytes) -> None:
        tried.append(data)
        fd = os.open(mount.control / "control", os.O_WRONLY)
        try:
            try:
                os.write(fd, data)
                result = 0
            except OSError as exc:
                result = exc.errno
        finally:
            os.close(fd)
        if _effective(data):
            assert result in (errno.EINVAL, errno.EBUSY), (data[:100], result)
            assert " -> error: " in (mount.control / "control").read_text().splitlines()[-1]
        else:
            assert result == 0, (data[:100], result)
        bystander.send(b'{"execute": "query-block-jobs", "id": "b"}\n')
        reply = [m for m in bystander.replies_until("b") if "event" not in m][-1]
        assert {j["device"] for j in reply["return"]} == set(JOBS)
        assert snapshot(mount) == before, f"{data[:100]!r} changed a job"

    tried: list[bytes] = []
    try:
        one()
    finally:
        bystander.close()
    assert len(tried) >= 30, f"hypothesis ran only {len(tried)} examples"
