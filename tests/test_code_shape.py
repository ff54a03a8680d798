"""The shape of the code under src/: no class too long to read in one sitting, and no
issue-tracker text in it (issue numbers and task checklists belong to the tracker, not the code).
"""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src"

#: Longest class (``class`` line to its last line) allowed under src/.
MAX_CLASS_LINES = 450

#: What ``grep -rnE "issue [0-9]|Done when" src`` looks for.
TRACKER_TEXT = re.compile(r"issue [0-9]|Done when")


def _source_files() -> list[Path]:
    return sorted(p for p in SRC.rglob("*.py") if "__pycache__" not in p.parts)


def _text_files() -> list[Path]:
    """Every file under src/ that is part of the project (build output left out)."""
    return sorted(p for p in SRC.rglob("*") if p.is_file()
                  and not any(part == "__pycache__" or part.endswith(".egg-info") for part in p.parts))


def class_lengths(path: Path, root: Path = SRC) -> dict[str, int]:
    """``path::Class`` -> length in lines, for every class (nested ones too) in ``path``."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    rel = path.relative_to(root).as_posix()
    return {f"{rel}::{node.name}": node.end_lineno - node.lineno + 1  # type: ignore[operator]
            for node in ast.walk(tree) if isinstance(node, ast.ClassDef)}


def long_classes() -> dict[str, int]:
    lengths: dict[str, int] = {}
    for path in _source_files():
        lengths.update(class_lengths(path))
    return {name: n for name, n in lengths.items() if n > MAX_CLASS_LINES}


def test_the_scan_sees_the_sources() -> None:
    names = {name for path in _source_files() for name in class_lengths(path)}
    assert "mirrorfs/fs/operations.py::Operations" in names
    assert "mirrorfs/nbd/proto.py::ClientConnection" in names


def test_class_lengths_counts_from_class_line_to_last_line(tmp_path: Path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text("class A:\n    x = 1\n\n    class Inner:\n        y = 2\n\n\nclass B:\n    pass\n")
    assert class_lengths(probe, tmp_path) == {"probe.py::A": 5, "probe.py::Inner": 2, "probe.py::B": 2}


def test_no_class_over_the_limit() -> None:
    too_long = long_classes()
    assert not too_long, (f"classes over {MAX_CLASS_LINES} lines (split them along their "
                          f"seams): {too_long}")


def _lines_matching(paths: list[Path], pattern: re.Pattern[str], root: Path, *,
                    width: int | None = None) -> list[str]:
    """``file:line: text`` of every line of the text files in ``paths`` that ``pattern`` finds."""
    hits = []
    for path in paths:
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        for number, line in enumerate(text.splitlines(), 1):
            if pattern.search(line):
                hits.append(f"{path.relative_to(root)}:{number}: {line.strip()[:width]}")
    return hits


def test_no_issue_numbers_or_task_text_in_src() -> None:
    hits = _lines_matching(_text_files(), TRACKER_TEXT, SRC)
    assert not hits, "tracker text in src/ (say why in the code, not which issue):\n" + "\n".join(hits)


#: Where the repository's own text lives; none of it may point outside the repository.
PUBLISHED = ("README.md", "docs", "src", "scripts", "tests", ".ci")
#: A path into the workspace beside the checkout, or one machine's home or work tree. Spelled in
#: pieces so that this file does not match itself.
OUTSIDE = re.compile("|".join([re.escape("..") + "/" + "shared", "/" + "work" + "/", "/" + "root" + "/",
                               "/" + "home" + r"/(?!u/)"]))


def _published_files() -> list[Path]:
    files = []
    for name in PUBLISHED:
        path = ROOT / name
        candidates = [path] if path.is_file() else path.rglob("*")
        files += [p for p in candidates if p.is_file() and "__pycache__" not in p.parts
                  and ".egg-info" not in str(p) and p.suffix not in (".pyc",)]
    return files


def test_nothing_points_outside_the_repository() -> None:
    found = _lines_matching(_published_files(), OUTSIDE, ROOT, width=100)
    assert not found, "paths outside the repository:\n" + "\n".join(found)


def test_the_outside_pattern_catches_what_it_should() -> None:
    assert OUTSIDE.search("see " + ".." + "/shared/SPEC.md")
    assert OUTSIDE.search("/" + "work/main/.venv/bin/python")
    assert not OUTSIDE.search("docs/reference.md and ../docs/x")


#: Repeats under src/ that stay: the NBD protocol's constant tables, one ``NAME = value`` line per
#: wire value as the protocol document lists them (any form the tool would not pair hides them).
KEPT_REPEATS = {("src/mirrorfs/nbd/proto.py", "src/mirrorfs/nbd/proto.py")}


def test_src_does_not_repeat_itself() -> None:
    """The project's `duplicates` tool finds no pair of places in src/ beyond ``KEPT_REPEATS``."""
    tool = shutil.which("duplicates")
    if tool is None:
        pytest.skip("the duplicates tool is not installed on this machine")
    out = subprocess.run([tool, "--repo", str(ROOT), "--most", "200", "--seconds", "300"],
                         capture_output=True, text=True, timeout=400, check=True).stdout
    assert "incomplete" not in out, out
    pairs = set(re.findall(r"^D\d+ (src/\S+?):\d+-\d+ ~ (src/\S+?):\d+-\d+", out, re.M))
    assert pairs <= KEPT_REPEATS, f"src/ repeats itself (make one place serve):\n{out}"
