"""The job's mixins declare what they use of the job, and the job provides it.

``WritePath`` (``mirror/writes.py``) and ``FailureHandling`` (``mirror/failures.py``) are parts of
``MirrorJob`` split out to be read on their own. Whatever they use of the job, an attribute set in
``MirrorJob.__init__`` or a method of the job or of the other mixin, is declared at the top of the
mixin (an annotation, or a stub under ``TYPE_CHECKING``), so that a reader and a type checker see
the contract. These checks keep the declarations complete as the bodies change.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

MIRROR = Path(__file__).resolve().parents[1] / "src" / "mirrorfs" / "mirror"

#: mixin class -> the file that defines it
MIXINS = {"WritePath": MIRROR / "writes.py", "FailureHandling": MIRROR / "failures.py",
          "Journaling": MIRROR / "journaling.py",
          "ResumeCheck": MIRROR / "resume_check.py", "RecoveryPoint": MIRROR / "lag.py",
          "Ending": MIRROR / "ending.py"}


def _class(path: Path, name: str) -> ast.ClassDef:
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.ClassDef) and node.name == name:
            return node
    raise AssertionError(f"no class {name} in {path}")


def _is_type_checking(test: ast.expr) -> bool:
    return isinstance(test, ast.Name) and test.id == "TYPE_CHECKING"


def declared(cls: ast.ClassDef) -> tuple[set[str], set[str], set[str]]:
    """(annotated attributes, methods defined, methods stubbed under ``TYPE_CHECKING``); a class
    based on ``JobCore`` declares JobCore's attributes too."""
    attrs, methods, stubs = set(), set(), set()
    if any(isinstance(base, ast.Name) and base.id == "JobCore" for base in cls.bases):
        attrs |= declared(_class(MIRROR / "core.py", "JobCore"))[0]
    for node in cls.body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            attrs.add(node.target.id)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            methods.add(node.name)
        elif isinstance(node, ast.If) and _is_type_checking(node.test):
            stubs |= {n.name for n in node.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
    return attrs, methods, stubs


def used_on_self(cls: ast.ClassDef) -> set[str]:
    """Every ``self.NAME`` the class's methods read or write."""
    return {node.attr for node in ast.walk(cls)
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
            and node.value.id == "self"}


def _assigned(function: ast.FunctionDef) -> set[str]:
    names = set()
    for node in ast.walk(function):
        targets = node.targets if isinstance(node, ast.Assign) else (
            [node.target] if isinstance(node, ast.AnnAssign) else [])
        names |= {t.attr for t in targets if isinstance(t, ast.Attribute)
                  and isinstance(t.value, ast.Name) and t.value.id == "self"}
    return names


def set_in_init(cls: ast.ClassDef) -> set[str]:
    """What ``__init__`` sets, itself or through a mixin's ``_init_*`` method it calls."""
    init = next(n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "__init__")
    names = _assigned(init)
    called = {node.func.attr for node in ast.walk(init) if isinstance(node, ast.Call)
              and isinstance(node.func, ast.Attribute) and node.func.attr.startswith("_init_")}
    for name, path in MIXINS.items():
        for node in _class(path, name).body:
            if isinstance(node, ast.FunctionDef) and node.name in called:
                names |= _assigned(node)
    return names


@pytest.mark.parametrize("mixin", sorted(MIXINS))
def test_a_mixin_declares_what_it_uses_of_the_job(mixin: str) -> None:
    cls = _class(MIXINS[mixin], mixin)
    attrs, methods, stubs = declared(cls)
    undeclared = sorted(used_on_self(cls) - attrs - methods - stubs)
    assert not undeclared, (f"{mixin} uses job members it does not declare: {undeclared}; add an "
                            f"annotation (attribute) or a TYPE_CHECKING stub (method) at its top")


@pytest.mark.parametrize("mixin", sorted(MIXINS))
def test_the_job_provides_what_a_mixin_declares(mixin: str) -> None:
    cls = _class(MIXINS[mixin], mixin)
    attrs, _, stubs = declared(cls)
    job = _class(MIRROR / "job.py", "MirrorJob")
    _, job_methods, _ = declared(job)
    others = set()
    for name, path in MIXINS.items():
        if name != mixin:
            others |= declared(_class(path, name))[1]
    assert sorted(attrs - set_in_init(job)) == [], "declared but not set in MirrorJob.__init__"
    assert sorted(stubs - job_methods - others) == [], "stubbed but defined by neither the job nor a mixin"


def test_the_check_sees_an_undeclared_use() -> None:
    cls = ast.parse("class M:\n    a: int\n    def f(self):\n        return self.a + self.b\n").body[0]
    assert isinstance(cls, ast.ClassDef)
    attrs, methods, stubs = declared(cls)
    assert used_on_self(cls) - attrs - methods - stubs == {"b"}
