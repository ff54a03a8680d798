"""Where a job's paths may lead: never into the mount, onto an image, or onto another job's files.

Role: every path a mirror command names (a local target, ``--bitmap``, an ``nbd+unix`` socket, a
TLS certificate directory) and the image itself are resolved here before anything is created or
opened, and refused with one line when they lead somewhere a job must not write or the daemon
must not look:

- into the mount itself: directly, through a symlink, through ``..`` after a symlink, or through a
  bind mount of it (compared by real path and by the mount's ``st_dev``). The daemon serves the
  mount from its trio thread; a path into it opened from that thread waits on itself forever.
- onto the job's source (by real path and by inode), or onto any existing file of the source
  directory: every one of them is an image of the mount, written behind its back. A file with
  several hard links on the source's file system is refused too: another name may be an image.
- onto a file another job writes (its target or bitmap) or this job's other file.
- an image that is a symbolic link, is reached through one, or has more than one hard link: the
  mount serves each name as its own node, so writes through the other name would bypass the job.

Resolving does I/O (``realpath``, ``stat``) that can hang on a dead file system or deadlock on
the mount itself, so it runs in a worker thread with a deadline (``run_resolver``); the decisions
(``check_path``, ``check_image_links``) are pure functions of what was found.
"""

from __future__ import annotations

import dataclasses
import os
import stat
from typing import Callable, Mapping, TypeVar

import trio

from ..errors import UsageError

#: How long resolving a job's paths may take before the start is refused (a hung file system).
RESOLVE_TIMEOUT = 10.0

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class Resolved:
    """What one path leads to.

    Attributes:
        given: the path as the user wrote it.
        real: ``os.path.realpath`` of it (every symlink and ``..`` resolved).
        dev: ``st_dev`` of the file, or of its directory when the file does not exist (None when
            neither can be stat'ed).
        ino: ``st_ino`` of the file when it exists.
        regular: it exists and is a regular file.
        nlink: its number of hard links (0 when it does not exist).
    """

    given: str
    real: str
    dev: int | None = None
    ino: int | None = None
    regular: bool = False
    nlink: int = 0

    @property
    def identity(self) -> tuple[int, int] | None:
        """``(st_dev, st_ino)`` of an existing file: the same for every name of one inode."""
        return (self.dev, self.ino) if self.dev is not None and self.ino is not None else None


@dataclasses.dataclass(frozen=True)
class Places:
    """The places a job's paths must not lead to.

    Attributes:
        mount_real: the real path of the mountpoint (None: no mount).
        mount_dev: ``st_dev`` of the mount (None if it could not be stat'ed).
        source_dir_real: the real path of the source directory (None: not known).
        source: the job's image (its backing file).
        image: the image's name in the mount, for messages.
        claimed: real paths, ``(st_dev, st_ino)`` identities and NBD URIs in use -> what uses them
            ("the target of job 'x'").
    """

    mount_real: str | None
    mount_dev: int | None
    source_dir_real: str | None
    source: Resolved
    image: str
    claimed: Mapping[object, str] = dataclasses.field(default_factory=dict)


def inside(path: str, directory: str) -> bool:
    """Whether the normalised absolute ``path`` is ``directory`` or below it."""
    directory = directory.rstrip("/") or "/"
    return path == directory or path.startswith(directory + "/") or directory == "/"


def claim_keys(resolved: Resolved) -> list[object]:
    """The keys under which a file is recorded in ``Places.claimed``."""
    identity = resolved.identity
    return [resolved.real] + ([identity] if identity is not None else [])


def check_path(what: str, resolved: Resolved, places: Places, *, written: bool) -> None:
    """Refuse a path that leads somewhere this job must not go.

    Args:
        what: its role in messages ("target", "bitmap", "NBD socket", "TLS certificate directory").
        resolved: what the path leads to.
        places: where no path may lead.
        written: the job writes the file (target, bitmap): it must also not be the source, an
            image of the mount or a file in use.

    Raises:
        UsageError: one line naming the path and where it leads.
    """
    given = resolved.given
    if (places.mount_real is not None and inside(resolved.real, places.mount_real)) or (
            places.mount_dev is not None and resolved.dev == places.mount_dev):
        raise UsageError(f"{what} {given!r} is inside the mount {places.mount_real} "
                         f"(it resolves to {resolved.real}); put it outside the mount")
    if not written:
        return
    source = places.source
    if resolved.real == source.real or (
            resolved.identity is not None and resolved.identity == source.identity):
        raise UsageError(f"{what} {given!r} is the image {places.image!r} itself; "
                         f"give a {what} outside the source directory")
    if resolved.regular and places.source_dir_real is not None and inside(
            resolved.real, places.source_dir_real):
        raise UsageError(f"{what} {given!r} is an image of the mount ({resolved.real} is in the "
                         f"source directory); give a {what} outside the source directory")
    if resolved.regular and resolved.nlink > 1 and resolved.dev == source.dev:
        raise UsageError(f"{what} {given!r} has {resolved.nlink} hard links and another name may "
                         f"be an image of the mount; give a {what} with one name")
    for key in claim_keys(resolved):
        user = places.claimed.get(key)
        if user is not None:
            raise UsageError(f"{what} {given!r} is already {user}; give another {what}")


@dataclasses.dataclass(frozen=True)
class ImageLinks:
    """How an image is reached in the source directory (from ``lstat`` and ``realpath``)."""

    name: str
    expected_real: str
    real: str
    is_symlink: bool
    nlink: int


def check_image_links(links: ImageLinks) -> None:
    """Refuse an image that has another name in the mount.

    Raises:
        UsageError: the image is a symbolic link, lies under a symlinked directory, or has more
            than one hard link.
    """
    if links.is_symlink:
        raise UsageError(f"image {links.name!r} is a symbolic link (to {links.real}); mirror the "
                         f"file itself: writes through its other name would bypass the job")
    if links.real != links.expected_real:
        raise UsageError(f"image {links.name!r} is reached through a symbolic link (it is "
                         f"{links.real}); mirror it by its real name: writes through the other "
                         f"name would bypass the job")
    if links.nlink > 1:
        raise UsageError(f"image {links.name!r} has {links.nlink} hard links; mirror a file with "
                         f"one name: writes through its other names would bypass the job")


# ---------------------------------------------------------------------------- I/O (worker thread)

def resolve(path: str) -> Resolved:
    """Resolve ``path`` (blocking: run it in a worker thread, never on the trio thread)."""
    real = os.path.realpath(path)
    try:
        st = os.stat(real)
    except OSError:
        try:
            parent = os.stat(os.path.dirname(real))
        except OSError:
            return Resolved(path, real)
        return Resolved(path, real, dev=parent.st_dev)
    return Resolved(path, real, dev=st.st_dev, ino=st.st_ino, regular=stat.S_ISREG(st.st_mode),
                    nlink=st.st_nlink)


def mount_place(mountpoint: str) -> tuple[str, int | None]:
    """The mount's real path and ``st_dev`` (blocking: a worker thread while the loop serves)."""
    real = os.path.realpath(mountpoint)
    try:
        return real, os.stat(real).st_dev
    except OSError:
        return real, None


def image_links(source_dir: str, relpath: str) -> ImageLinks | None:
    """How ``relpath`` is reached in ``source_dir``; None if nothing is there (blocking)."""
    path = os.path.join(source_dir, relpath)
    try:
        st = os.lstat(path)
    except OSError:
        return None
    expected = os.path.join(os.path.realpath(source_dir), relpath)
    return ImageLinks(relpath, expected, os.path.realpath(path), stat.S_ISLNK(st.st_mode),
                      st.st_nlink)


async def run_resolver(fn: Callable[..., T], *args: object, timeout: float = RESOLVE_TIMEOUT) -> T:
    """Run a blocking resolver in a worker thread, giving up after ``timeout`` seconds.

    The trio thread serves the mount: a path into the mount resolved there would wait on itself,
    and one on a hung file system would stop every request. A resolver that does not return in
    time is abandoned (its thread finishes or stays blocked on its own).

    Raises:
        UsageError: the resolver did not finish in time.
    """
    with trio.move_on_after(timeout):
        return await trio.to_thread.run_sync(lambda: fn(*args), abandon_on_cancel=True)
    raise UsageError(f"the paths of this job could not be resolved within {timeout:.0f} s "
                     f"(a file system on the way does not answer); check them and try again")
