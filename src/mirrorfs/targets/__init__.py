"""mirrorfs.targets"""
