"""mirrorfs: live storage migration and replication of disk images beneath unmodified programs."""

__version__ = "0.1.0"
