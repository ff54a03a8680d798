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

The volume tests send ``QMP_MESSAGES`` generated QMP messages and ``CONTROL_LINES`` control lines
(twice as many under ``-m slow``) to one live mount each: raw JSON text with what
``json.dumps`` never writes (``1e999``, ``NaN``, integers of thousands of digits, nesting past
the limit, invalid UTF-8, NUL characters), over up to 8 concurrent clients, negotiated or not,
in writes of 1 byte to 1 MiB. Every message gets exactly one reply; after every batch the mount
serves I/O (bytes compared, on a plain and on a mirrored image) and answers
``query-block-jobs`` with both jobs unchanged; the mount log must stay free of tracebacks.
"""

from __future__ import annotations

import errno
import json
import multiprocessing
import os
import random
import socket
import threading
from pathlib import Path
from typing import Any, Iterator

import pytest
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

from mounting import Mount, random_image, wait_for

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
    """A raw QMP connection (negotiated unless told) that reads replies line by line with a timeout."""

    def __init__(self, path: str, *, negotiate: bool = True, timeout: float = 20) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.file = self.sock.makefile("rb")
        assert "QMP" in json.loads(self.file.readline())
        if negotiate:
            self.sock.sendall(b'{"execute": "qmp_capabilities"}\n')
            assert json.loads(self.file.readline()) == {"return": {}}

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv(self) -> dict[str, Any]:
        """The next reply (events are skipped); AssertionError at EOF."""
        while True:
            line = self.file.readline()
            assert line, "the server closed the connection"
            msg = json.loads(line)
            if "event" not in msg:
                return msg

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
    return any(ln.strip() and not ln.lstrip().startswith("#") for ln in text.split("\n"))


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


# ---------------------------------------------------------------------------- volume: one mount,
# thousands of hostile messages and lines, checked batch by batch

QMP_MESSAGES = 10_000
CONTROL_LINES = 2_000
SLOW_FACTOR = 2
BATCH = 50
LINE_BATCH = 20
SPLIT_BYTES = 16 * 1024
SAFE_NAMES = ("nope.img", "../r.img", "/etc/passwd", ".mirrorfs/control", "", "io.img/x")
IO_IMAGE = "io.img"

# Raw JSON text, built as bytes so it can hold what json.dumps never writes: non-finite and huge
# numbers, invalid UTF-8 inside strings, nesting past the limit. Every piece is one complete JSON
# value (or one malformed token), so each line the fuzzer sends gets exactly one reply.
_raw_number = st.one_of(
    st.integers(-2**64, 2**65).map(lambda n: str(n).encode()),
    st.floats(allow_nan=False, allow_infinity=False).map(lambda f: repr(f).encode()),
    st.sampled_from([b"1e999", b"-1e999", b"1E+400", b"NaN", b"Infinity", b"-Infinity", b"-0", b"1e-999",
                     b"0.0000001e-330", b"18446744073709551616", b"-9223372036854775809"]),
    st.integers(20, 20_000).map(lambda n: b"9" * n),
    st.integers(20, 2_000).map(lambda n: b"1" + b"0" * n + b".5"),
)
_raw_string = st.one_of(
    st.text(max_size=12).map(lambda t: json.dumps(t).encode()),
    st.sampled_from(SAFE_NAMES).map(lambda t: json.dumps(t).encode()),
    # raw bytes without a quote, backslash or control byte: invalid UTF-8, overlong forms, surrogates
    st.binary(max_size=12).map(lambda b: b'"' + bytes(c for c in b if c >= 0x20 and c not in b'"\\') + b'"'),
    st.sampled_from([b'"\\ud800"', b'"\\udcff.raw"', b'"\xed\xa0\x80"', b'"\xc0\xaf"', b'"a\\u0000b"']),
)
_raw_scalar = st.one_of(st.sampled_from([b"null", b"true", b"false"]), _raw_number, _raw_string)


def _raw_object(pairs: list[tuple[bytes, bytes]]) -> bytes:
    return b"{" + b", ".join(k + b": " + v for k, v in pairs) + b"}"


_raw_value = st.recursive(
    _raw_scalar,
    lambda inner: st.one_of(st.lists(inner, max_size=4).map(lambda xs: b"[" + b", ".join(xs) + b"]"),
                            st.lists(st.tuples(_raw_string, inner), max_size=4).map(_raw_object)),
    max_leaves=8)
_raw_deep = st.tuples(st.integers(100, 1_000), st.sampled_from([b"[", b'{"a": '])).map(
    lambda t: t[1] * t[0] + b"0" + (b"]" if t[1] == b"[" else b"}") * t[0])


@st.composite
def raw_messages(draw: Any) -> bytes:
    """One hostile QMP message: mostly commands with arbitrary arguments, never a valid
    state-changing one (job names are never used; drive-mirror and transaction carry an unknown
    argument, which they refuse before looking at anything else)."""
    kind = draw(st.sampled_from(["command", "command", "command", "value", "deep"]))
    if kind == "value":
        return draw(_raw_value)
    if kind == "deep":
        return draw(_raw_deep)
    name = draw(st.one_of(st.sampled_from(COMMANDS), st.text(max_size=20)))
    pairs = draw(st.lists(st.tuples(st.one_of(st.sampled_from(ARG_NAMES), st.text(max_size=8))
                                    .map(lambda k: json.dumps(k).encode()),
                                    st.one_of(_raw_value, _raw_deep)), max_size=5))
    if name in ("drive-mirror", "transaction", "bogus-command") or not name:
        pairs.append((b'"bogus"', b"1"))
    members = [(b'"execute"', json.dumps(name).encode())]
    if pairs or draw(st.booleans()):
        members.append((b'"arguments"', _raw_object(pairs)))
    if draw(st.booleans()):
        members.append((b'"id"', draw(_raw_value)))
    members = draw(st.permutations(members))
    return _raw_object(list(members))


def qmp_batch_layout(rng: random.Random, messages: list[bytes]
                     ) -> tuple[list[list[bytes]], list[bool], list[int]]:
    """Spread one batch over 1-8 clients; per client: negotiated or not, and its write size."""
    clients = rng.randint(1, 8)
    split = [messages[i::clients] for i in range(clients)]
    negotiate = [rng.random() < 0.5 for _ in range(clients)]
    chunks = [rng.choice([1, 7, 100, 4096, 1 << 20]) for _ in range(clients)]
    return split, negotiate, chunks


class Batcher:
    """Collects what hypothesis generates, one small example at a time, and hands each full
    batch to ``send``. Hypothesis's engine slows down badly on examples of thousands of
    choices (a whole batch), so each example is one message or line; the batch (and the checks
    after it) happens every ``size`` examples."""

    def __init__(self, size: int, send: Any) -> None:
        self.size = size
        self.send = send
        self.pending: list[bytes] = []
        self.sent = 0

    def add(self, item: bytes) -> None:
        self.pending.append(item)
        if len(self.pending) >= self.size:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            batch, self.pending = self.pending, []
            self.send(batch)
            self.sent += len(batch)


def generated_batches(kind: str, count: int, size: int) -> Iterator[list[bytes]]:
    """``count`` examples of ``GENERATED[kind]`` from hypothesis (``FUZZ``, generate phase only,
    so always the same ones), in batches of ``size``. Generating costs about as much CPU as
    sending and checking, and in one process both would share one core: so hypothesis runs in
    a child process and generates the next batches while this one sends the current batch."""
    ctx = multiprocessing.get_context("spawn")  # this process has threads: no fork
    queue = ctx.Queue()
    child = ctx.Process(target=_generate, args=(kind, count, size, queue), daemon=True)
    child.start()
    try:
        while (batch := queue.get(timeout=300)) is not None:
            if isinstance(batch, str):
                pytest.fail(batch, pytrace=False)
            yield batch
    finally:
        child.kill()
        child.join()


def _generate(kind: str, count: int, size: int, queue: Any) -> None:
    """The child process of ``generated_batches``."""
    try:
        batcher = Batcher(size, queue.put)

        @settings(FUZZ, max_examples=count, phases=[Phase.generate])
        @given(item=GENERATED[kind]())
        def one(item: bytes) -> None:
            batcher.add(item)

        one()
        batcher.flush()
        queue.put(None)
    except BaseException as exc:
        queue.put(f"hypothesis failed to generate {kind} inputs: {exc!r}")


def _qmp_client(path: str, lines: list[bytes], negotiate: bool, chunk: int, errors: list[str]) -> None:
    """Send ``lines`` in writes of ``chunk`` bytes, then a sentinel; check one reply per line."""
    try:
        conn = Connection(path, negotiate=negotiate, timeout=60)
        sock = conn.sock
        try:
            data = b"".join(line + b"\n" for line in lines)
            data += b'{"execute": "query-block-jobs", "id": "sentinel"}\n'
            # Small writes for the first SPLIT_BYTES only: a megabyte a byte at a time is slow
            # and tests nothing more.
            cuts = [*range(0, min(len(data), SPLIT_BYTES), chunk), *range(SPLIT_BYTES, len(data), 1 << 16)]
            sender = threading.Thread(target=lambda: [sock.sendall(data[a:b]) for a, b in
                                                      zip(cuts, [*cuts[1:], len(data)])])
            sender.start()  # replies are read meanwhile: a client that never reads is another test
            replies = [conn.recv()]
            while replies[-1].get("id") != "sentinel":
                replies.append(conn.recv())
            sender.join()
            *answers, sentinel = replies
            assert len(answers) == len(lines), f"{len(answers)} replies to {len(lines)} messages"
            for line, reply in zip(lines, answers):
                assert "error" in reply or "return" in reply, (line[:200], reply)
                if "return" in reply and not negotiate:  # only qmp_capabilities runs before it
                    assert b'"qmp_capabilities"' in line, (line[:200], reply)
                    negotiate = True
            assert ("return" in sentinel) == negotiate, sentinel
        finally:
            conn.close()
    except Exception as exc:
        errors.append(f"{exc!r}"[:2000])


def _assert_io_and_jobs(mount: Mount, bystander: Connection, before: dict[str, Any], tag: str) -> None:
    """The mount serves I/O (bytes compared) and QMP, and no job changed."""
    data = os.urandom(64 * 1024)
    offset = int.from_bytes(os.urandom(2), "little") * 16
    fd = os.open(mount.mountpoint / IO_IMAGE, os.O_RDWR)
    try:
        os.pwrite(fd, data, offset)
        assert os.pread(fd, len(data), offset) == data
    finally:
        os.close(fd)
    with open(mount.mountpoint / "r.img", "r+b") as f:  # a mirrored image: the write is duplicated
        f.seek(offset)
        f.write(data)
        f.seek(offset)
        assert f.read(len(data)) == data
    bystander.send(json.dumps({"execute": "query-block-jobs", "id": tag}).encode() + b"\n")
    reply = [m for m in bystander.replies_until(tag) if "event" not in m][-1]
    assert reply["id"] == tag and {j["device"] for j in reply["return"]} == set(JOBS), reply
    assert stable_state(mount) == before


@pytest.fixture
def volume_mount(two_jobs: Mount) -> Iterator[tuple[Mount, str, Connection, dict[str, Any]]]:
    """The two jobs plus a plain image for I/O checks: (mount, socket path, bystander, state)."""
    random_image(two_jobs, IO_IMAGE, 4 * MiB)
    path = (two_jobs.control / "socket").read_text().strip()
    bystander = Connection(path)
    try:
        yield two_jobs, path, bystander, stable_state(two_jobs)
    finally:
        bystander.close()


def stable_state(mount: Mount) -> dict[str, dict[str, Any]]:
    """What no hostile input may change (offsets move: writes to a ready job's image count)."""
    return {d: {k: j[k] for k in KEYS} for d, j in jobs(mount).items()}


VOLUME = [pytest.param(1, id="default", marks=pytest.mark.timeout(900)),
          pytest.param(SLOW_FACTOR, id="slow", marks=[pytest.mark.slow, pytest.mark.timeout(3600)])]


@pytest.mark.timeout(900)
def test_qmp_volume_fuzz_one_mount(volume_mount: Any) -> None:
    """QMP_MESSAGES hostile messages to one live mount, in batches of BATCH over up to 8
    concurrent clients with writes from 1 byte to 1 MiB; after every batch the mount serves
    I/O and answers query-block-jobs with both jobs unchanged. (Once: twice the volume under
    -m slow found nothing more and cost the suite two minutes.)"""
    mount, path, bystander, before = volume_mount
    layout = random.Random(1)
    sent = 0

    def send(messages: list[bytes]) -> None:
        split, negotiate, chunks = qmp_batch_layout(layout, messages)
        errors: list[str] = []
        threads = [threading.Thread(target=_qmp_client, args=(path, lines, neg, chunk, errors))
                   for lines, neg, chunk in zip(split, negotiate, chunks)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not errors, errors[:3]
        nonlocal sent
        sent += len(messages)
        _assert_io_and_jobs(mount, bystander, before, f"batch-{sent}")

    # The worst cases first, in one batch of their own, byte by byte over one client.
    worst = [b'{"execute": "x", "id": 1e999}', b'{"execute": "x", "id": NaN}', b"[" * 200 + b"]" * 200,
             b'{"execute": "\xff", "id": 1}', b"9" * 600_000, b"[" * 100_000]
    errors: list[str] = []
    _qmp_client(path, worst, False, 1, errors)
    assert not errors, errors[:3]

    for batch in generated_batches("qmp", QMP_MESSAGES, BATCH):
        send(batch)
    assert sent >= QMP_MESSAGES, f"sent only {sent} messages"


_line_word = st.one_of(
    st.sampled_from(["nope.img", "../../etc/passwd", "'unclosed", '"a b"', "pivot=maybe", "force=perhaps",
                     "speed=1e999", "speed=-1", "speed=" + "9" * 5000, "granularity=3K", "colour=blue",
                     "a\0b", "bogus=1", "#", "\\", "=", "sync=full", "create=true"]),
    st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\n"), max_size=15),
    st.sampled_from(["\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\x85", "\u2028", "\u2029", "\r", "\t", "\0"]),
)


@st.composite
def hostile_lines(draw: Any) -> bytes:
    """One control write that must fail: a command that can never be valid (mirror always
    carries an unknown option, the others an unknown image), any words and separators; or bytes
    that are not UTF-8."""
    roll = draw(st.integers(0, 9))
    if roll == 0:
        junk = draw(st.binary(min_size=1, max_size=60))
        return b"\xff" + junk.replace(b"\n", b" ") + b"\n"
    if roll == 1:
        # Well-formed but for a NUL, so it reaches the commands: on an image that exists (not a
        # job), a target path, a size. A NUL is never valid, so nothing can start.
        nul = draw(st.text(max_size=4).map(lambda t: t.replace("\n", "") + "\0"))
        line = draw(st.sampled_from([f"pause {IO_IMAGE}{nul}", f"resume {nul}{IO_IMAGE}",
                                     f"cancel {IO_IMAGE} force=true{nul}", f"set-speed {IO_IMAGE} 1{nul}M",
                                     f"mirror {IO_IMAGE} /tmp/t{nul}x.img create=true",
                                     f"mirror {IO_IMAGE} '/tmp/t x{nul}' bitmap=/tmp/b{nul}"]))
        return line.encode("utf-8") + b"\n"
    command = draw(st.sampled_from(CONTROL_WORDS))
    words = draw(st.lists(_line_word, max_size=6))
    sep = draw(st.sampled_from([" ", "\t", "\x0b", "\u2028"]))
    if command == "mirror":
        words.append("colour=blue")
    elif command:
        words.insert(0, "nope.img")
    else:
        command = draw(st.text(alphabet="abcdefghij-", min_size=1, max_size=12).filter(
            lambda c: c not in CONTROL_WORDS))
    line = sep.join([command, *words])
    assert not any(job in line for job in JOBS)
    return line.encode("utf-8") + b"\n"


@pytest.mark.parametrize("scale", VOLUME)
def test_control_volume_fuzz_one_mount(volume_mount: Any, scale: int) -> None:
    """CONTROL_LINES hostile control lines (x2 under -m slow), each in its own write(2): each
    fails with EINVAL or EBUSY and a one-line error in the history; after every batch of
    LINE_BATCH the mount serves I/O and answers query-block-jobs with both jobs unchanged."""
    mount, path, bystander, before = volume_mount
    sent = 0

    def send(lines: list[bytes]) -> None:
        fd = os.open(mount.control / "control", os.O_WRONLY)
        try:
            for data in lines:
                try:
                    os.write(fd, data)
                    result = 0
                except OSError as exc:
                    result = exc.errno
                effective = _effective(data)
                assert result == (errno.EINVAL if effective else 0) or result == errno.EBUSY, (data[:200], result)
        finally:
            os.close(fd)
        last = (mount.control / "control").read_bytes().decode("utf-8").split("\n")[-2]
        assert " -> error: " in last, last
        nonlocal sent
        sent += len(lines)
        _assert_io_and_jobs(mount, bystander, before, f"lines-{sent}")

    for batch in generated_batches("control", scale * CONTROL_LINES, LINE_BATCH):
        send(batch)
    assert sent >= scale * CONTROL_LINES, f"sent only {sent} lines"


# What generated_batches can generate, by name (the child process imports this module).
GENERATED = {"qmp": raw_messages, "control": hostile_lines}
