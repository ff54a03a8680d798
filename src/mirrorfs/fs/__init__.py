"""The pyfuse3 adapter: ``Operations`` (the FUSE handlers), the image nodes, the ``.mirrorfs/``
directory and the request loop. It knows the job engine only through the node's job seam and
nothing of the control surfaces or the daemon that assembles a mount."""
