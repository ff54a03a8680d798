"""mirrorfs.mirror"""
