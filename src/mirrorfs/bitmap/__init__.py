"""mirrorfs.bitmap"""
