"""The daemon's log: what pyfuse3 reports as an error only when something of ours failed."""
from __future__ import annotations

import io
import logging
import os
from collections.abc import Iterator

import pytest

from mirrorfs.daemon.mount import _setup_logging


@pytest.fixture
def restore_root_logger() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def _log_reply_failure(op: str, errno_value: int, level: str) -> str:
    stream = io.StringIO()
    _setup_logging(level, stream)
    logging.getLogger("pyfuse3").error(f"{op}(): fuse_reply_* failed with %s", os.strerror(errno_value))
    return stream.getvalue()


@pytest.mark.usefixtures("restore_root_logger")
def test_a_reply_the_kernel_no_longer_awaits_is_info_not_an_error() -> None:
    # The umount in test_admin_mounts raced a RELEASE this way and failed CI on the ERROR line.
    text = _log_reply_failure("fuse_release", 2, "info")
    assert " pyfuse3 INFO: fuse_release(): fuse_reply_* failed with No such file or directory " \
           "(the kernel no longer waits for this reply)" in text
    assert "ERROR" not in text
    assert _log_reply_failure("fuse_release", 2, "warning") == ""


@pytest.mark.usefixtures("restore_root_logger")
def test_a_reply_that_failed_otherwise_stays_an_error() -> None:
    text = _log_reply_failure("fuse_write", 5, "warning")
    assert " pyfuse3 ERROR: fuse_write(): fuse_reply_* failed with Input/output error\n" in text
