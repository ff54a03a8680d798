"""Validated parameters of a mirror job, shared by QMP ``drive-mirror``, the control file and the CLI.

Validation happens here, once, before anything changes: a bad value raises ``UsageError`` with a
message naming the parameter, and no job, target or bitmap is created.
"""

from __future__ import annotations

import dataclasses
import posixpath
from typing import Any, Mapping

from ..errors import UsageError
from ..units import parse_size

SYNC_MODES = ("full", "top", "dirty", "none")
#: QEMU's names for a sync from an existing bitmap
SYNC_ALIASES = {"incremental": "dirty", "bitmap": "dirty"}
COPY_MODES = ("background", "write-blocking")
ERROR_POLICIES = ("report", "ignore", "stop", "enospc")

DEFAULT_GRANULARITY = 64 * 1024
MIN_GRANULARITY = 4 * 1024
MAX_GRANULARITY = 64 * 1024 * 1024
DEFAULT_BUF_SIZE = 16 * 1024 * 1024
#: The copy buffers are allocated up front (one per copy in flight): past this, a typo like
#: ``buf-size=1T`` would exhaust the daemon's memory. QEMU checks only that it is not negative.
MAX_BUF_SIZE = 1024 * 1024 * 1024


def normalize_image_name(name: Any) -> str:
    """Return IMAGE as a clean path relative to the mount, refusing names that leave it.

    Raises:
        UsageError: empty, absolute, containing ``..`` components, or naming ``.mirrorfs``.
    """
    if not isinstance(name, str) or not name.strip():
        raise UsageError("image name must be a non-empty path relative to the mount")
    if name.startswith("/"):
        raise UsageError(f"image {name!r} must be a path relative to the mount, not an absolute path")
    if "\0" in name:
        raise UsageError("image name must not contain NUL bytes")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if not parts or any(p == ".." for p in parts):
        raise UsageError(f"image {name!r} leaves the mount; give a path inside it, like vm.raw or dir/vm.qcow2")
    if parts[0] == ".mirrorfs":
        raise UsageError(f"image {name!r} is a mirrorfs control file, not an image")
    return posixpath.join(*parts)


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

    @classmethod
    def from_arguments(cls, args: Mapping[str, Any]) -> "MirrorParams":
        """Validate QMP-style arguments (QEMU names: ``device``, ``target``, ``sync``, ``mode``,
        ``buf-size``, ``copy-mode``, ``on-target-error``, ``on-source-error``, ``job-id``, plus
        ``bitmap``, ``create`` and ``verify-resync``).

        Raises:
            UsageError: a missing, unknown or malformed argument.
        """
        known = {"device", "target", "sync", "granularity", "bitmap", "speed", "buf-size", "mode",
                 "create", "copy-mode", "on-target-error", "job-id", "format", "on-source-error",
                 "unmap", "auto-finalize", "auto-dismiss", "verify-resync"}
        unknown = sorted(set(args) - known)
        if unknown:
            raise UsageError(f"unknown parameter {unknown[0]!r} for mirror")
        for required in ("device", "target"):
            if required not in args:
                raise UsageError(f"parameter {required!r} is missing")
        image = normalize_image_name(args["device"])
        target = args["target"]
        if not isinstance(target, str) or not target:
            raise UsageError("parameter 'target' must be a non-empty path or NBD URI")

        sync = _choice(args, "sync", (*SYNC_MODES, *SYNC_ALIASES), "full")
        sync = SYNC_ALIASES.get(sync, sync)
        granularity = _size(args, "granularity", DEFAULT_GRANULARITY)
        if granularity & (granularity - 1) or not MIN_GRANULARITY <= granularity <= MAX_GRANULARITY:
            raise UsageError(f"granularity {granularity} must be a power of two from 4K to 64M")
        buf_size = _size(args, "buf-size", DEFAULT_BUF_SIZE)
        if buf_size < granularity:
            raise UsageError(f"buf-size {buf_size} must be at least the granularity ({granularity})")
        if buf_size > MAX_BUF_SIZE:
            raise UsageError(f"buf-size {buf_size} is more than the largest allowed, 1G; give a smaller one")
        speed = _size(args, "speed", 0)
        bitmap = args.get("bitmap")
        if bitmap is not None and (not isinstance(bitmap, str) or not bitmap.startswith("/")):
            raise UsageError("parameter 'bitmap' must be an absolute path to the bitmap file")
        if sync == "dirty" and bitmap is None:
            raise UsageError("sync 'dirty' needs a bitmap: give bitmap=FILE from the interrupted job")
        mode = _choice(args, "mode", ("existing", "absolute-paths"), "existing")
        create = args.get("create", mode == "absolute-paths")
        if not isinstance(create, bool):
            raise UsageError("parameter 'create' must be true or false")
        verify = args.get("verify-resync", False)
        if not isinstance(verify, bool):
            raise UsageError("parameter 'verify-resync' must be true or false")
        if verify and sync not in ("dirty", "full"):
            raise UsageError(f"verify-resync compares every cluster: it goes with sync 'dirty' or "
                             f"'full', not {sync!r}")
        copy_mode = _choice(args, "copy-mode", COPY_MODES, "background")
        policy = _choice(args, "on-target-error", ERROR_POLICIES, "report")
        source_policy = _choice(args, "on-source-error", ERROR_POLICIES, "report")
        job_id = args.get("job-id", image)
        if not isinstance(job_id, str) or not job_id:
            raise UsageError("parameter 'job-id' must be a non-empty string")
        fmt = args.get("format", "raw")
        if fmt != "raw":
            raise UsageError("mirrorfs mirrors bytes: the only target format is 'raw'")
        return cls(image=image, target=target, job_id=job_id, sync=sync, granularity=granularity,
                   bitmap=bitmap, speed=speed, buf_size=buf_size, create=create,
                   copy_mode=copy_mode, on_target_error=policy, on_source_error=source_policy,
                   verify_resync=verify)

    @property
    def is_nbd(self) -> bool:
        return self.target.startswith(("nbd://", "nbd+unix://", "nbds://", "nbds+unix://"))


def _choice(args: Mapping[str, Any], name: str, allowed: tuple[str, ...], default: str) -> str:
    value = args.get(name, default)
    if value not in allowed:
        raise UsageError(f"parameter {name!r} must be one of {', '.join(allowed)} (got {value!r})")
    return value


def _size(args: Mapping[str, Any], name: str, default: int) -> int:
    value = args.get(name, default)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return parse_size(value, what=name)
