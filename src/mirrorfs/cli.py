"""The ``mirrorfs`` command line: parses arguments and hands each subcommand to its module.

Exit codes (SPEC): 0 done; 1 refused by state; 2 bad input. Every expected failure is a
``MirrorfsError`` and becomes one line on stderr; no traceback reaches the user for those.
Subcommand modules are imported lazily so that ``mirrorfs bitmap inspect`` does not pay for
pyfuse3, and a missing optional piece breaks only its own subcommand.
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
from typing import Callable, Sequence

from .errors import MirrorfsError

#: subcommand -> "module:function"; each function takes the parsed namespace and returns an exit code.
_HANDLERS = {
    "mount": "mirrorfs.fs.mount:cli_mount",
    "unmount": "mirrorfs.fs.mount:cli_unmount",
    "mirror": "mirrorfs.control.cli_commands:cli_mirror",
    "status": "mirrorfs.control.cli_commands:cli_status",
    "complete": "mirrorfs.control.cli_commands:cli_complete",
    "cancel": "mirrorfs.control.cli_commands:cli_cancel",
    "pause": "mirrorfs.control.cli_commands:cli_pause",
    "resume": "mirrorfs.control.cli_commands:cli_resume",
    "set-speed": "mirrorfs.control.cli_commands:cli_set_speed",
    "qmp": "mirrorfs.control.cli_commands:cli_qmp",
    "bitmap inspect": "mirrorfs.bitmap.inspect:cli_inspect",
}


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors as one line and exit code 2 (SPEC)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"{self.prog}: error: {message} (see '{self.prog} --help')", file=sys.stderr)
        raise SystemExit(2)


#: The largest ``--poll-max-ns``: past a few milliseconds polling only burns a core.
MAX_POLL_NS = 10_000_000


def _poll_ns(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= MAX_POLL_NS:
        raise argparse.ArgumentTypeError(
            f"--poll-max-ns must be an integer from 0 to {MAX_POLL_NS} (nanoseconds), not {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="mirrorfs", description="Live mirroring of disk images beneath a FUSE mount.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("mount", help="expose SOURCE_DIR at MOUNTPOINT")
    p.add_argument("source_dir")
    p.add_argument("mountpoint")
    p.add_argument("--foreground", action="store_true", help="stay in the foreground")
    p.add_argument("--socket", help="path of the QMP socket")
    p.add_argument("--allow-other", action="store_true", help="let other users access the mount")
    p.add_argument("--poll-max-ns", type=_poll_ns, metavar="NS",
                   help="longest time the request loop polls for the next request before it "
                        "sleeps, adapted to the load as QEMU's IOThread poll-max-ns "
                        "(default 32768; 0: never poll)")
    p.add_argument("--log-level", default="warning",
                   choices=["debug", "info", "warning", "error"], help="log verbosity")

    p = sub.add_parser("unmount", help="stop jobs cleanly and unmount")
    p.add_argument("mountpoint")

    p = sub.add_parser("mirror", help="start mirroring IMAGE to TARGET")
    p.add_argument("mountpoint")
    p.add_argument("image")
    p.add_argument("target")
    p.add_argument("--sync", default="full", choices=["full", "top", "dirty", "none"])
    p.add_argument("--granularity")
    p.add_argument("--bitmap")
    p.add_argument("--speed")
    p.add_argument("--buf-size")
    p.add_argument("--create", action="store_true", help="create the target (sparse, same size)")
    p.add_argument("--copy-mode", default="background", choices=["background", "write-blocking"])
    p.add_argument("--on-target-error", default="report", choices=["report", "ignore", "stop", "enospc"])
    p.add_argument("--on-source-error", default="report", choices=["report", "ignore", "stop", "enospc"])
    p.add_argument("--job-id")

    p = sub.add_parser("status", help="show the jobs")
    p.add_argument("mountpoint")
    p.add_argument("--json", action="store_true")
    p.add_argument("--watch", action="store_true")

    p = sub.add_parser("complete", help="complete jobs (pivot by default); several images: one transaction")
    p.add_argument("mountpoint")
    p.add_argument("images", nargs="+")
    p.add_argument("--no-pivot", action="store_true")

    p = sub.add_parser("cancel", help="cancel jobs; several images: one transaction")
    p.add_argument("mountpoint")
    p.add_argument("images", nargs="+")
    p.add_argument("--force", action="store_true")

    for name in ("pause", "resume"):
        p = sub.add_parser(name, help=f"{name} a job")
        p.add_argument("mountpoint")
        p.add_argument("image")

    p = sub.add_parser("set-speed", help="change a job's rate limit (bytes/s, 0 = unlimited)")
    p.add_argument("mountpoint")
    p.add_argument("image")
    p.add_argument("rate")

    p = sub.add_parser("qmp", help="send one raw QMP command, or an interactive prompt without one")
    p.add_argument("mountpoint")
    p.add_argument("json", nargs="?")

    p = sub.add_parser("bitmap", help="persistent bitmap tools")
    bsub = p.add_subparsers(dest="bitmap_command", required=True, parser_class=_Parser)
    q = bsub.add_parser("inspect", help="describe a bitmap file and say whether the target is good")
    q.add_argument("file")
    q.add_argument("--json", action="store_true")
    return parser


def _resolve(spec: str) -> Callable[[argparse.Namespace], int]:
    module_name, func_name = spec.split(":")
    return getattr(importlib.import_module(module_name), func_name)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    key = args.command if args.command != "bitmap" else f"bitmap {args.bitmap_command}"
    try:
        return _resolve(_HANDLERS[key])(args)
    except MirrorfsError as exc:
        print(f"mirrorfs {key}: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # Whoever read our output has gone (`| head`, `| grep -q`): not a failure to report.
        # Point stdout at /dev/null so the flush at exit does not raise again, and exit as a
        # process killed by SIGPIPE would.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 128 + signal.SIGPIPE


if __name__ == "__main__":
    sys.exit(main())
