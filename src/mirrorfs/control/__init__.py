"""The control surfaces of the job engine: the QMP protocol core, server and client, the
``.mirrorfs/control`` file's parsing, the status rendering and the CLI's client commands. They
depend on ``mirror`` but not on FUSE (``fs``); the daemon wires them into a mount."""
