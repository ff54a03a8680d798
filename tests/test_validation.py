"""One validation path: the same bad arguments get the same one-line message from the pure
validator (``mirror.params``), the CLI (exit 2, stderr), the control file (``error:`` in its
history, EINVAL) and QMP (``desc``) of one live mount, and nothing is created.

Each case is the argument mapping every surface builds (QEMU's names, values as a user types
them); a surface that cannot express a case (a NUL in argv, a key the CLI has no option for, a
relative path the CLI resolves itself) is left out of that case, never given other input.
"""

from __future__ import annotations

import errno
import shlex
from pathlib import Path
from typing import Any, Iterator

import pytest

from mirrorfs.control.control_file import parse_command
from mirrorfs.control.render import printable
from mirrorfs.errors import UsageError
from mirrorfs.mirror.params import MIRROR_PARAMS, MirrorParams, job_arguments
from mounting import Mount, random_image, start_mount
from test_control_file import control, jobs, last_outcome, qmp, sock_of

#: a target path that must never be created (the test's own directory, outside the mount)
T = "{out}/t.img"
BITMAP = "{out}/b.bitmap"
_CLI_KEYS = {p.key for p in MIRROR_PARAMS if p.cli}
_CLI_KINDS = {p.key: p.kind for p in MIRROR_PARAMS}

# (id, arguments over {"device": "a.img", "target": T}, surfaces that cannot express it:
# "cli", or "control" for what no control-file line can hold)
MIRROR_CASES: list[tuple[str, dict[str, Any], set[str]]] = [
    ("nbd+tcp scheme", {"target": "nbd+tcp://localhost/x"}, set()),
    ("http scheme", {"target": "http://example.com/x"}, set()),
    ("NBD URI without host", {"target": "nbd://"}, set()),
    ("NBD URI unknown query key", {"target": "nbd+unix:///x?socket=/run/s.sock&bogus=1"}, set()),
    ("relative target", {"target": "relative.img"}, {"cli"}),
    ("empty target", {"target": ""}, set()),
    ("empty image", {"device": ""}, set()),
    ("image leaves the mount", {"device": "../x.img"}, set()),
    ("absolute image", {"device": "/etc/passwd"}, set()),
    ("image is the mount", {"device": "."}, set()),
    ("image is a control file", {"device": ".mirrorfs/status"}, set()),
    ("granularity 1e999", {"granularity": "1e999"}, set()),
    ("granularity -1", {"granularity": "-1"}, set()),
    ("granularity 1e3", {"granularity": "1e3"}, set()),
    ("granularity 0", {"granularity": "0"}, set()),
    ("granularity not a power of two", {"granularity": "3000"}, set()),
    ("granularity above 64M", {"granularity": "128M"}, set()),
    ("granularity huge", {"granularity": "99999999999999999999T"}, set()),
    ("empty granularity", {"granularity": ""}, set()),
    ("speed 1e999", {"speed": "1e999"}, set()),
    ("speed -1", {"speed": "-1"}, set()),
    ("speed 1e3", {"speed": "1e3"}, set()),
    ("speed beyond int64", {"speed": "9999999999T"}, set()),
    ("speed words", {"speed": "fast"}, set()),
    ("buf-size 0", {"buf-size": "0"}, set()),
    ("buf-size below the granularity", {"buf-size": "32K"}, set()),
    ("buf-size above 1G", {"buf-size": "2G"}, set()),
    ("bad sync", {"sync": "sideways"}, set()),
    ("empty sync", {"sync": ""}, set()),
    ("sync in capitals", {"sync": "FULL"}, set()),
    ("bad copy-mode", {"copy-mode": "fast"}, set()),
    ("bad on-target-error", {"on-target-error": "panic"}, set()),
    ("empty on-source-error", {"on-source-error": ""}, set()),
    ("empty job-id", {"job-id": ""}, set()),
    ("job-id with a newline", {"job-id": "j\nk"}, {"control"}),
    ("job-id with a space", {"job-id": "has space"}, set()),
    ("job-id with an escape sequence", {"job-id": "j\x1b[31m"}, set()),
    ("job-id starting with -", {"job-id": "-j"}, set()),
    ("job-id a path", {"job-id": "../x"}, set()),
    ("job-id of 129 characters", {"job-id": "j" * 129}, set()),
    ("empty bitmap", {"bitmap": ""}, set()),
    ("relative bitmap", {"bitmap": "relative.bitmap"}, {"cli"}),
    ("sync dirty without a bitmap", {"sync": "dirty"}, set()),
    ("verify-resync with sync top", {"verify-resync": True, "sync": "top", "bitmap": BITMAP}, set()),
    ("create not a boolean", {"create": "maybe"}, {"cli"}),
    ("unknown key", {"colour": "blue"}, {"cli"}),
    ("key in capitals", {"Sync": "full"}, {"cli"}),
    ("format qcow2", {"format": "qcow2"}, {"cli"}),
    ("bad mode", {"mode": "sometimes"}, {"cli"}),
    ("NUL in the image", {"device": "a\0.img"}, {"cli"}),
    ("NUL in the target", {"target": "{out}/t\0.img"}, {"cli"}),
    ("NUL in the job-id", {"job-id": "j\0"}, {"cli"}),
]


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Mount, Path]]:
    """One mount with the image ``a.img`` for every case, and a directory outside it."""
    base = tmp_path_factory.mktemp("validation")
    (base / "source").mkdir()
    (base / "mnt").mkdir()
    (base / "out").mkdir()
    mount = start_mount(base / "source", base / "mnt", base / "mirrorfs.log")
    try:
        random_image(mount, "a.img", 1 << 20)
        yield mount, base / "out"
    finally:
        problems = mount.close()
        problems += mount.bad_log_lines()
        assert not problems, problems


def _expand(args: dict[str, Any], out: Path) -> dict[str, Any]:
    return {k: v.format(out=out) if isinstance(v, str) else v for k, v in args.items()}


def _refusal(check: Any) -> str:
    with pytest.raises(UsageError) as info:
        check()
    message = str(info.value)
    assert message and "\n" not in message
    return message


def _control_line(command: str, positional: list[str], options: dict[str, Any]) -> str:
    words = [command, *positional]
    for key, value in options.items():
        words.append(f"{key}={'true' if value is True else value}")
    return " ".join(shlex.quote(w) for w in words) + "\n"


def _cli_argv(options: dict[str, Any]) -> list[str]:
    argv = []
    for key, value in options.items():
        assert key in _CLI_KEYS, key
        argv.append(f"--{key}" if value is True and _CLI_KINDS[key] == "bool" else f"--{key}={value}")
    return argv


def _assert_nothing_changed(mount: Mount, out: Path) -> None:
    assert jobs(mount) == {}
    assert sorted(p.name for p in out.iterdir()) == []
    assert sorted(p.name for p in mount.source.iterdir()) == ["a.img"]


def test_the_cases_base_is_valid(tmp_path: Path) -> None:
    """Each case differs from a valid mapping only in what it names."""
    params = MirrorParams.from_arguments(_expand({"device": "a.img", "target": T}, tmp_path))
    assert params.image == "a.img" and params.target == f"{tmp_path}/t.img"


@pytest.mark.parametrize("case, overlay, cannot", MIRROR_CASES, ids=[c[0] for c in MIRROR_CASES])
def test_mirror_bad_input_same_message_everywhere(live: tuple[Mount, Path], case: str,
                                                  overlay: dict[str, Any], cannot: set[str]) -> None:
    mount, out = live
    args = _expand({"device": "a.img", "target": T, **overlay}, out)
    message = _refusal(lambda: MirrorParams.from_arguments(args))

    reply = qmp(sock_of(mount), "drive-mirror", args)
    assert reply["error"]["class"] == "GenericError", reply
    assert reply["error"]["desc"] == message

    options = {k: v for k, v in args.items() if k not in ("device", "target")}
    if "control" not in cannot:
        line = _control_line("mirror", [args["device"], args["target"]], options)
        assert control(mount, line) == errno.EINVAL
        assert last_outcome(mount) == printable("error: " + message)

    if "cli" not in cannot:
        r = mount.cli("mirror", mount.mountpoint, args["device"], args["target"], *_cli_argv(options),
                      check=False)
        assert (r.returncode, r.stdout, r.stderr) == (2, "", f"mirrorfs mirror: {message}\n")
    _assert_nothing_changed(mount, out)


# (id, QMP command, arguments, control line, CLI argv after MOUNTPOINT or None)
JOB_CASES: list[tuple[str, str, dict[str, Any], str, list[str] | None]] = [
    ("set-speed words", "block-job-set-speed", {"device": "a.img", "speed": "fast"},
     "set-speed a.img fast", ["set-speed", "{mnt}", "a.img", "fast"]),
    ("set-speed -1", "block-job-set-speed", {"device": "a.img", "speed": "-1"},
     "set-speed a.img -1", ["set-speed", "{mnt}", "a.img", "--", "-1"]),
    ("set-speed 1e999", "block-job-set-speed", {"device": "a.img", "speed": "1e999"},
     "set-speed a.img 1e999", ["set-speed", "{mnt}", "a.img", "1e999"]),
    ("set-speed beyond int64", "block-job-set-speed", {"device": "a.img", "speed": "9999999999T"},
     "set-speed a.img 9999999999T", ["set-speed", "{mnt}", "a.img", "9999999999T"]),
    ("set-speed empty", "block-job-set-speed", {"device": "a.img", "speed": ""},
     "set-speed a.img ''", ["set-speed", "{mnt}", "a.img", ""]),
    ("complete pivot not a boolean", "block-job-complete", {"device": "a.img", "pivot": "maybe"},
     "complete a.img pivot=maybe", None),
    ("complete unknown key", "block-job-complete", {"device": "a.img", "colour": "blue"},
     "complete a.img colour=blue", None),
    ("cancel force not a boolean", "block-job-cancel", {"device": "a.img", "force": "often"},
     "cancel a.img force=often", None),
    ("cancel NUL", "block-job-cancel", {"device": "a\0.img"}, "cancel 'a\0.img'", None),
]


@pytest.mark.parametrize("case, command, args, line, argv", JOB_CASES, ids=[c[0] for c in JOB_CASES])
def test_job_command_bad_input_same_message_everywhere(live: tuple[Mount, Path], case: str, command: str,
                                                       args: dict[str, Any], line: str,
                                                       argv: list[str] | None) -> None:
    mount, out = live
    message = _refusal(lambda: job_arguments(command, args))
    reply = qmp(sock_of(mount), command, args)
    assert reply["error"]["desc"] == message, reply
    assert control(mount, line + "\n") == errno.EINVAL
    assert last_outcome(mount) == printable("error: " + message)
    if argv is not None:
        r = mount.cli(*[a.format(mnt=mount.mountpoint) for a in argv], check=False)
        assert (r.returncode, r.stdout, r.stderr) == (2, "", f"mirrorfs {argv[0]}: {message}\n")
    _assert_nothing_changed(mount, out)


def test_control_file_words_with_equals_signs_are_paths_and_uris() -> None:
    """Only ``name=value`` is an option: an NBD URI's ``?socket=`` or a path holding ``=`` is a
    positional word, as it is on the command line."""
    assert parse_command("mirror a.img nbd+unix:///x?socket=/run/s.sock sync=top create=yes") == (
        "drive-mirror", {"device": "a.img", "target": "nbd+unix:///x?socket=/run/s.sock",
                         "sync": "top", "create": True})
    assert parse_command("mirror a.img /out/x=y.img")[1] == {"device": "a.img", "target": "/out/x=y.img"}
    with pytest.raises(UsageError, match="^Parameter 'device' is given twice$"):
        parse_command("mirror a.img /out/t.img device=b.img")


def test_cli_options_and_help_come_from_the_table() -> None:
    from mirrorfs.cli import build_parser

    mirror = next(a for a in build_parser()._actions if a.dest == "command").choices["mirror"]
    options = {a.option_strings[0][2:]: a for a in mirror._actions if a.option_strings and a.dest != "help"}
    assert set(options) == _CLI_KEYS
    for param in MIRROR_PARAMS:
        if param.cli:
            assert options[param.key].help == param.full_help
            assert tuple(options[param.key].choices or ()) == param.choice_names
