"""The write journal: an ordered, crash-safe, bounded log of the guest's writes for a target that
is away (``docs/journal-format.md``, ``docs/replication-design.md``).

``format.py`` is the codec (pure); ``file.py`` the journal file in use.
"""
