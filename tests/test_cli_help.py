"""The command line documents itself: ``--version``, help on every option of every subcommand,
choices from the validator's own constants, and an ``-o`` spelling of every mount flag."""

from __future__ import annotations

import argparse
import subprocess
from typing import Iterator

import pytest

import mirrorfs
from mirrorfs.cli import build_parser
from mirrorfs.daemon.mount_options import helper_argv, option_spellings
from mirrorfs.mirror import params
from mounting import mirrorfs_argv


def walk(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    """Every (subcommand path, parser) of the tree, the root included."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from walk(sub, (*path, name))


def test_version() -> None:
    r = subprocess.run([*mirrorfs_argv(), "--version"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout == f"mirrorfs {mirrorfs.__version__}\n"


def test_every_option_and_argument_of_every_subcommand_has_help() -> None:
    missing = []
    commands = 0
    for path, parser in walk(build_parser()):
        commands += 1
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                missing += [f"{' '.join(path)} {c.dest}" for c in action._choices_actions if not c.help]
            elif not (action.help or "").strip():
                missing.append(f"{' '.join(path) or 'mirrorfs'} {action.option_strings or action.dest}")
    assert commands >= 13  # root, bitmap, bitmap inspect and the ten others
    assert not missing, missing


def _mirror_action(dest: str) -> argparse.Action:
    tree = dict(walk(build_parser()))
    return next(a for a in tree[("mirror",)]._actions if a.dest == dest)


@pytest.mark.parametrize("dest, choices", [("sync", params.SYNC_MODES), ("copy_mode", params.COPY_MODES),
                                           ("on_target_error", params.ERROR_POLICIES)])
def test_mirror_choices_are_the_validators_and_each_is_explained(dest: str, choices: tuple[str, ...]) -> None:
    action = _mirror_action(dest)
    assert tuple(action.choices) == choices
    for choice in choices:
        assert f"{choice}: " in action.help


def test_mirror_defaults_in_help_are_the_validators() -> None:
    assert f"default {params.DEFAULT_GRANULARITY >> 10}K" in _mirror_action("granularity").help
    assert f"default {params.DEFAULT_BUF_SIZE >> 20}M" in _mirror_action("buf_size").help


def _mount_parser() -> argparse.ArgumentParser:
    return dict(walk(build_parser()))[("mount",)]


def test_every_mount_flag_has_an_o_spelling_that_sets_the_same_field() -> None:
    parser = _mount_parser()
    values = {"socket": "/run/x.qmp", "poll_max_ns": "0", "log_level": "debug", "metrics": "[::1]:9464",
              "state_dir": "/var/lib/mirrorfs/vm"}
    spellings = [s.split("=")[0] for s in option_spellings(parser)]
    assert all(s in next(a for a in parser._actions if a.dest == "options").help
               for s in option_spellings(parser))
    flags = [a for a in parser._actions if a.option_strings and a.dest not in ("help", "options")]
    assert {a.dest for a in flags} >= {"foreground", "socket", "allow_other", "poll_max_ns", "log_level"}
    for action in flags:
        key = action.option_strings[-1][2:].replace("-", "_")
        assert key in spellings
        value = values.get(key)
        opt = key if value is None else f"{key}={value}"
        via_o = parser.parse_args(["src", "mnt", "-o", f"rw,nofail,x-systemd.automount,{opt}"])
        flag_argv = [action.option_strings[-1]] + ([] if value is None else [value])
        via_flag = parser.parse_args(["src", "mnt", *flag_argv])
        assert getattr(via_o, action.dest) == getattr(via_flag, action.dest) != action.default, key


@pytest.mark.parametrize("options, error", [
    ("frobnicate", "unknown mount option -o frobnicate"),
    ("allow_other=yes", "-o allow_other takes no value"),
    ("socket", "-o socket needs a value"),
    ("poll_max_ns=-1", "--poll-max-ns must be an integer"),
    ("log_level=loud", "-o log_level=loud: choose from debug, info, warning, error"),
    ("ro", "a mirrorfs mount is read-write"),
    ("metrics=localhost", "-o metrics: 'localhost' is not HOST:PORT"),
    ("metrics=127.0.0.1:0", "port '0' in '127.0.0.1:0' is not a number from 1 to 65535"),
])
def test_bad_o_options_are_one_line_errors(options: str, error: str) -> None:
    r = subprocess.run([*mirrorfs_argv(), "mount", "/nonexistent-src", "/nonexistent-mnt", "-o", options],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stderr
    assert error in r.stderr and r.stderr.count("\n") == 1, r.stderr


def test_mount_helper_arguments() -> None:
    assert helper_argv(["/srv/img", "/mnt/x", "-o", "rw,allow_other"]) == [
        "mount", "/srv/img", "/mnt/x", "-o", "rw,allow_other"]
    assert helper_argv(["-n", "/srv/img", "/mnt/x", "-oallow_other", "-t", "fuse.mirrorfs"]) == [
        "mount", "/srv/img", "/mnt/x", "-o", "allow_other"]
    assert helper_argv(["/srv/img", "/mnt/x"]) == ["mount", "/srv/img", "/mnt/x"]
    assert helper_argv(["-f", "/srv/img", "/mnt/x"]) == []
    with pytest.raises(ValueError, match="usage: mount.fuse.mirrorfs"):
        helper_argv(["/srv/img"])
    with pytest.raises(ValueError, match="-o foreground is for 'mirrorfs mount'"):
        helper_argv(["/srv/img", "/mnt/x", "-o", "rw,foreground"])
    with pytest.raises(ValueError, match="unknown argument '-x'"):
        helper_argv(["-x", "/srv/img", "/mnt/x"])
