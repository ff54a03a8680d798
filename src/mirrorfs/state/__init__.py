"""A mount's persistent jobs (``mount --state-dir DIR``): ``record.py`` the record of one job
(JSON, pure), ``directory.py`` the directory that keeps them (safe, locked, atomic saves).
"""
