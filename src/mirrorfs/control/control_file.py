"""The ``MOUNTPOINT/.mirrorfs/control`` file: one command per line, for people at a shell.

``parse_command`` (pure) turns a line into the QMP command and arguments it stands for, so the
control file, QMP and the CLI share one dispatcher and one validator (``mirror.params``): a bad
value gets the same message on each. ``ControlFile`` runs the lines written to the file
and keeps the recent outcomes that reading the file returns.

Grammar (docs/reference.md): ``mirror IMAGE TARGET [key=value ...]``, ``complete IMAGE... [pivot=false]``,
``cancel IMAGE... [force=true]``, ``pause IMAGE``, ``resume IMAGE``, ``set-speed IMAGE RATE``,
``verify IMAGE [repair=true] [speed=RATE]``.
Words are split like a shell does (``shlex``), so paths with spaces can be quoted. Only ``\n``
ends a line: a path may hold any other character, also the ones ``str.splitlines`` would break at
(``\v``, ``\f``, ``\x1c``-``\x1e``, ``\x85``, ``\u2028``, ``\u2029``).
"""

from __future__ import annotations

import collections
import datetime
import re
import shlex
from typing import Any, Protocol

from ..errors import MirrorfsError, UsageError
from ..mirror.params import VERIFY_COMMAND, params_of, parse_bool_word
from .render import printable

MAX_LINE = 64 * 1024
HISTORY = 50


class Executor(Protocol):
    async def execute(self, name: str, arguments: dict) -> Any: ...


def _arguments(command: str, positional: dict[str, str], words: list[str]) -> dict[str, Any]:
    """The QMP arguments of ``command``: the positional words, then every ``key=value`` word.

    Only the text is translated here (a boolean word to a bool, by the parameter table); what
    the values mean, and which keys exist, the one validator of ``mirror.params`` decides when
    the command runs, as it does for QMP and the CLI.
    """
    table = params_of(command)
    args: dict[str, Any] = dict(positional)
    for word in words:
        key, _, value = word.partition("=")
        if key in positional:
            raise UsageError(f"Parameter {key!r} is given twice")
        param = table.get(key)
        args[key] = parse_bool_word(value) if param is not None and param.kind == "bool" else value
    return args


#: ``key=value``: an option. A path or URI may hold ``=`` too (``nbd+unix:///x?socket=/s``), but
#: what comes before it is then no parameter name.
_OPTION_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*=")


def _split(words: list[str]) -> tuple[list[str], list[str]]:
    """(positional words, ``key=value`` words)."""
    return ([w for w in words if not _OPTION_RE.match(w)], [w for w in words if _OPTION_RE.match(w)])


def parse_command(line: str) -> tuple[str, dict]:
    """Translate one control line into ``(qmp_command, arguments)``.

    Raises:
        UsageError: an unknown command, a wrong number of words, an unknown or malformed option.
    """
    if len(line) > MAX_LINE:
        raise UsageError(f"command line longer than {MAX_LINE} bytes")
    try:
        words = shlex.split(line)
    except ValueError as exc:
        raise UsageError(f"cannot parse {line.strip()!r}: {exc}") from None
    if not words:
        raise UsageError("empty command")
    command, rest = words[0], words[1:]
    if command == "mirror":
        positional, options = _split(rest)
        if len(positional) != 2:
            raise UsageError("usage: mirror IMAGE TARGET [key=value ...]")
        return "drive-mirror", _arguments("drive-mirror", {"device": positional[0],
                                                           "target": positional[1]}, options)
    if command in ("complete", "cancel"):
        positional, options = _split(rest)
        if not positional:
            hint = "pivot=false" if command == "complete" else "force=true"
            raise UsageError(f"usage: {command} IMAGE... [{hint}]")
        qmp = "block-job-complete" if command == "complete" else "block-job-cancel"
        if len(positional) == 1:
            return qmp, _arguments(qmp, {"device": positional[0]}, options)
        return "transaction", {"actions": [{"type": qmp, "data": _arguments(qmp, {"device": image}, options)}
                                           for image in positional]}
    if command in ("pause", "resume"):
        if len(rest) != 1:
            raise UsageError(f"usage: {command} IMAGE")
        return f"block-job-{command}", {"device": rest[0]}
    if command == "set-speed":
        if len(rest) != 2:
            raise UsageError("usage: set-speed IMAGE RATE")
        return "block-job-set-speed", {"device": rest[0], "speed": rest[1]}
    if command == "verify":
        positional, options = _split(rest)
        if len(positional) != 1:
            raise UsageError("usage: verify IMAGE [repair=true] [speed=RATE]")
        return VERIFY_COMMAND, _arguments(VERIFY_COMMAND, {"device": positional[0]}, options)
    raise UsageError(f"unknown command {command!r} (mirror, complete, cancel, pause, resume, "
                     f"set-speed, verify)")


class ControlFile:
    """Runs control lines and remembers their outcomes for readers of the file."""

    def __init__(self, executor: Executor) -> None:
        self._executor = executor
        self._history: collections.deque[str] = collections.deque(maxlen=HISTORY)

    async def run_lines(self, data: bytes) -> None:
        """Run every line of one write(); stop at the first failure and raise it.

        Raises:
            MirrorfsError: the failing line's error (EINVAL malformed / unknown, EBUSY refused).
        """
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            self._record("<binary data>", "error: commands must be UTF-8 text")
            raise UsageError("commands must be UTF-8 text") from None
        for line in text.split("\n"):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            try:
                name, args = parse_command(line)
                await self._executor.execute(name, args)
            except MirrorfsError as exc:
                self._record(line, f"error: {exc}")
                raise
            self._record(line, "ok")

    def _record(self, line: str, outcome: str) -> None:
        stamp = datetime.datetime.now().isoformat(timespec="seconds")
        shown = line.strip()
        if len(shown) > 200:
            shown = shown[:200] + "..."
        shown = printable(shown)
        self._history.append(f"{stamp} {shown} -> {printable(outcome)}")

    def render(self) -> bytes:
        return "".join(f"{entry}\n" for entry in self._history).encode()
