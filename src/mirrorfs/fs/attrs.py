"""The attributes the mount reports for source files and for ``.mirrorfs`` (pure: no I/O)."""

from __future__ import annotations

import os

import pyfuse3

#: How long the kernel may cache names and attributes. Short, because the mirror engine can change
#: what backs a file (pivot) and sizes must come from the backing file.
ENTRY_TIMEOUT = 1.0
ATTR_TIMEOUT = 1.0


def source_attributes(inode: int, st: os.stat_result) -> pyfuse3.EntryAttributes:
    """The attributes of a source file or directory, from its ``stat``."""
    entry = pyfuse3.EntryAttributes()
    entry.st_ino = inode
    entry.generation = 0
    entry.entry_timeout = ENTRY_TIMEOUT
    entry.attr_timeout = ATTR_TIMEOUT
    entry.st_mode = st.st_mode
    entry.st_nlink = st.st_nlink
    entry.st_uid = st.st_uid
    entry.st_gid = st.st_gid
    entry.st_rdev = st.st_rdev
    entry.st_size = st.st_size
    entry.st_blksize = st.st_blksize
    entry.st_blocks = st.st_blocks
    entry.st_atime_ns = st.st_atime_ns
    entry.st_mtime_ns = st.st_mtime_ns
    entry.st_ctime_ns = st.st_ctime_ns
    return entry


def virtual_attributes(inode: int, mode: int, size: int, nlink: int, owner: tuple[int, int],
                       time_ns: int) -> pyfuse3.EntryAttributes:
    """The attributes of ``.mirrorfs`` or one of its files, owned by ``owner`` (uid, gid)."""
    entry = pyfuse3.EntryAttributes()
    entry.st_ino = inode
    # Never cached: the content (and so the size) changes all the time.
    entry.entry_timeout = 0
    entry.attr_timeout = 0
    entry.st_mode = mode
    entry.st_nlink = nlink
    entry.st_uid, entry.st_gid = owner
    entry.st_size = size
    entry.st_blksize = 4096
    entry.st_blocks = (size + 511) // 512
    entry.st_atime_ns = entry.st_mtime_ns = entry.st_ctime_ns = time_ns
    return entry
