"""The record of one persistent job in a state directory: a versioned JSON document. Pure, no I/O.

A record holds what a later mount needs to re-attach the job before it answers the first request:
the image (relative to the source directory), the target, where the bitmap and the journal are,
and the parameters that change what the job does. It never holds credentials: a target with a
password or key in its URI is refused (TLS material is named by the paths in the URI, as for
``mirror``).

:func:`decode` refuses anything it cannot vouch for (unknown version, missing or unknown field, a
value of the wrong type) with a :class:`StateDirError` whose one-line message names the field.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import re
import urllib.parse
from dataclasses import dataclass
from typing import Any

from ..errors import StateDirError, UsageError

VERSION = 1
#: what a job id someone gives may look like: it names a persistent job's record file, and it
#: is typed in command lines, control-file lines and Prometheus labels (as strict as QEMU's ids).
JOB_ID_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.+-]{0,127}$")
#: URI query keys that would carry a secret itself (``tls-certificates=DIR`` names files: fine).
_SECRET_KEYS = re.compile(r"password|passwd|secret|token|^psk$|^key$", re.IGNORECASE)


def check_job_id(job_id: str) -> str:
    """Refuse a job id that is not ``JOB_ID_RE`` (a given one, or one read from a record).

    Raises:
        UsageError: the id is empty, too long, or has a character other than letters, digits
            and ``_.+-`` (or starts with one of ``.+-``).
    """
    if not isinstance(job_id, str) or not JOB_ID_RE.match(job_id):
        raise UsageError(f"job id {job_id!r} may hold only letters, digits and _.+- "
                         f"(not first: . + -), up to 128")
    return job_id


def _check_image(image: str) -> None:
    parts = image.split("/")
    if not image or image.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise UsageError(f"image {image!r} must be a relative path in the source directory, with "
                         f"no '.', '..' or empty parts")


def _check_target(target: str) -> None:
    if "://" not in target:
        return
    url = urllib.parse.urlsplit(target)
    keys = [k for k, _ in urllib.parse.parse_qsl(url.query, keep_blank_values=True)]
    if url.password is not None or any(_SECRET_KEYS.search(k) for k in keys):
        raise UsageError(f"target {url.scheme}://... carries a credential in its URI: a state "
                         f"directory never stores one; name a file that holds it instead")


@dataclass(frozen=True)
class JobRecord:
    """A persistent job as its state directory keeps it.

    Attributes:
        job_id: the job's id (names the record file).
        image: the image's path relative to the source directory.
        image_size: the image's size when the record was saved (a re-attach refuses another).
        target: a local target's absolute path, or its NBD URI (without credentials).
        bitmap: the bitmap file's absolute path.
        journal: the journal file's absolute path, None when the journal is off.
        granularity: bytes per cluster.
        copy_mode: ``background`` or ``write-blocking``.
        on_target_error: the job's target error policy.
        speed: copy rate limit in bytes per second, 0 for none.
        journal_size: ``--journal-size`` in bytes, 0 when off.
        created_at: when the job was first started, ns since the Unix epoch.
    """

    job_id: str
    image: str
    image_size: int
    target: str
    bitmap: str
    journal: str | None
    granularity: int
    copy_mode: str
    on_target_error: str
    speed: int
    journal_size: int
    created_at: int

    def __post_init__(self) -> None:
        check_job_id(self.job_id)
        _check_image(self.image)
        _check_target(self.target)
        for name in ("bitmap", "journal"):
            path = getattr(self, name)
            if path is not None and not path.startswith("/"):
                raise UsageError(f"{name} path {path!r} of a persistent job must be absolute")
        if (self.journal is None) != (self.journal_size == 0):
            raise UsageError("a persistent job has a journal path exactly when its journal size "
                             "is not 0")

    def replace(self, **changes: object) -> "JobRecord":
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]


#: JSON key -> (attribute, type); every key is required.
_FIELDS: dict[str, tuple[str, Any]] = {
    "job-id": ("job_id", str), "image": ("image", str), "image-size": ("image_size", int),
    "target": ("target", str), "bitmap": ("bitmap", str), "journal": ("journal", (str, type(None))),
    "granularity": ("granularity", int), "copy-mode": ("copy_mode", str),
    "on-target-error": ("on_target_error", str), "speed": ("speed", int),
    "journal-size": ("journal_size", int), "created-at": ("created_at", str),
}


def _iso(ns: int) -> str:
    when = datetime.datetime.fromtimestamp(ns // 1_000_000_000, tz=datetime.timezone.utc)
    return when.strftime("%Y-%m-%dT%H:%M:%S") + f".{ns % 1_000_000_000:09d}Z"


def _from_iso(text: str) -> int:
    stamp, _, frac = text.rstrip("Z").partition(".")
    if not text.endswith("Z") or len(frac) != 9 or not frac.isdigit():
        raise ValueError(text)
    when = datetime.datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S").replace(tzinfo=datetime.timezone.utc)
    return int(when.timestamp()) * 1_000_000_000 + int(frac)


def encode(record: JobRecord) -> bytes:
    """The record as its file holds it: one JSON object, keys sorted, newline-terminated."""
    doc: dict[str, Any] = {"version": VERSION}
    for key, (attr, _) in _FIELDS.items():
        doc[key] = getattr(record, attr)
    doc["created-at"] = _iso(record.created_at)
    return (json.dumps(doc, sort_keys=True, indent=1) + "\n").encode("utf-8")


def decode(data: bytes, *, name: str = "record") -> JobRecord:
    """Decode and validate a record file's contents.

    Raises:
        StateDirError: not JSON, another version, a field missing, unknown or of the wrong type,
            or a value the record may not hold; one line naming the file and the field.
    """
    def bad(why: str) -> StateDirError:
        return StateDirError(f"state record {name}: {why}; remove the file to drop the job, and "
                             f"start it again with mirror --persistent")

    try:
        doc = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise bad("not a JSON document (damaged?)") from None
    if not isinstance(doc, dict):
        raise bad("not a JSON object")
    version = doc.get("version")
    if version != VERSION:
        raise StateDirError(f"state record {name} has version {version!r}; this mirrorfs reads "
                            f"version {VERSION}: use the mirrorfs release that wrote it")
    unknown = sorted(set(doc) - set(_FIELDS) - {"version"})
    if unknown:
        raise bad(f"unknown field {unknown[0]!r}")
    values: dict[str, Any] = {}
    for key, (attr, kind) in _FIELDS.items():
        if key not in doc:
            raise bad(f"field {key!r} is missing")
        value = doc[key]
        if not isinstance(value, kind) or isinstance(value, bool) or (
                isinstance(value, int) and value < 0):
            raise bad(f"field {key!r} has the wrong type or a negative value: {value!r}")
        values[attr] = value
    try:
        values["created_at"] = _from_iso(values["created_at"])
    except ValueError:
        raise bad(f"field 'created-at' is not a UTC time: {values['created_at']!r}") from None
    try:
        return JobRecord(**values)
    except UsageError as exc:
        raise bad(str(exc)) from None
