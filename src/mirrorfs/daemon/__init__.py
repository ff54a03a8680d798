"""The mount process: assembles one mount from the layers below and runs it.

- ``mount``: ``MountService``, the mount's lifetime (pyfuse3 session, nursery, teardown stack),
  and the ``mirrorfs mount`` command.
- ``components``: starts the job manager, the QMP server, the ``.mirrorfs/`` files and the
  metrics endpoint inside a mount, and registers their teardown.
- ``unmount``: the ``mirrorfs unmount`` command.
- ``mount_options``: the ``-o`` spellings of the mount flags (mount(8), fstab).
- ``sdnotify``: ``READY=1`` for systemd.

The only package that imports both ``fs`` and ``control``: neither knows the other.
"""
