"""docs/reference.md stands alone and is complete: every subcommand and option of the argparse
tree, every QMP command the server dispatches, every event and ``__org.mirrorfs_`` member the
code emits and every environment variable it reads appear in it; README links it and nothing
outside the repository."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from mirrorfs.cli import build_parser
from mirrorfs.control.commands import CommandDispatcher
from mirrorfs.control.qmp_server import SERVER_COMMANDS

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = (ROOT / "docs" / "reference.md").read_text()
SOURCES = {p: p.read_text() for p in (ROOT / "src" / "mirrorfs").rglob("*.py")}


def section(heading_prefix: str, level: str = "###") -> str:
    """The text under the heading that starts with ``heading_prefix``, up to the next heading
    of the same or a higher level."""
    start = REFERENCE.index(f"{level} {heading_prefix}")
    body = REFERENCE.index("\n", start)
    stop = re.compile(r"^#{2,%d} " % len(level), re.M).search(REFERENCE, body)
    return REFERENCE[start: stop.start() if stop else len(REFERENCE)]


def subcommands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                if any(isinstance(a, argparse._SubParsersAction) for a in sub._actions):
                    yield from subcommands(sub, (*path, name))
                else:
                    yield (*path, name), sub


def test_every_subcommand_and_option_is_in_its_own_section() -> None:
    missing = []
    seen = 0
    for path, parser in subcommands(build_parser()):
        seen += 1
        name = " ".join(path)
        heading = next((m.group(0) for m in re.finditer(r"^### .*$", REFERENCE, re.M)
                        if f"`mirrorfs {name} " in m.group(0) or f"`mirrorfs {name}`" in m.group(0)), None)
        if heading is None:
            missing.append(f"no section for 'mirrorfs {name}'")
            continue
        text = section(heading[4:])
        for action in parser._actions:
            for option in action.option_strings:
                if option not in ("-h", "--help") and f"`{option}" not in text:
                    missing.append(f"mirrorfs {name} {option}")
    assert seen == 12
    for action in build_parser()._actions:
        for option in action.option_strings:
            if f"`{option}`" not in section("Command line", "##"):
                missing.append(f"mirrorfs {option}")
    assert not missing, missing


def test_every_qmp_command_is_in_the_commands_table() -> None:
    commands = [*SERVER_COMMANDS, *CommandDispatcher(None).command_names()]  # type: ignore[arg-type]
    assert "drive-mirror" in commands and "qmp_capabilities" in commands
    table = section("Commands")
    assert not [c for c in commands if f"| `{c}` |" not in table]


def test_every_event_the_code_emits_is_in_the_events_table() -> None:
    events = {m for text in SOURCES.values()
              for m in re.findall(r'_emit\(\s*"((?:__org\.mirrorfs_)?[A-Z_]+)"', text)}
    assert "__org.mirrorfs_MAX_LAG_EXCEEDED" in events
    assert {"BLOCK_JOB_READY", "MIRROR_TARGET_LOST", "JOB_STATUS_CHANGE"} <= events
    table = section("Events")
    assert not [e for e in sorted(events) if f"| `{e}` |" not in table]


def test_every_extension_member_and_job_statistic_is_documented() -> None:
    members = {m for text in SOURCES.values() for m in re.findall(r'__org\.mirrorfs_[a-z][a-z-]*', text)}
    job = SOURCES[ROOT / "src" / "mirrorfs" / "mirror" / "job.py"]
    stats = re.search(r"self\.stats = \{(.*?)\}", job, re.S)
    assert stats is not None
    members |= {f"__org.mirrorfs_{k}" for k in re.findall(r'"([a-z-]+)":', stats.group(1))}
    assert "__org.mirrorfs_target-connected" in members and "__org.mirrorfs_conflicts" in members
    assert not [m for m in sorted(members) if f"`{m}`" not in REFERENCE]


def test_every_environment_variable_the_code_reads_is_documented() -> None:
    names = {m for text in SOURCES.values()
             for m in re.findall(r'os\.environ(?:\.get\(|\[)\s*"([A-Z_]+)"', text)}
    assert "MIRRORFS_LOG_FILE" in names
    table = section("Environment variables", "##")
    assert not [n for n in sorted(names) if f"| `{n}` |" not in table]


def test_reference_stands_alone() -> None:
    assert "SPEC" not in REFERENCE
    assert not re.search(r"(?<![\w.])/(work|home|root)/", REFERENCE)
    for target in re.findall(r"\]\(([^)#]+)", REFERENCE):
        assert (ROOT / "docs" / target).exists(), target


def test_readme_links_the_reference_and_nothing_outside_the_repository() -> None:
    readme = (ROOT / "README.md").read_text()
    links = re.findall(r"\]\(([^)]+)\)", readme)
    assert "docs/reference.md" in links
    for target in links:
        assert not re.match(r"\w+://", target) and not target.startswith(("/", "..")), target
        assert (ROOT / target.split("#")[0]).exists(), target
    assert "SPEC" not in readme
