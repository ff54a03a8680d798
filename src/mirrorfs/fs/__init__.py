"""mirrorfs.fs"""
