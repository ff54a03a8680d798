"""Prometheus metrics of a mount (``mirrorfs mount --metrics HOST:PORT``).

- ``address``: the ``HOST:PORT`` argument (pure).
- ``requests``: per-operation request counts and latency buckets, kept as plain integers on the
  request path; nothing of prometheus-client runs per request.
- ``collector``: turns a snapshot of the mount (the jobs as ``query-block-jobs`` lists them, the
  request counts) into metric families at scrape time.
- ``server``: prometheus-client's HTTP server thread, and the bridge that takes each snapshot on
  the mount's trio thread.
"""
