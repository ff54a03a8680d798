"""The arguments of every job command, and the one validator each surface calls.

``mirrorfs mirror`` (the CLI), ``mirror ...`` lines of ``.mirrorfs/control`` and QMP
``drive-mirror`` all build the same mapping (QEMU's argument names) and hand it to
``MirrorParams.from_arguments``; the other job commands go through ``job_arguments``. So a bad
value gets the same one-line ``UsageError`` on every surface, and is refused before anything
changes: no job, target or bitmap is created.

``MIRROR_PARAMS`` is the one table of the mirror's parameters (name, kind, choices, default,
help): the CLI builds its options and help from it and the control file its ``key=value`` words.
Everything here is pure: no I/O, no path resolution (that is ``mirror.paths``, at start).
"""

from __future__ import annotations

import dataclasses
import math
import posixpath
import re
from typing import Any, Mapping

from ..bitmap.memory import DEFAULT_GRANULARITY, MAX_GRANULARITY, MIN_GRANULARITY, check_granularity
from ..errors import UsageError
from ..journal.file import DEFAULT_SIZE as DEFAULT_JOURNAL_SIZE, parse_journal_size
from ..nbd.uri import is_nbd_uri, parse_nbd_uri
from ..state.record import JOB_ID_RE, check_job_id
from ..units import parse_size

__all__ = ["Param", "MIRROR_PARAMS", "JOB_COMMANDS", "VERIFY_COMMAND", "MirrorParams", "job_arguments", "params_of",
           "reject_nul", "reject_unknown", "normalize_image_name", "check_target", "is_uri", "parse_bool_word",
           "SYNC_MODES", "SYNC_ALIASES", "COPY_MODES", "ERROR_POLICIES", "DEFAULT_GRANULARITY", "MIN_GRANULARITY",
           "MAX_GRANULARITY", "DEFAULT_BUF_SIZE", "MAX_BUF_SIZE", "MAX_SIZE"]

#: QEMU's names for a sync from an existing bitmap
SYNC_ALIASES = {"incremental": "dirty", "bitmap": "dirty"}

DEFAULT_BUF_SIZE = 16 * 1024 * 1024
#: The copy buffers are allocated up front (one per copy in flight): past this, a typo like
#: ``buf-size=1T`` would exhaust the daemon's memory. QEMU checks only that it is not negative.
MAX_BUF_SIZE = 1024 * 1024 * 1024
#: QEMU's sizes and rates are int64: a larger number is a typo, and would overflow where it is
#: handed to C (struct packing, numpy).
MAX_SIZE = (1 << 63) - 1

_URI_RE = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")


@dataclasses.dataclass(frozen=True)
class Param:
    """One argument of a job command.

    Attributes:
        key: QEMU's name: the QMP argument, the control file's ``key=value`` and (as ``--key``)
            the CLI option.
        kind: ``"str"``, ``"size"`` (bytes, ``64K``), ``"rate"`` (bytes/s), ``"seconds"``, ``"bool"``,
            ``"choice"``, ``"path"`` (absolute: the CLI resolves a relative one), ``"image"``
            (relative to the mount), ``"target"`` (a path or NBD URI) or ``"job"`` (a job's
            name, looked up by the manager).
        help: what it does, for ``--help``.
        choices: the accepted values of a ``"choice"`` with what each does (``--help``).
        default: the value when it is not given.
        metavar: the CLI's placeholder.
        cli: offered as a ``mirrorfs mirror`` option (False: QEMU's names kept for QMP clients).
        required: the command cannot run without it.
        aliases: other accepted names of choices (QEMU's), alias -> choice.
    """

    key: str
    kind: str
    help: str = ""
    choices: tuple[tuple[str, str], ...] = ()
    default: Any = None
    metavar: str | None = None
    cli: bool = True
    required: bool = False
    aliases: Mapping[str, str] = dataclasses.field(default_factory=dict)

    @property
    def choice_names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.choices)

    @property
    def full_help(self) -> str:
        """The help text with every choice explained and the default named."""
        if not self.choices:
            return self.help
        explained = "; ".join(f"{name}: {what}" for name, what in self.choices)
        return f"{self.help}: {explained} (default {self.default})"


_POLICY_COMMON = (("stop", "the job pauses with io-status failed until 'resume'"),
                  ("enospc", "stop on ENOSPC, report on any other error"))

#: The parameters of ``drive-mirror`` (``device`` and ``target`` are the CLI's positionals).
MIRROR_PARAMS: tuple[Param, ...] = (
    Param("device", "image", "the image, as a path relative to the mount", cli=False, required=True),
    Param("target", "target", "a file path (outside the mount) or an NBD URI: nbd://HOST[:PORT]/EXPORT "
          "or nbd+unix:///EXPORT?socket=PATH", cli=False, required=True),
    Param("sync", "choice", "what to copy", default="full", choices=(
        ("full", "copy the whole image"),
        ("top", "copy only the allocated extents of the source file (holes stay holes)"),
        ("dirty", "copy only the clusters set in --bitmap FILE, to finish an interrupted job"),
        ("none", "copy nothing now, only what is written from now on")), aliases=SYNC_ALIASES),
    Param("granularity", "size", "size of a dirty-bitmap cluster, a power of two from 4K to 64M "
          f"(default {DEFAULT_GRANULARITY >> 10}K)", default=DEFAULT_GRANULARITY, metavar="SIZE"),
    Param("bitmap", "path", "keep the dirty bitmap in FILE so the job's remaining work survives a "
          "restart or crash (default: in memory only); with --sync dirty, the bitmap of the "
          "interrupted job", metavar="FILE"),
    Param("speed", "rate", "limit the background copy to RATE bytes/s, e.g. 100M (default 0: "
          "unlimited)", default=0, metavar="RATE"),
    Param("buf-size", "size", "bytes the background copy keeps in flight, at least the granularity "
          f"(default {DEFAULT_BUF_SIZE >> 20}M)", default=DEFAULT_BUF_SIZE, metavar="SIZE"),
    Param("create", "bool", "create the target file (sparse, the image's size); without it the "
          "target must exist and be at least as large as the image", default=False),
    Param("verify-resync", "bool", "compare every cluster of image and target, copying those that "
          "differ (needed to resume from a bitmap whose job ended)", default=False),
    Param("copy-mode", "choice", "how writes reach the target", default="background", choices=(
        ("background", "writes go to the source and are copied later"),
        ("write-blocking", "once ready, a write returns only when it is on the source and the target"))),
    Param("on-target-error", "choice", "what a target write error does (a lost NBD connection is "
          "retried instead)", default="report", choices=(
              ("report", "the job fails"),
              ("ignore", "the job goes on; the cluster stays dirty and is copied again"),
              *_POLICY_COMMON)),
    Param("on-source-error", "choice", "what a read error on the source does to the job (the "
          "guest's own request gets the error either way)", default="report", choices=(
              ("report", "the job fails"),
              ("ignore", "the job goes on and reads the range again later"),
              *_POLICY_COMMON)),
    Param("on-mismatch", "choice", "what a --sync dirty resume does when a clean cluster it "
          "samples (random ones and the ones cleared last) differs between image and target",
          default="refuse", choices=(
              ("refuse", "the job does not start and nothing changes"),
              ("full", "every cluster is set dirty and copied again"))),
    Param("max-lag", "seconds", "emit __org.mirrorfs_MAX_LAG_EXCEEDED when the recovery point "
          "(the oldest write not yet on the target) is older than SECONDS, and "
          "__org.mirrorfs_MAX_LAG_RECOVERED when it is back under (default 0: off)",
          default=0.0, metavar="SECONDS"),
    Param("journal-size", "size", "bound of the write journal kept beside the bitmap "
          "(BITMAP.journal) while the target is away, so that the replica stays a consistent "
          "earlier state of the image; 0 turns it off; a job without --bitmap has no journal "
          f"(default {DEFAULT_JOURNAL_SIZE >> 30}G)", default=DEFAULT_JOURNAL_SIZE, metavar="SIZE"),
    Param("job-id", "str", "name of the job in QMP and events (default IMAGE)", metavar="ID"),
    Param("persistent", "bool", "record the job in the mount's state directory (mount "
          "--state-dir) so every later mount re-attaches it before it answers a request; its "
          "bitmap lives there unless --bitmap names one", default=False),
    # QEMU's arguments, accepted so that QEMU's clients work unchanged.
    Param("mode", "choice", "absolute-paths: create the target", default="existing",
          choices=(("existing", "the target exists"), ("absolute-paths", "create the target")), cli=False),
    Param("format", "choice", "the target's format", default="raw", choices=(("raw", "bytes"),), cli=False),
    Param("unmap", "bool", "ignored: holes are copied as holes", default=True, cli=False),
    Param("auto-finalize", "bool", "ignored: jobs finalize at once", default=True, cli=False),
    Param("auto-dismiss", "bool", "ignored: ended jobs leave at once", default=True, cli=False),
)

_DEVICE = Param("device", "job", "the job (its image or job-id)", required=True)
#: QMP's name of the online verify (a mirrorfs extension, hence the vendor prefix).
VERIFY_COMMAND = "__org.mirrorfs_block-job-verify"
#: The parameters of the other job commands.
JOB_COMMANDS: dict[str, tuple[Param, ...]] = {
    "block-job-complete": (_DEVICE, Param("pivot", "bool", "switch the mount to the target", default=True)),
    "block-job-cancel": (_DEVICE, Param("force", "bool", "after ready, stop at once", default=False)),
    "block-job-pause": (_DEVICE,),
    "block-job-resume": (_DEVICE,),
    "block-job-set-speed": (_DEVICE, Param("speed", "rate", "bytes per second; 0: unlimited", required=True)),
    VERIFY_COMMAND: (_DEVICE,
                     Param("repair", "bool", "mark the ranges that differ dirty, so the job copies "
                           "them", default=False),
                     Param("speed", "rate", "compare at most RATE bytes/s, e.g. 50M (default 0: "
                           "unlimited)", default=0, metavar="RATE")),
}
_MIRROR_BY_KEY = {p.key: p for p in MIRROR_PARAMS}
SYNC_MODES = _MIRROR_BY_KEY["sync"].choice_names
COPY_MODES = _MIRROR_BY_KEY["copy-mode"].choice_names
ERROR_POLICIES = _MIRROR_BY_KEY["on-target-error"].choice_names


def params_of(command: str) -> dict[str, Param]:
    """key -> Param of ``drive-mirror`` or a ``JOB_COMMANDS`` command."""
    if command == "drive-mirror":
        return _MIRROR_BY_KEY
    return {p.key: p for p in JOB_COMMANDS[command]}


# ---------------------------------------------------------------------------- one value each

def _holds_nul(value: Any) -> bool:
    # Depth is bounded by the QMP framer (128 levels), so plain recursion is safe.
    if isinstance(value, str):
        return "\0" in value
    if isinstance(value, Mapping):
        return any(_holds_nul(k) or _holds_nul(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_holds_nul(v) for v in value)
    return False


def reject_nul(args: Mapping[str, Any]) -> None:
    """Refuse a NUL anywhere in the arguments.

    No path, image name or URI can hold one: os and the kernel refuse it with ValueError, deep
    inside a command. Refused here, the user gets one line naming the parameter.

    Raises:
        UsageError: naming the first parameter that holds a NUL.
    """
    for key, value in args.items():
        if _holds_nul(key) or _holds_nul(value):
            raise UsageError(f"Parameter {key!r} must not contain a NUL character")


def reject_unknown(args: Mapping[str, Any], allowed: Mapping[str, Any] | set[str]) -> None:
    """Raises: UsageError: QEMU's message for the first key not in ``allowed``."""
    for key in args:
        if key not in allowed:
            raise UsageError(f"Parameter {key!r} is unexpected")


def parse_bool_word(value: str) -> bool | str:
    """A boolean written as text (the control file): ``true``/``yes``/``on``/``1`` and their
    opposites; any other text is returned unchanged, for the validator to refuse."""
    if value.lower() in ("true", "yes", "on", "1"):
        return True
    if value.lower() in ("false", "no", "off", "0"):
        return False
    return value


def _bool(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise UsageError(f"parameter {key!r} must be true or false (got {value!r})")
    return value


def _choice(param: Param, value: Any) -> str:
    allowed = (*param.choice_names, *param.aliases)
    if not isinstance(value, str) or value not in allowed:
        raise UsageError(f"parameter {param.key!r} must be one of {', '.join(allowed)} (got {value!r})")
    return param.aliases.get(value, value)


def _number(key: str, value: Any) -> int:
    """A size or rate: an int, an integral JSON float (QMP), or text such as ``64K``."""
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        value = int(value)
    if isinstance(value, float):
        raise UsageError(f"invalid {key} {value!r}: expected a number of bytes such as 65536, 64K or 1G")
    number = parse_size(value, what=key)
    if number > MAX_SIZE:
        raise UsageError(f"invalid {key} {value!r}: more than the largest size, {MAX_SIZE} bytes")
    return number


def _seconds(key: str, value: Any) -> float:
    """A duration: a finite, non-negative number of seconds (a JSON number, or text such as
    ``30`` or ``0.5``)."""
    number: float | None = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            number = float(value)
        except OverflowError:
            number = None
    elif isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            number = None
    if number is None or not math.isfinite(number) or number < 0:
        raise UsageError(f"invalid {key} {value!r}: expected a number of seconds, 0 or more, "
                         f"such as 30 or 0.5")
    return number


def _string(key: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise UsageError(f"parameter {key!r} must be a non-empty string")
    return value


def _value(param: Param, args: Mapping[str, Any]) -> Any:
    """The checked value of ``param`` in ``args``, or its default when it is absent."""
    if param.key not in args:
        if param.required:
            raise UsageError(f"Parameter {param.key!r} is missing")
        return param.default
    value = args[param.key]
    if param.kind in ("size", "rate"):
        return _number(param.key, value)
    if param.kind == "seconds":
        return _seconds(param.key, value)
    if param.kind == "bool":
        return _bool(param.key, value)
    if param.kind == "choice":
        return _choice(param, value)
    if param.kind == "image":
        return normalize_image_name(value)
    if param.kind == "target":
        return check_target(value)
    if param.kind == "job":
        if not isinstance(value, str):
            raise UsageError(f"Invalid parameter type for {param.key!r}, expected: string")
        return value
    if param.kind == "path":
        if not isinstance(value, str) or not value.startswith("/"):
            raise UsageError(f"parameter {param.key!r} must be an absolute path to the {param.key} file")
        return value
    return _string(param.key, value)


def job_arguments(command: str, args: Mapping[str, Any]) -> dict[str, Any]:
    """Validate the arguments of a ``JOB_COMMANDS`` command.

    Returns:
        key -> checked value (defaults filled in).

    Raises:
        UsageError: a NUL, an unknown, missing or malformed argument.
    """
    table = params_of(command)
    reject_nul(args)
    reject_unknown(args, table)
    return {key: _value(param, args) for key, param in table.items()}


def normalize_image_name(name: Any) -> str:
    """Return IMAGE as a clean path relative to the mount, refusing names that leave it.

    Raises:
        UsageError: empty, absolute, naming the mount itself, containing ``..`` components,
            or naming ``.mirrorfs``.
    """
    if not isinstance(name, str) or not name.strip():
        raise UsageError("image name must be a non-empty path relative to the mount")
    if "\0" in name:
        raise UsageError("Parameter 'device' must not contain a NUL character")
    if name.startswith("/"):
        raise UsageError(f"image {name!r} must be a path relative to the mount "
                         f"(e.g. 'vm/disk.img'), not an absolute path")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if not parts:
        raise UsageError(f"image {name!r} names the mount itself: give a file under it")
    # Resolved lexically as the mount does: "a/../b" is "b", "a/../../x" leaves.
    kept: list[str] = []
    for part in parts:
        if part != "..":
            kept.append(part)
        elif kept:
            kept.pop()
        else:
            raise UsageError(f"image {name!r} leaves the mount; give a path inside it, like vm.raw or dir/vm.qcow2")
    if not kept:
        raise UsageError(f"image {name!r} names the mount itself: give a file under it")
    if kept[0] == ".mirrorfs":
        raise UsageError(f"image {name!r} is a mirrorfs control file, not an image")
    return posixpath.join(*kept)


def is_uri(text: str) -> bool:
    """``SCHEME://...``: a URI, not a file path (whether or not the scheme is one we speak)."""
    return bool(_URI_RE.match(text))


def check_target(target: Any) -> str:
    """A target is an NBD URI libnbd's way (nbd, nbds, nbd+unix, nbds+unix) or an absolute path.

    Raises:
        UsageError: empty, another URI scheme (``http://``, ``nbd+tcp://``), a malformed NBD
            URI, or a relative path (the daemon has no working directory of the user's).
    """
    if not isinstance(target, str) or not target:
        raise UsageError("parameter 'target' must be a non-empty path or NBD URI")
    if is_uri(target):
        if not is_nbd_uri(target):
            raise UsageError(f"unsupported target URI {target!r}: use a file path, "
                             f"nbd://HOST[:PORT]/EXPORT or nbd+unix:///EXPORT?socket=PATH")
        parse_nbd_uri(target)
    elif not target.startswith("/"):
        raise UsageError(f"target {target!r} must be an absolute path or an NBD URI")
    return target


def _check_persistent_default_id(image: str) -> None:
    """A persistent job's id names its record file: refuse a default id (the image's name) that
    could not."""
    if not JOB_ID_RE.match(image):
        raise UsageError(f"a persistent job's id names its record file: the default job id (the "
                         f"image name {image!r}) may hold only letters, digits and _.+- (not "
                         f"first: . + -), up to 128; give --job-id")


# ---------------------------------------------------------------------------- drive-mirror

@dataclasses.dataclass(frozen=True)
class MirrorParams:
    """Everything a job needs to start. Build it with ``from_arguments``."""

    image: str
    target: str
    job_id: str
    sync: str = "full"
    granularity: int = DEFAULT_GRANULARITY
    bitmap: str | None = None
    speed: int = 0
    buf_size: int = DEFAULT_BUF_SIZE
    create: bool = False
    copy_mode: str = "background"
    on_target_error: str = "report"
    on_source_error: str = "report"
    #: compare every cluster of source and target instead of trusting the bitmap (copy those that
    #: differ): the way to resume from a bitmap whose job ended
    verify_resync: bool = False
    #: recorded in the mount's state directory, re-attached by every later mount
    persistent: bool = False
    #: what a ``dirty`` resume does when a sampled clean cluster differs: refuse or full
    on_mismatch: str = "refuse"
    #: seconds; a recovery point older than this is reported by an event (0: off)
    max_lag: float = 0.0
    #: bound of the write journal in bytes (0: none); only a job with a bitmap file has one
    journal_size: int = DEFAULT_JOURNAL_SIZE
    #: where the journal goes when not ``BITMAP.journal`` (a state directory's own name)
    journal_path: str | None = None

    @classmethod
    def from_arguments(cls, args: Mapping[str, Any]) -> "MirrorParams":
        """Validate ``drive-mirror`` arguments (``MIRROR_PARAMS``: QEMU's names plus ``bitmap``,
        ``create`` and ``verify-resync``). The one validator of the CLI, the control file and QMP.

        Raises:
            UsageError: a NUL, a missing, unknown or malformed argument.
        """
        reject_nul(args)
        reject_unknown(args, _MIRROR_BY_KEY)
        v = {key: _value(param, args) for key, param in _MIRROR_BY_KEY.items()}
        image, target = v["device"], v["target"]
        sync = v["sync"]
        granularity = check_granularity(v["granularity"])
        buf_size = v["buf-size"]
        if buf_size < granularity:
            raise UsageError(f"buf-size {buf_size} must be at least the granularity ({granularity} bytes)")
        if buf_size > MAX_BUF_SIZE:
            raise UsageError(f"buf-size {buf_size} is more than the largest allowed, 1G; give a smaller one")
        bitmap = v["bitmap"]
        if sync == "dirty" and bitmap is None:
            raise UsageError("sync 'dirty' copies the clusters set in a bitmap: give the bitmap "
                             "file of the interrupted job (--bitmap FILE, bitmap=FILE)")
        create = v["create"] if "create" in args else v["mode"] == "absolute-paths"
        verify = v["verify-resync"]
        if verify and sync not in ("dirty", "full"):
            raise UsageError(f"verify-resync compares every cluster: it goes with sync 'dirty' or "
                             f"'full', not {sync!r}")
        job_id = v["job-id"] or image
        if "job-id" in args:
            check_job_id(job_id)
        elif v["persistent"]:
            _check_persistent_default_id(image)
        if v["on-mismatch"] == "full" and sync != "dirty":
            raise UsageError(f"on-mismatch decides what a resume does when its bitmap proves wrong: "
                             f"it goes with sync 'dirty', not {sync!r}")
        journal_size = parse_journal_size(v["journal-size"])
        return cls(image=image, target=target, job_id=job_id, sync=sync,
                   granularity=granularity, bitmap=bitmap, speed=v["speed"], buf_size=buf_size,
                   create=create, copy_mode=v["copy-mode"], on_target_error=v["on-target-error"],
                   on_source_error=v["on-source-error"], verify_resync=verify,
                   persistent=v["persistent"], on_mismatch=v["on-mismatch"], max_lag=v["max-lag"],
                   journal_size=journal_size)

    @property
    def journal(self) -> str | None:
        """The journal file: ``journal_path``, else beside the bitmap file (``BITMAP.journal``);
        None without a bitmap file or with size 0."""
        if self.bitmap is None or not self.journal_size:
            return None
        return self.journal_path or self.bitmap + ".journal"

    @property
    def is_nbd(self) -> bool:
        return is_nbd_uri(self.target)
