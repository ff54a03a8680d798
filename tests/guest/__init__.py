"""The mirrorfs test guest: a Debian kernel plus a busybox-static initramfs that an unmodified
``qemu-system-x86_64`` boots in seconds, and the self-checking record format its writer uses.

- :mod:`guest.build` fetches the kernel and builds (and caches) the initramfs.
- :mod:`guest.vm` runs a guest on a disk image (``GuestVM``, ``run_guest``, ``verify_in_guest``).
- :mod:`guest.records` reads the records back on the host (``verify_file``, ``check_markers``).
- :mod:`guest.pivotcheck` checks both disks after a pivot under a writer (``check_pivot``).
- :mod:`guest.hostwriter` writes the same records from the host through qemu-io (no guest).

Import it as ``guest`` (``from guest.vm import GuestVM``): like ``mounting``, it lives in
``tests/``, which pytest puts on ``sys.path``. Importing it under two names would make two
copies of its exception classes.

The guest's disk exerciser is ``guestrec.c`` (modes ``writer``, ``verify``, ``write-marker``);
its ``/init`` is ``init.sh``.

The exceptions live here rather than in ``mirrorfs.errors`` because they belong to the test
harness, not to the product: a guest that cannot be built or booted is an environment problem
(``GuestError``), a disk whose records do not check out is a test failure (``RecordError``,
an ``AssertionError`` so pytest reports it as one).
"""

from __future__ import annotations


class GuestError(RuntimeError):
    """The guest could not be built, booted, or did not do what it was asked in time."""


class RecordError(AssertionError):
    """A disk's records are not an unbroken, intact run."""
