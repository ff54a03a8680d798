"""What the benchmark scripts share: one copy of each helper they need.

- :mod:`benchlib.venv`: re-run a script with the checkout's ``.venv`` interpreter (stdlib
  only, so a script can import it before the venv is there);
- :mod:`benchlib.procs`: child processes in their own session, stopped as a group, polling
  with a deadline, mount and process checks, CPU time and peak RSS of a daemon, and
  :func:`benchlib.procs.guarded` which turns Ctrl-C and SIGTERM into an orderly clean-up;
- :mod:`benchlib.images`: fully written and sparse test images, page-cache eviction and
  residency;
- :mod:`benchlib.qmp`: connect to a QMP socket, wait for a block job's event;
- :mod:`benchlib.services`: a ``mirrorfs mount`` and a ``qemu-storage-daemon`` started and
  stopped by a script;
- :mod:`benchlib.fio`: the fio workloads and one fio run;
- :mod:`benchlib.machine`: what a result was measured on, and a directory's file system;
- :mod:`benchlib.odirect`: random O_DIRECT writes through a mount, optionally each timed;
- :mod:`benchlib.stats`: medians with their range, latency percentiles.

A script imports its modules after :func:`benchlib.venv.ensure_venv`, with the ``scripts``
directory first on ``sys.path`` (set from the script's own location).
"""
