"""``docs/security.md`` names a test for each claim: every test it names must exist, so the threat
model cannot point at a test that was renamed or removed."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NAMED = re.compile(r"`(test_[a-z0-9_]+\.py)(?:::([A-Za-z0-9_]+))?`")


def test_every_test_the_threat_model_names_exists() -> None:
    text = (ROOT / "docs" / "security.md").read_text()
    named = set(NAMED.findall(text))
    assert len(named) >= 40, "the threat model names too few tests"
    missing = []
    for file, test in sorted(named):
        path = ROOT / "tests" / file
        if not path.exists():
            missing.append(file)
        elif test and not re.search(rf"def {re.escape(test)}\b", path.read_text()):
            missing.append(f"{file}::{test}")
    assert not missing, "docs/security.md names tests that do not exist: " + ", ".join(missing)


def test_every_section_of_the_threat_model_names_a_test() -> None:
    text = (ROOT / "docs" / "security.md").read_text()
    sections = re.split(r"^## ", text, flags=re.M)[1:]
    for section in sections:
        title = section.splitlines()[0]
        if title in ("Who is who", "Root"):
            continue
        assert NAMED.search(section), f"section {title!r} of docs/security.md names no test"
