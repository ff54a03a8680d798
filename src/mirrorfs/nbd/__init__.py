"""mirrorfs.nbd"""
