"""``-o`` mount options: every ``mirrorfs mount`` flag spelled the way mount(8) and fstab pass it.

``-o allow_other,socket=/run/vm.qmp,poll_max_ns=0`` sets the same fields as ``--allow-other
--socket /run/vm.qmp --poll-max-ns 0``: an option ``name[=value]`` is the long flag ``--name``
with ``_`` for ``-``. The flags themselves are the one source: whatever ``mirrorfs mount`` grows
gets an ``-o`` spelling with the same type check and choices, with no table to keep in step.
Options mount(8) and fstab add for every file system (``rw``, ``nofail``, ``_netdev``, ``x-*`` ...)
are accepted and ignored, since they concern mount(8) or the kernel's generic flags, not mirrorfs.

``helper_argv`` translates the arguments of ``mount.fuse.mirrorfs`` (``cli.mount_helper_main``),
the helper mount(8) runs for ``mount -t fuse.mirrorfs SOURCE MOUNTPOINT -o OPTIONS`` (and so for
an fstab line).
"""

from __future__ import annotations

import argparse
from typing import Any, Sequence

#: Generic options of mount(8) and fstab that say nothing to mirrorfs.
IGNORED = frozenset({
    "defaults", "rw", "auto", "noauto", "nofail", "_netdev", "user", "users", "nouser", "owner",
    "group", "dev", "nodev", "suid", "nosuid", "exec", "noexec", "async", "atime", "noatime",
    "relatime", "norelatime", "strictatime", "diratime", "nodiratime", "lazytime", "nolazytime",
    "silent", "loud",
})
#: Prefixes of options meant for mount(8), systemd or a comment in fstab.
IGNORED_PREFIXES = ("x-", "comment=")


def split_options(text: str) -> list[tuple[str, str | None]]:
    """``"a,b=c"`` -> ``[("a", None), ("b", "c")]``; empty items (``a,,b``) are skipped."""
    items = []
    for item in text.split(","):
        if not item:
            continue
        key, sep, value = item.partition("=")
        items.append((key, value if sep else None))
    return items


def _find_flag(parser: argparse.ArgumentParser, key: str) -> argparse.Action | None:
    flag = "--" + key.replace("_", "-")
    for action in parser._actions:
        if flag in action.option_strings and action.dest not in ("help", "options"):
            return action
    return None


def _ignored(key: str, value: str | None) -> bool:
    item = key if value is None else f"{key}={value}"
    return key in IGNORED or item.startswith(IGNORED_PREFIXES)


def apply_options(parser: argparse.ArgumentParser, namespace: argparse.Namespace, text: str) -> None:
    """Set ``namespace``'s fields from an ``-o`` string, checked as the flags check them.

    Calls ``parser.error`` (one line, exit 2) for an unknown option, a flag given a value, a
    valued option without one, or a value its flag refuses.
    """
    for key, value in split_options(text):
        if _ignored(key, value):
            continue
        if key == "ro":
            parser.error("-o ro: a mirrorfs mount is read-write (the mirror job needs the writes)")
        action = _find_flag(parser, key)
        if action is None:
            parser.error(f"unknown mount option -o {key} (see 'mirrorfs mount --help' for the -o spellings)")
        if action.nargs == 0:
            if value is not None:
                parser.error(f"mount option -o {key} takes no value")
            setattr(namespace, action.dest, action.const)
            continue
        if value is None:
            parser.error(f"mount option -o {key} needs a value: -o {key}=VALUE")
        setattr(namespace, action.dest, _convert(parser, action, key, value))


def _convert(parser: argparse.ArgumentParser, action: argparse.Action, key: str, value: str) -> Any:
    converted: Any = value
    if action.type is not None:
        try:
            converted = action.type(value)  # type: ignore[operator]
        except (argparse.ArgumentTypeError, TypeError, ValueError) as exc:
            parser.error(f"-o {key}: {exc}")
    if action.choices is not None and converted not in action.choices:
        parser.error(f"-o {key}={value}: choose from {', '.join(map(str, action.choices))}")
    return converted


class MountOptionsAction(argparse.Action):
    """``-o OPTIONS`` of ``mirrorfs mount``; may be repeated, applied where it appears."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        apply_options(parser, namespace, str(values))


def option_spellings(parser: argparse.ArgumentParser) -> list[str]:
    """The ``-o`` spelling of every flag of ``parser`` (for help text and docs)."""
    spellings = []
    for action in parser._actions:
        longs = [s for s in action.option_strings if s.startswith("--")]
        if not longs or action.dest in ("help", "options"):
            continue
        key = longs[0][2:].replace("-", "_")
        spellings.append(key if action.nargs == 0 else f"{key}={action.metavar or action.dest.upper()}")
    return spellings


def helper_argv(argv: Sequence[str]) -> list[str]:
    """The ``mirrorfs`` arguments for ``mount.fuse.mirrorfs SOURCE MOUNTPOINT [-o OPTS] [-snfv]``.

    mount(8) calls its helpers so. ``-f`` (fake) returns an empty list: nothing to do. ``-n`` (no
    mtab), ``-s`` (sloppy) and ``-v`` (verbose) change nothing here; ``-t TYPE`` is the type
    mount(8) chose.

    Raises:
        ValueError: the arguments are not in that form (the message is the usage line), or
            they ask for ``foreground``.
    """
    usage = "usage: mount.fuse.mirrorfs SOURCE_DIR MOUNTPOINT [-o OPTIONS] [-n] [-s] [-f] [-v]"
    positional: list[str] = []
    options: list[str] = []
    fake = False
    args = list(argv)
    while args:
        arg = args.pop(0)
        if arg == "-o" and args:
            options.append(args.pop(0))
        elif arg.startswith("-o") and len(arg) > 2:
            options.append(arg[2:])
        elif arg == "-t" and args:
            args.pop(0)
        elif arg.startswith("-") and len(arg) > 1 and set(arg[1:]) <= set("snfv"):
            fake = fake or "f" in arg
        elif arg.startswith("-"):
            raise ValueError(f"unknown argument {arg!r}; {usage}")
        else:
            positional.append(arg)
    if len(positional) != 2:
        raise ValueError(usage)
    if any(key == "foreground" for text in options for key, _ in split_options(text)):
        # mount(8) waits for its helper: a foreground mount would hold it (and boot) for ever.
        raise ValueError("-o foreground is for 'mirrorfs mount' under a service manager, not for mount(8)")
    if fake:
        return []
    result = ["mount", *positional]
    for text in options:
        result += ["-o", text]
    return result

