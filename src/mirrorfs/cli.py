"""The ``mirrorfs`` command line: parses arguments and hands each subcommand to its module.

Exit codes: 0 done; 1 refused by state; 2 bad input. Every expected failure is a
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
from typing import TYPE_CHECKING, Callable, Sequence

from .errors import MirrorfsError

if TYPE_CHECKING:
    from .mirror.params import Param

#: subcommand -> "module:function"; each function takes the parsed namespace and returns an exit code.
_HANDLERS = {
    "mount": "mirrorfs.daemon.mount:cli_mount",
    "unmount": "mirrorfs.daemon.unmount:cli_unmount",
    "mirror": "mirrorfs.control.cli_commands:cli_mirror",
    "status": "mirrorfs.control.cli_commands:cli_status",
    "complete": "mirrorfs.control.cli_commands:cli_complete",
    "cancel": "mirrorfs.control.cli_commands:cli_cancel",
    "pause": "mirrorfs.control.cli_commands:cli_pause",
    "resume": "mirrorfs.control.cli_commands:cli_resume",
    "set-speed": "mirrorfs.control.cli_commands:cli_set_speed",
    "qmp": "mirrorfs.control.cli_commands:cli_qmp",
    "verify": "mirrorfs.control.cli_verify:cli_verify",
    "bitmap inspect": "mirrorfs.bitmap.inspect:cli_inspect",
}


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors as one line and exit code 2."""

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


def _metrics_address(text: str) -> tuple[str, int]:
    from .metrics.address import parse_listen_address

    try:
        return parse_listen_address(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _version() -> str:
    from . import __version__

    return f"mirrorfs {__version__}"


class _OpenChoices(tuple):
    """The choices of an option, for its usage line and ``--help``; argparse lets any value
    through so that the validator (``mirror.params``) refuses a bad one with the message the
    control file and QMP give."""

    def __contains__(self, value: object) -> bool:
        return True


def _add_params(parser: argparse.ArgumentParser, table: "Sequence[Param]") -> None:
    """One ``--KEY`` option per parameter of ``table`` offered on the command line; an option
    not given is left out of the arguments, so the validator's default applies."""
    for param in table:
        if not param.cli:
            continue
        if param.kind == "bool":
            parser.add_argument(f"--{param.key}", action="store_true", default=None, help=param.full_help)
        elif param.choices:
            parser.add_argument(f"--{param.key}", choices=_OpenChoices(param.choice_names),
                                help=param.full_help)
        else:
            parser.add_argument(f"--{param.key}", metavar=param.metavar, help=param.full_help)


def _add_mountpoint(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("mountpoint", metavar="MOUNTPOINT", help="the mountpoint of a mirrorfs mount")


def _mount_command(sub: "argparse._SubParsersAction[_Parser]", name: str, *, help: str,
                   description: str) -> argparse.ArgumentParser:
    """A command that acts on a running mount: MOUNTPOINT is its first argument."""
    parser = sub.add_parser(name, help=help, description=description)
    _add_mountpoint(parser)
    return parser


def build_parser() -> argparse.ArgumentParser:
    from .daemon.mount_options import MountOptionsAction, option_spellings
    from .mirror.params import MIRROR_PARAMS, VERIFY_COMMAND, params_of

    parser = _Parser(prog="mirrorfs", description="Live mirroring of disk images beneath a FUSE mount. "
                     "Exit codes: 0 done, 1 refused in the current state, 2 bad input or cannot mount.")
    parser.add_argument("--version", action="version", version=_version(), help="print the version and exit")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser, metavar="COMMAND")

    p = sub.add_parser("mount", help="expose SOURCE_DIR at MOUNTPOINT",
                       description="Mount SOURCE_DIR at MOUNTPOINT; returns once the mount answers requests.")
    p.add_argument("source_dir", metavar="SOURCE_DIR", help="the directory of images to expose")
    p.add_argument("mountpoint", metavar="MOUNTPOINT", help="an empty directory outside SOURCE_DIR")
    p.add_argument("--foreground", action="store_true",
                   help="stay in the foreground and log to stderr (for systemd; sends READY=1 to "
                        "$NOTIFY_SOCKET once the mount answers requests)")
    p.add_argument("--socket", metavar="PATH",
                   help="path of the QMP socket (default $XDG_RUNTIME_DIR/mirrorfs/NAME-HASH.qmp, "
                        "else /run/mirrorfs/NAME-HASH.qmp)")
    p.add_argument("--allow-other", action="store_true",
                   help="let other users access the mount (FUSE allow_other; for non-root users it "
                        "needs user_allow_other in /etc/fuse.conf)")
    p.add_argument("--poll-max-ns", type=_poll_ns, metavar="NS",
                   help="longest time the request loop polls for the next request before it "
                        "sleeps, adapted to the load as QEMU's IOThread poll-max-ns "
                        f"(default 32768; 0: never poll; at most {MAX_POLL_NS})")
    p.add_argument("--metrics", type=_metrics_address, metavar="HOST:PORT",
                   help="serve Prometheus metrics at http://HOST:PORT/metrics (jobs and FUSE "
                        "requests); no authentication: anyone who reaches HOST:PORT reads them, so "
                        "prefer 127.0.0.1 unless the network is trusted")
    p.add_argument("--state-dir", metavar="DIR",
                   help="keep the mount's persistent jobs (mirror --persistent) in DIR (made 0700 "
                        "if missing; one mount per directory): each later mount with it "
                        "re-attaches every one before it answers a request, and refuses to "
                        "start if a record does not match its image")
    p.add_argument("--log-level", default="warning", metavar="LEVEL",
                   choices=["debug", "info", "warning", "error"],
                   help="log verbosity: debug, info, warning or error (default warning)")
    p.add_argument("-o", dest="options", metavar="OPTIONS", action=MountOptionsAction,
                   help="mount options as mount(8) and fstab pass them, comma-separated: "
                        + ", ".join(option_spellings(p))
                        + "; generic ones (rw, nofail, _netdev, x-*, ...) are ignored")

    _mount_command(sub, "unmount", help="stop jobs cleanly and unmount",
                   description="Stop the mount's jobs cleanly and unmount; returns once the "
                               "mount process has exited.")

    p = _mount_command(sub, "mirror", help="start mirroring IMAGE to TARGET",
                           description="Start a drive-mirror job copying IMAGE to TARGET while it is in use.")
    p.add_argument("image", metavar="IMAGE", help=params_of("drive-mirror")["device"].help)
    p.add_argument("target", metavar="TARGET", help=params_of("drive-mirror")["target"].help)
    _add_params(p, MIRROR_PARAMS)

    p = _mount_command(sub, "status", help="show the jobs",
                           description="Show the jobs: a table, JSON, or live progress bars.")
    p.add_argument("--json", action="store_true", help="print query-block-jobs as JSON instead of a table")
    p.add_argument("--watch", action="store_true", help="draw live progress bars until Ctrl-C")

    p = _mount_command(sub, "complete",
                       help="complete jobs (pivot by default); several images: one transaction",
                       description="Complete ready jobs and return once they have ended.")
    p.add_argument("images", nargs="+", metavar="IMAGE",
                   help="the image(s) whose job to complete; several switch at the same instant")
    p.add_argument("--no-pivot", action="store_true",
                   help="leave an exact copy and keep the mount on the source (default: the mount "
                        "switches the image to the target)")

    p = _mount_command(sub, "cancel", help="cancel jobs; several images: one transaction",
                           description="Cancel jobs and return once they have ended.")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="the image(s) whose job to cancel")
    p.add_argument("--force", action="store_true",
                   help="after ready, stop at once instead of leaving an exact copy")

    for name in ("pause", "resume"):
        p = _mount_command(sub, name, help=f"{name} a job",
                           description=f"{name.capitalize()} a job's background copy.")
        p.add_argument("image", metavar="IMAGE", help="the image whose job to " + name)

    p = _mount_command(sub, "set-speed", help="change a job's rate limit (bytes/s, 0 = unlimited)",
                           description="Change a job's rate limit.")
    p.add_argument("image", metavar="IMAGE", help="the image whose job to change")
    p.add_argument("rate", metavar="RATE", help="bytes per second, e.g. 50M; 0: unlimited")

    p = _mount_command(sub, "verify", help="compare a running job's source and target while in use",
                       description="Compare IMAGE with its job's target cluster by cluster while "
                                   "the job runs, and print the ranges that differ. Exit 0: "
                                   "identical; 1: ranges differ; 2: bad input or refused; 3: the "
                                   "verify did not finish (the job ended, the target was lost).")
    p.add_argument("image", metavar="IMAGE", help="the image whose job to verify")
    _add_params(p, [param for param in params_of(VERIFY_COMMAND).values() if param.key != "device"])
    p.add_argument("--job-id", metavar="ID", help="the job's id, when it is not IMAGE")

    p = _mount_command(sub, "qmp", help="send one raw QMP command, or an interactive prompt without one",
                           description="Send one QMP command and print the reply (exit 1 on an error "
                                       "reply), or without COMMAND an interactive prompt.")
    p.add_argument("json", nargs="?", metavar="COMMAND",
                   help='a QMP command as JSON, e.g. \'{"execute": "query-block-jobs"}\'')

    p = sub.add_parser("bitmap", help="persistent bitmap tools", description="Persistent bitmap tools.")
    bsub = p.add_subparsers(dest="bitmap_command", required=True, parser_class=_Parser, metavar="COMMAND")
    q = bsub.add_parser("inspect", help="describe a bitmap file and say whether the target is good",
                        description="Describe a bitmap file. Exit 0: clean or pivoted (the target is "
                                    "good); 1: dirty; 2: invalid or unreadable.")
    q.add_argument("file", metavar="FILE", help="the bitmap file of a job (--bitmap)")
    q.add_argument("--json", action="store_true", help="print the description as JSON")
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


def mount_helper_main(argv: Sequence[str] | None = None) -> int:
    """``mount.fuse.mirrorfs``: mount(8)'s helper for the ``fuse.mirrorfs`` type."""
    from .daemon.mount_options import helper_argv

    try:
        args = helper_argv(sys.argv[1:] if argv is None else argv)
    except ValueError as exc:
        print(f"mount.fuse.mirrorfs: {exc}", file=sys.stderr)
        return 2
    return main(args) if args else 0


if __name__ == "__main__":
    sys.exit(main())
