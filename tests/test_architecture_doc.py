"""docs/architecture.md matches the code: the state diagram is the transition table, and the
layer list names the packages of the layering test's table in the same order."""

from __future__ import annotations

import re
from pathlib import Path

from mirrorfs.mirror.state import TRANSITIONS, JobState

from test_layering import LAYERS

DOC = Path(__file__).resolve().parents[1] / "docs" / "architecture.md"

_EDGE = re.compile(r"^\s*(\w+) --> (\w+)(?::.*)?$")


def diagram_edges(text: str) -> set[tuple[str, str]]:
    """The ``a --> b`` edges of the mermaid block, the ``[*]`` start and end left out."""
    block = text[text.index("```mermaid"):]
    block = block[:block.index("```", 3)]
    return {(m[1], m[2]) for line in block.splitlines() if (m := _EDGE.match(line))}


def table_edges() -> set[tuple[str, str]]:
    return {(old.name.lower(), new.name.lower()) for old, targets in TRANSITIONS.items()
            for new in targets}


def test_the_state_diagram_is_the_transition_table() -> None:
    drawn = diagram_edges(DOC.read_text(encoding="utf-8"))
    table = table_edges()
    assert not table - drawn, f"transitions missing from the diagram: {sorted(table - drawn)}"
    assert not drawn - table, f"diagram edges the table does not allow: {sorted(drawn - table)}"


def test_the_diagram_names_every_state() -> None:
    drawn = {name for edge in diagram_edges(DOC.read_text(encoding="utf-8")) for name in edge}
    assert drawn == {state.name.lower() for state in JobState}


def test_the_layer_list_is_the_layering_table() -> None:
    text = DOC.read_text(encoding="utf-8")
    section = text[text.index("## Layers"):text.index("\n## ", text.index("## Layers") + 1)]
    listed = {}
    for number, line in re.findall(r"^(\d)\. (.*?):", section, re.M):
        for name in re.findall(r"`(\w+)`", line):
            listed[name] = int(number) - 1
    ranks = sorted(set(LAYERS.values()))
    assert listed == {name: ranks.index(layer) for name, layer in LAYERS.items()}


def test_the_edge_parser_reads_labels_and_skips_the_ends() -> None:
    text = "```mermaid\nstateDiagram-v2\n    [*] --> a\n    a --> b: why\n    b --> c\n    c --> [*]\n```\n"
    assert diagram_edges(text) == {("a", "b"), ("b", "c")}
