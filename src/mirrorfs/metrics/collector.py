"""Metric families of one mount, made at scrape time from a snapshot of its state.

The job values are the fields of ``query-block-jobs`` (``JobManager.query()``), the same objects
``mirrorfs status --json`` prints, so a scrape and the status agree. Each job's series carry the
labels ``image``, ``job_id`` and ``target``; the target label never carries credentials or query
secrets (``public_target``).
"""

from __future__ import annotations

import dataclasses
import logging
import urllib.parse
from typing import Any, Callable, Iterable, Iterator

from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily,
                                    Metric)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from .requests import OperationSnapshot

log = logging.getLogger(__name__)

#: Not "job": Prometheus attaches its own `job` label (the scrape job) and would rename ours to
#: `exported_job`.
JOB_LABELS = ("image", "job_id", "target")

#: (metric name, "gauge" or "counter", query-block-jobs field, help). Counters get ``_total``.
#: A field a job does not report is left out of that scrape.
JOB_METRICS: tuple[tuple[str, str, str, str], ...] = (
    ("mirrorfs_job_dirty_bytes", "gauge", "dirty-bytes", "Bytes of the image still to copy to the target."),
    ("mirrorfs_job_length_bytes", "gauge", "len", "Size of the image."),
    ("mirrorfs_job_offset_bytes", "gauge", "offset", "Bytes known identical on the target (length - dirty)."),
    ("mirrorfs_job_copied_bytes", "counter", "__org.mirrorfs_copied-bytes",
     "Bytes the background copy wrote to the target."),
    ("mirrorfs_job_zeroed_bytes", "counter", "__org.mirrorfs_zeroed-bytes",
     "Bytes the copy wrote to the target as zeroes."),
    ("mirrorfs_job_duplicated_bytes", "counter", "__org.mirrorfs_duplicated-bytes",
     "Bytes of guest writes duplicated to the target."),
    ("mirrorfs_job_skipped_duplicates", "counter", "__org.mirrorfs_skipped-duplicates",
     "Guest writes not duplicated in flight (bound reached); their clusters stay dirty for the copy."),
    ("mirrorfs_job_conflicts", "counter", "__org.mirrorfs_conflicts",
     "Copies or duplicates that raced a newer write and left their clusters dirty."),
    ("mirrorfs_job_reconnects", "counter", "__org.mirrorfs_reconnects",
     "Times the connection to a lost target was restored."),
    ("mirrorfs_job_outages", "counter", "__org.mirrorfs_outages", "Times the target was lost."),
    ("mirrorfs_job_recovery_point_age_seconds", "gauge", "__org.mirrorfs_recovery-point-age",
     "Seconds since the oldest write that is not on the target yet (0 in sync)."),
    ("mirrorfs_job_bytes_behind", "gauge", "__org.mirrorfs_bytes-behind",
     "Bytes the target lacks (dirty clusters, writes in flight included)."),
    ("mirrorfs_job_rate_bytes_per_second", "gauge", "rate", "Measured rate of the background copy."),
    ("mirrorfs_job_speed_limit_bytes_per_second", "gauge", "speed", "Rate limit of the copy (0: unlimited)."),
    ("mirrorfs_job_target_connected", "gauge", "__org.mirrorfs_target-connected",
     "1 while the target is connected, 0 while it is lost."),
    ("mirrorfs_job_ready", "gauge", "ready", "1 once every cluster is on the target (complete allowed)."),
    ("mirrorfs_job_paused", "gauge", "paused", "1 while the job is paused (by pause or on-target-error stop)."),
)

#: Every value of the state-set gauges, so each state has a series (0 or 1) from the start.
IO_STATUSES = ("ok", "failed", "nospace")
JOB_STATUSES = ("created", "running", "paused", "ready", "standby", "concluded", "null")

#: Query keys of an NBD URI that may be shown: everything else (TLS material) is dropped.
_PUBLIC_QUERY_KEYS = ("socket",)


def public_target(target: str) -> str:
    """``target`` without user info or query secrets: a path stays as it is; of a URI only the
    scheme, host, port, path and ``socket=`` remain."""
    if "://" not in target:
        return target
    try:
        parts = urllib.parse.urlsplit(target)
        host = parts.hostname or ""
        port = parts.port
    except ValueError:
        return target.split("://", 1)[0] + "://?"  # unparsable: show nothing that could be secret
    if ":" in host:
        host = f"[{host}]"
    netloc = host if port is None else f"{host}:{port}"
    query = [(k, v) for k, v in urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
             if k in _PUBLIC_QUERY_KEYS]
    # Not urlunsplit: it drops the empty authority of nbd+unix:///EXPORT.
    encoded = urllib.parse.urlencode(query, safe="/")
    return f"{parts.scheme}://{netloc}{parts.path}" + (f"?{encoded}" if encoded else "")


@dataclasses.dataclass(frozen=True)
class MountSnapshot:
    """What one scrape reports, taken at one instant on the mount's trio thread."""

    source_dir: str
    mountpoint: str
    jobs: list[dict[str, Any]]
    requests: dict[str, OperationSnapshot]


class ScrapeError(Exception):
    """A snapshot could not be taken (the mount is stopping or does not answer)."""


def _number(value: Any) -> float:
    return float(bool(value)) if isinstance(value, bool) else float(value)


def job_families(jobs: Iterable[dict[str, Any]]) -> Iterator[Metric]:
    """The per-job metric families of ``query-block-jobs`` entries."""
    jobs = list(jobs)
    labelled = [(job, [str(job.get("__org.mirrorfs_image", "")), str(job.get("device", "")),
                       public_target(str(job.get("target", "")))]) for job in jobs]
    for name, kind, field, doc in JOB_METRICS:
        family_type = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
        family = family_type(name, doc, labels=JOB_LABELS)
        for job, labels in labelled:
            if field in job:
                family.add_metric(labels, _number(job[field]))
        yield family
    failed = GaugeMetricFamily("mirrorfs_job_failed", "1 when the job ended with an error (it stays "
                               "listed with its error until a new job replaces it).", labels=JOB_LABELS)
    io_status = GaugeMetricFamily("mirrorfs_job_io_status", "1 for the job's io-status (the last "
                                  "target error), 0 for the others.", labels=(*JOB_LABELS, "io_status"))
    status = GaugeMetricFamily("mirrorfs_job_status", "1 for the job's state, 0 for the others.",
                               labels=(*JOB_LABELS, "status"))
    for job, labels in labelled:
        failed.add_metric(labels, 1.0 if job.get("error") else 0.0)
        for family, states, current in ((io_status, IO_STATUSES, job.get("io-status")),
                                        (status, JOB_STATUSES, job.get("status"))):
            for state in (*states, *([current] if current not in states else [])):
                family.add_metric([*labels, str(state)], 1.0 if state == current else 0.0)
    yield from (failed, io_status, status)


def request_families(requests: dict[str, OperationSnapshot], bounds: tuple[float, ...]) -> Iterator[Metric]:
    """Requests by operation and their latency histogram."""
    counts = CounterMetricFamily("mirrorfs_fuse_requests", "FUSE requests served, by operation.",
                                 labels=("operation",))
    latency = HistogramMetricFamily("mirrorfs_fuse_request_duration_seconds",
                                    "Time mirrorfs took to answer a FUSE request, by operation.",
                                    labels=("operation",))
    for name in sorted(requests):
        op = requests[name]
        counts.add_metric([name], op.count)
        if not op.count:
            continue  # 20 series per operation: only for the operations the mount has seen
        cumulative, edges = 0, []
        for bound, count in zip((*map(floatToGoString, bounds), "+Inf"), op.buckets):
            cumulative += count
            edges.append((bound, cumulative))
        latency.add_metric([name], edges, op.sum_ns / 1e9)
    yield counts
    yield latency


class MountCollector(Collector):
    """The mount's metrics; ``snapshot()`` is called once per scrape.

    Error handling: a snapshot that cannot be taken, or a bug while building the families, is
    logged and counted in ``mirrorfs_scrape_errors_total``; the scrape still answers (with the
    process metrics) and the mount goes on unaffected.
    """

    def __init__(self, snapshot: Callable[[], MountSnapshot], bounds: tuple[float, ...], version: str) -> None:
        self._snapshot = snapshot
        self._bounds = bounds
        self._version = version
        self._errors = 0

    def describe(self) -> list[Metric]:
        return []  # no collect() at registration: the mount may not be running yet

    def collect(self) -> Iterator[Metric]:
        families: list[Metric] = []
        try:
            snap = self._snapshot()
            info = GaugeMetricFamily("mirrorfs_mount_info", "The mount this endpoint reports on.",
                                     labels=("source_dir", "mountpoint", "version"))
            info.add_metric([snap.source_dir, snap.mountpoint, self._version], 1.0)
            families.append(info)
            families.extend(job_families(snap.jobs))
            families.extend(request_families(snap.requests, self._bounds))
        except ScrapeError as exc:
            self._errors += 1
            log.warning("metrics scrape without mount state: %s", exc)
            families = []
        except Exception:
            self._errors += 1
            log.exception("BUG while collecting metrics; the scrape reports no mount state")
            families = []
        yield from families
        errors = CounterMetricFamily("mirrorfs_scrape_errors", "Scrapes that could not report the "
                                     "mount's state (see the mount log).")
        errors.add_metric([], self._errors)
        yield errors
