"""mirrorfs.control"""
