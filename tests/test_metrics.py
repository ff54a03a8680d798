"""``mirrorfs mount --metrics HOST:PORT``: the address check, the target label, the request
counters, the collector's error containment, a scrape of a real mount that matches ``status
--json``, a real Prometheus server reading a job's dirty bytes back through its query API, and
the example alert rules and scrape configuration checked by ``promtool``."""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import re
import shutil
import socket
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import pytest
import trio
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from pyfuse3 import FUSEError

from mirrorfs.fs.operations import ROOT_INODE, Operations, _guard
from mirrorfs.metrics.address import parse_listen_address
from mirrorfs.metrics.collector import MountCollector, MountSnapshot, ScrapeError, public_target
from mirrorfs.metrics.requests import BOUNDS_NS, BUCKET_BOUNDS, SLOT_OF, RequestStats
from mirrorfs.metrics.server import MetricsServer
from mounting import Mount, daemon_pids, is_mounted, mirrorfs_cli, stop_process
from nbdservers import qemu_nbd
from test_replication_support import make_blank, make_image, qmp, wait_job, wait_ready

ROOT = Path(__file__).resolve().parents[1]
MiB = 1 << 20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of an exposition: (name, labels) -> value."""
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        assert reply.status == 200
        return reply.read().decode()


# ---------------------------------------------------------------------------- HOST:PORT

@pytest.mark.parametrize("text, expected", [
    ("127.0.0.1:9464", ("127.0.0.1", 9464)),
    ("localhost:1", ("localhost", 1)),
    ("0.0.0.0:65535", ("0.0.0.0", 65535)),
    ("[::1]:9464", ("::1", 9464)),
    ("[::]:9464", ("::", 9464)),
    ("metrics.example-host.org:80", ("metrics.example-host.org", 80)),
])
def test_listen_address_accepts(text: str, expected: tuple[str, int]) -> None:
    assert parse_listen_address(text) == expected


@pytest.mark.parametrize("text, error", [
    ("9464", "is not HOST:PORT"),
    (":9464", "is not HOST:PORT"),
    ("localhost", "is not HOST:PORT"),
    ("127.0.0.1:", "is not a number"),
    ("127.0.0.1:0", "is not a number from 1 to 65535"),
    ("127.0.0.1:65536", "is not a number from 1 to 65535"),
    ("127.0.0.1:+80", "is not a number"),
    ("127.0.0.1:٣٣", "is not a number"),
    ("::1:9464", "write an IPv6 address in brackets"),
    ("[::1]9464", "is not HOST:PORT"),
    ("[nope]:9464", "is not an IPv6 address"),
    ("http://x:80", "is not a host name"),
    ("a b:80", "is not a host name"),
    ("-x:80", "is not a host name"),
])
def test_listen_address_refuses(text: str, error: str) -> None:
    with pytest.raises(ValueError, match=re.escape(error)):
        parse_listen_address(text)


def test_bad_metrics_address_is_one_line_and_changes_nothing(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "mnt").mkdir()
    log = tmp_path / "mount.log"
    r = mirrorfs_cli("mount", tmp_path / "src", tmp_path / "mnt", "--metrics", "localhost", check=False,
                     env={"MIRRORFS_LOG_FILE": str(log), "PATH": "/usr/bin:/bin"})
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "--metrics: 'localhost' is not HOST:PORT" in r.stderr
    assert not is_mounted(tmp_path / "mnt") and not log.exists()


# ---------------------------------------------------------------------------- target label

@pytest.mark.parametrize("target, public", [
    ("/srv/backup/vm.raw", "/srv/backup/vm.raw"),
    ("nbd://backup:10809/vm", "nbd://backup:10809/vm"),
    ("nbds://user:secret@backup:10809/vm?tls-certificates=/etc/pki/x&tls-hostname=b",
     "nbds://backup:10809/vm"),
    ("nbd+unix:///vm?socket=/run/nbd.sock&tls-certificates=/k", "nbd+unix:///vm?socket=/run/nbd.sock"),
    ("nbd://[::1]:10809/vm", "nbd://[::1]:10809/vm"),
    ("nbd://user:pw@host:notaport/x", "nbd://?"),
])
def test_target_label_has_no_credentials(target: str, public: str) -> None:
    assert public_target(target) == public


# ---------------------------------------------------------------------------- request counters

def test_a_duration_lands_in_the_first_bucket_whose_bound_is_not_below_it() -> None:
    def slot(ns: int) -> int:
        return SLOT_OF[(ns - 1).bit_length()]

    assert BOUNDS_NS[0] == 8192 and BOUNDS_NS[-1] == 1 << 33
    for ns in (0, 1, 8191, 8192, 8193, 10_000, 1_000_000, (1 << 33) - 1, 1 << 33, (1 << 33) + 1, 1 << 62):
        expected = next((i for i, bound in enumerate(BOUNDS_NS) if ns <= bound), len(BOUNDS_NS))
        assert slot(ns) == expected, ns


async def test_timed_guard_counts_and_buckets_every_request(caplog: pytest.LogCaptureFixture) -> None:
    stats = RequestStats()

    async def handler(delay: float, error: Exception | None) -> str:
        await trio.sleep(delay)
        if error is not None:
            raise error
        return "reply"

    timed = _guard(handler, stats.timing("read"))
    assert await timed(0, None) == "reply"
    assert await timed(0.05, None) == "reply"
    with pytest.raises(FUSEError) as failed:
        await timed(0, OSError(errno.ENOSPC, "full"))
    assert failed.value.errno == errno.ENOSPC
    with pytest.raises(FUSEError) as bug, caplog.at_level(logging.ERROR):
        await timed(0, KeyError("bug"))
    assert bug.value.errno == errno.EIO and "BUG in FUSE handler handler" in caplog.text
    op = stats.snapshot()["read"]
    assert op.count == 4 and len(op.buckets) == len(BUCKET_BOUNDS) + 1
    slow = sum(count for bound, count in zip((*BUCKET_BOUNDS, float("inf")), op.buckets) if bound >= 0.05)
    assert slow >= 1 and 0.05 <= op.sum_ns / 1e9 < 10


async def test_time_requests_routes_every_request_type(tmp_path: Path) -> None:
    ops = Operations(str(tmp_path))
    stats = RequestStats()
    ops.time_requests(stats)
    await ops.getattr(ROOT_INODE)
    await ops.statfs(None)
    snap = stats.snapshot()
    assert snap["getattr"].count == 1 and snap["statfs"].count == 1 and snap["write"].count == 0
    assert {"lookup", "read", "write", "create", "fsync", "getxattr", "readdir"} <= set(snap)
    # A mount without --metrics keeps the class's handlers: nothing in between.
    assert "read" not in vars(Operations(str(tmp_path)))


# ---------------------------------------------------------------------------- collector

def _job(**extra: Any) -> dict[str, Any]:
    return {"device": "j1", "__org.mirrorfs_image": "d/vm.raw", "target": "nbd://u:p@h:1/e?tls-hostname=x",
            "len": 100, "offset": 40, "dirty-bytes": 60, "io-status": "nospace", "status": "paused",
            "ready": False, "paused": True, "__org.mirrorfs_target-connected": False,
            "__org.mirrorfs_copied-bytes": 7, **extra}


def test_collector_exposes_job_fields_and_state_sets() -> None:
    registry = CollectorRegistry()
    snap = MountSnapshot("/src", "/mnt", [_job(error="boom")], RequestStats().snapshot())
    registry.register(MountCollector(lambda: snap, BUCKET_BOUNDS, "9.9"))
    got = samples(generate_latest(registry).decode())
    labels = {("image", "d/vm.raw"), ("job_id", "j1"), ("target", "nbd://h:1/e")}
    assert got[("mirrorfs_job_dirty_bytes", frozenset(labels))] == 60
    assert got[("mirrorfs_job_copied_bytes_total", frozenset(labels))] == 7
    assert got[("mirrorfs_job_target_connected", frozenset(labels))] == 0
    assert got[("mirrorfs_job_failed", frozenset(labels))] == 1
    assert got[("mirrorfs_job_io_status", frozenset(labels | {("io_status", "nospace")}))] == 1
    assert got[("mirrorfs_job_io_status", frozenset(labels | {("io_status", "ok")}))] == 0
    assert got[("mirrorfs_job_status", frozenset(labels | {("status", "paused")}))] == 1
    # A field the job does not report is left out, not invented.
    assert not [k for k in got if k[0] == "mirrorfs_job_reconnects_total"]
    assert got[("mirrorfs_scrape_errors_total", frozenset())] == 0


@pytest.mark.parametrize("error, level, text", [
    (ScrapeError("the mount has stopped"), logging.WARNING, "the mount has stopped"),
    (KeyError("bug"), logging.ERROR, "BUG while collecting metrics"),
])
def test_collection_errors_are_logged_and_contained(error: Exception, level: int, text: str,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    def snapshot() -> MountSnapshot:
        raise error

    registry = CollectorRegistry()
    registry.register(MountCollector(snapshot, BUCKET_BOUNDS, "9.9"))
    with caplog.at_level(logging.WARNING, logger="mirrorfs.metrics"):
        first = samples(generate_latest(registry).decode())
        second = samples(generate_latest(registry).decode())
    assert first[("mirrorfs_scrape_errors_total", frozenset())] == 1
    assert second[("mirrorfs_scrape_errors_total", frozenset())] == 2
    assert not [k for k in second if k[0].startswith("mirrorfs_job")]
    assert [r for r in caplog.records if r.levelno == level and text in r.getMessage()]


async def test_server_takes_snapshots_on_the_trio_thread_and_contains_failures(
        caplog: pytest.LogCaptureFixture) -> None:
    threads: list[threading.Thread] = []

    def take() -> MountSnapshot:
        threads.append(threading.current_thread())
        if len(threads) == 2:
            raise RuntimeError("bug in the snapshot")
        return MountSnapshot("/src", "/mnt", [_job()], RequestStats().snapshot())

    port = free_port()
    server = MetricsServer(("127.0.0.1", port), take, RequestStats())
    server.start()
    try:
        with caplog.at_level(logging.ERROR, logger="mirrorfs.metrics"):
            texts = [samples(await trio.to_thread.run_sync(scrape, port)) for _ in range(3)]
    finally:
        await server.aclose()
    assert threads == [threading.current_thread()] * 3  # the trio thread, never the server's
    ok = ("mirrorfs_job_dirty_bytes", frozenset({("image", "d/vm.raw"), ("job_id", "j1"), ("target", "nbd://h:1/e")}))
    assert texts[0][ok] == 60 and ok not in texts[1] and texts[2][ok] == 60
    assert [t[("mirrorfs_scrape_errors_total", frozenset())] for t in texts] == [0, 1, 1]
    assert "BUG while collecting metrics" in caplog.text
    with pytest.raises(OSError):
        scrape(port)  # stopped with the mount


# ---------------------------------------------------------------------------- a real mount

def _write(path: Path, count: int) -> None:
    subprocess.run(["dd", "if=/dev/urandom", f"of={path}", "bs=64k", f"count={count}", "conv=notrunc",
                    "status=none"], check=True, timeout=60)


def _paused_job(mount: Mount, image: str, target: Path) -> dict[str, Any]:
    """A job on ``image`` paused at once (with a speed limit meanwhile): its values hold still."""
    mount.cli("mirror", mount.mountpoint, image, target, "--create", "--speed", "1M", "--buf-size", "256K")
    mount.cli("pause", mount.mountpoint, image)
    time.sleep(0.3)  # the measured rate decays only while time passes; let it settle a little
    return _status(mount)[0]


def _status(mount: Mount) -> list[dict[str, Any]]:
    return json.loads(mount.cli("status", mount.mountpoint, "--json").stdout)


def test_port_in_use_is_refused_and_nothing_is_mounted(mount_factory: Any, tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "mnt").mkdir()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        mount = Mount(tmp_path / "src", tmp_path / "mnt", tmp_path / "mount.log")
        r = mount.cli("mount", mount.source, mount.mountpoint, "--metrics", f"127.0.0.1:{port}", check=False)
    assert r.returncode == 2, r.stderr
    assert r.stderr.count("\n") == 1
    assert f"--metrics 127.0.0.1:{port}: the port is in use; choose another port" in r.stderr
    assert not is_mounted(mount.mountpoint)
    deadline = time.monotonic() + 10
    while daemon_pids(mount.mountpoint) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not daemon_pids(mount.mountpoint)


def test_scrape_matches_status_and_counts_requests(mount_factory: Any, tmp_path: Path) -> None:
    port = free_port()
    mount = mount_factory(extra_args=["-o", f"metrics=127.0.0.1:{port}"])
    image = mount.mountpoint / "vm.raw"
    image.write_bytes(b"\0" * (8 * MiB))

    # Scrapes while the mount serves writes: neither disturbs the other.
    scraped: list[str] = []
    stop = threading.Event()

    def scraper() -> None:
        while not stop.is_set():
            scraped.append(scrape(port))

    thread = threading.Thread(target=scraper)
    thread.start()
    try:
        _write(image, 64)
    finally:
        stop.set()
        thread.join(30)
    assert scraped and all("mirrorfs_fuse_requests_total" in text for text in scraped)

    entry = _paused_job(mount, "vm.raw", tmp_path / "target.raw")
    labels = frozenset({("image", "vm.raw"), ("job_id", "vm.raw"), ("target", str(tmp_path / "target.raw"))})
    got = samples(scrape(port))
    age = "__org.mirrorfs_recovery-point-age"  # a paused job falls behind as time passes
    assert {**entry, age: 0} == {**_status(mount)[0], age: 0}, "the job moved while paused"
    assert 0 < entry[age] <= got[("mirrorfs_job_recovery_point_age_seconds", labels)] < entry[age] + 30
    for metric, field in [("mirrorfs_job_dirty_bytes", "dirty-bytes"), ("mirrorfs_job_length_bytes", "len"),
                          ("mirrorfs_job_offset_bytes", "offset"), ("mirrorfs_job_speed_limit_bytes_per_second", "speed"),
                          ("mirrorfs_job_copied_bytes_total", "__org.mirrorfs_copied-bytes"),
                          ("mirrorfs_job_zeroed_bytes_total", "__org.mirrorfs_zeroed-bytes"),
                          ("mirrorfs_job_duplicated_bytes_total", "__org.mirrorfs_duplicated-bytes"),
                          ("mirrorfs_job_conflicts_total", "__org.mirrorfs_conflicts"),
                          ("mirrorfs_job_reconnects_total", "__org.mirrorfs_reconnects"),
                          ("mirrorfs_job_outages_total", "__org.mirrorfs_outages"),
                          ("mirrorfs_job_bytes_behind", "__org.mirrorfs_bytes-behind"),
                          ("mirrorfs_job_target_connected", "__org.mirrorfs_target-connected"),
                          ("mirrorfs_job_paused", "paused"), ("mirrorfs_job_ready", "ready")]:
        assert got[(metric, labels)] == float(entry[field]), metric
    assert 0 < entry["dirty-bytes"] < entry["len"]
    assert got[("mirrorfs_job_status", labels | {("status", "paused")})] == 1
    assert got[("mirrorfs_job_io_status", labels | {("io_status", "ok")})] == 1

    writes = got[("mirrorfs_fuse_requests_total", frozenset({("operation", "write")}))]
    assert writes >= 64 + 8  # dd's 64 writes, and the image's creation (writes of at most 1M)
    for op in ("write", "getattr", "lookup", "open"):
        op_labels = frozenset({("operation", op)})
        count = got[("mirrorfs_fuse_request_duration_seconds_count", op_labels)]
        assert count == got[("mirrorfs_fuse_requests_total", op_labels)] > 0, op
        assert got[("mirrorfs_fuse_request_duration_seconds_bucket", op_labels | {("le", "+Inf")})] == count
        assert 0 < got[("mirrorfs_fuse_request_duration_seconds_sum", op_labels)] < count
    assert got[("mirrorfs_mount_info", frozenset({("source_dir", str(mount.source)),
                                                  ("mountpoint", str(mount.mountpoint)),
                                                  ("version", __import__("mirrorfs").__version__)}))] == 1
    assert got[("mirrorfs_scrape_errors_total", frozenset())] == 0


# ---------------------------------------------------------------------------- a real Prometheus

PROMETHEUS = shutil.which("prometheus")
PROMTOOL = shutil.which("promtool")


@contextlib.contextmanager
def prometheus_server(tmp_path: Path, scrape_port: int, rules: Path) -> Iterator[str]:
    """A Prometheus scraping 127.0.0.1:scrape_port every second; yields its base URL."""
    web = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(f"""\
global:
  scrape_interval: 1s
  evaluation_interval: 1s
rule_files:
  - {rules}
scrape_configs:
  - job_name: mirrorfs
    static_configs:
      - targets: ["127.0.0.1:{scrape_port}"]
""")
    log = (tmp_path / "prometheus.log").open("wb")
    proc = subprocess.Popen([PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                             f"--web.listen-address=127.0.0.1:{web}"], stdout=log, stderr=subprocess.STDOUT)
    try:
        yield f"http://127.0.0.1:{web}"
    finally:
        stop_process(proc, 20)
        log.close()


def prometheus_api(base: str, path: str, **params: str) -> Any:
    url = f"{base}/api/v1/{path}" + (f"?{urllib.parse.urlencode(params)}" if params else "")
    with urllib.request.urlopen(url, timeout=10) as reply:
        body = json.load(reply)
    assert body["status"] == "success", body
    return body["data"]


def wait_for_api(base: str, path: str, predicate: Any, timeout: float, **params: str) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = prometheus_api(base, path, **params)
            if predicate(last):
                return last
        except OSError as exc:  # not listening yet
            last = exc
        time.sleep(0.25)
    raise AssertionError(f"Prometheus {path} {params}: gave {last!r} for {timeout:.0f} s")


@pytest.mark.skipif(PROMETHEUS is None, reason="prometheus is not installed (./scripts/setup installs it)")
def test_prometheus_reads_a_jobs_dirty_bytes_as_status_shows_them(mount_factory: Any, tmp_path: Path) -> None:
    port = free_port()
    mount = mount_factory(extra_args=["--metrics", f"127.0.0.1:{port}"])
    (mount.mountpoint / "vm.raw").write_bytes(b"\0" * (16 * MiB))
    _write(mount.mountpoint / "vm.raw", 128)
    entry = _paused_job(mount, "vm.raw", tmp_path / "target.raw")
    assert entry["dirty-bytes"] > 0 and entry["paused"]

    query = 'mirrorfs_job_dirty_bytes{image="vm.raw", job_id="vm.raw"}'
    with prometheus_server(tmp_path, port, ROOT / "docs" / "mirrorfs-alerts.yml") as base:
        data = wait_for_api(base, "query", lambda d: d["result"], 60, query=query)
        [series] = data["result"]
        assert float(series["value"][1]) == _status(mount)[0]["dirty-bytes"] == entry["dirty-bytes"]
        assert series["metric"]["job"] == "mirrorfs" and series["metric"]["target"] == str(tmp_path / "target.raw")
        up = prometheus_api(base, "query", query=f'up{{instance="127.0.0.1:{port}"}}')["result"]
        assert up and up[0]["value"][1] == "1"
        # The example rules load and evaluate against the real series; nothing fires for a
        # healthy paused job.
        rules = wait_for_api(base, "rules", lambda d: all(r.get("lastEvaluation", "").startswith("2")
                                                          and not r["lastEvaluation"].startswith("0001")
                                                          for g in d["groups"] for r in g["rules"]), 30)
        names = {r["name"]: r for g in rules["groups"] for r in g["rules"]}
        assert {"MirrorfsJobFailed", "MirrorfsTargetLost", "MirrorfsLagHigh"} <= set(names)
        assert all(r["health"] == "ok" and r["state"] == "inactive" for r in names.values()), names


@pytest.mark.skipif(PROMTOOL is None, reason="promtool is not installed (Debian package prometheus)")
def test_example_alert_rules_and_scrape_config_are_valid(tmp_path: Path) -> None:
    rules = ROOT / "docs" / "mirrorfs-alerts.yml"
    r = subprocess.run([PROMTOOL, "check", "rules", str(rules)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "SUCCESS: 4 rules found" in r.stdout, r.stdout + r.stderr
    doc = (ROOT / "docs" / "monitoring.md").read_text()
    [config] = [block for block in re.findall(r"```yaml\n(.*?)```", doc, re.S) if "scrape_configs" in block]
    (tmp_path / "prometheus.yml").write_text(config)
    shutil.copy(rules, tmp_path / "mirrorfs-alerts.yml")
    r = subprocess.run([PROMTOOL, "check", "config", str(tmp_path / "prometheus.yml")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "SUCCESS: 1 rule files found" in r.stdout, r.stdout + r.stderr
    for name in re.findall(r"\| `(Mirrorfs\w+)` \|", doc):
        assert f"alert: {name}\n" in rules.read_text()


# ---------------------------------------------------------------------------- NBD target states

def _job_sample(port: int, metric: str, **extra: str) -> tuple[float, dict[str, Any]]:
    """(the value of ``metric`` for the only job, that job's labels)."""
    [(labels, value)] = [(dict(k[1]), v) for k, v in samples(scrape(port)).items()
                         if k[0] == metric and all(dict(k[1]).get(n) == x for n, x in extra.items())]
    return value, labels


@contextlib.contextmanager
def ready_nbd_job(mount_factory: Any, tmp_path: Path) -> Iterator[tuple[Mount, int, Any, Any, Path]]:
    """A mount with --metrics whose 4 MiB ``vm.raw`` has a ready job to a qemu-nbd export:
    yields (mount, metrics port, server, QMP client, served file)."""
    port = free_port()
    mount = mount_factory(extra_args=["--metrics", f"127.0.0.1:{port}"])
    mount.allow_log(r"WARNING")  # a lost target is logged as a warning, by design
    make_image(mount.source / "vm.raw", 4 * MiB)
    served = tmp_path / "served.raw"
    make_blank(served, 4 * MiB)
    with qemu_nbd(served, transport="unix") as server:
        try:
            with qmp(mount) as client:
                mount.cli("mirror", mount.mountpoint, "vm.raw", server.uri)
                wait_ready(client, "vm.raw")
                yield mount, port, server, client, served
        finally:
            mount.unmount()


def _lose_target(mount: Mount, client: Any) -> None:
    with open(mount.mountpoint / "vm.raw", "r+b", buffering=0) as f:
        f.write(b"x" * 4096)  # noticed at this write's duplicate
    wait_job(client, "vm.raw", lambda j: not j["__org.mirrorfs_target-connected"], 15, "the loss")


def test_lost_and_restored_target_shows_in_connected_and_reconnects(mount_factory: Any, tmp_path: Path) -> None:
    with ready_nbd_job(mount_factory, tmp_path) as (mount, port, server, client, _):
        assert _job_sample(port, "mirrorfs_job_target_connected") == (
            1, {"image": "vm.raw", "job_id": "vm.raw", "target": server.uri})
        server.kill()
        _lose_target(mount, client)
        assert _job_sample(port, "mirrorfs_job_target_connected")[0] == 0
        assert _job_sample(port, "mirrorfs_job_reconnects_total")[0] == 0
        server.start()
        job = wait_ready(client, "vm.raw", timeout=60)
        assert job["__org.mirrorfs_reconnects"] == 1, job
        assert _job_sample(port, "mirrorfs_job_target_connected")[0] == 1
        assert _job_sample(port, "mirrorfs_job_reconnects_total")[0] == 1


def test_a_failed_job_shows_as_failed_with_its_io_status(mount_factory: Any, tmp_path: Path) -> None:
    with ready_nbd_job(mount_factory, tmp_path) as (mount, port, server, client, served):
        assert _job_sample(port, "mirrorfs_job_failed")[0] == 0
        server.kill()
        with open(served, "r+b") as f:
            f.truncate(5 * MiB)  # the far side now serves another disk: the job must fail
        _lose_target(mount, client)
        server.start()
        job = wait_job(client, "vm.raw", lambda j: j["status"] == "concluded", 30, "the job to fail")
        assert job["error"] and job["io-status"] == "failed"
        assert _job_sample(port, "mirrorfs_job_failed")[0] == 1
        assert _job_sample(port, "mirrorfs_job_io_status", io_status="failed")[0] == 1
        assert _job_sample(port, "mirrorfs_job_status", status="concluded")[0] == 1


def test_hostile_scrapers_neither_block_the_mount_nor_the_next_scrape(mount_factory: Any) -> None:
    """Clients of the metrics port are anyone who reaches it: idle connections that never send,
    a request sent a byte at a time and abandoned, garbage request lines, a reader that closes
    mid-response. None of them may hold the mount's requests or the next honest scrape, and the
    mount's log stays free of tracebacks."""
    port = free_port()
    mount = mount_factory(extra_args=["-o", f"metrics=127.0.0.1:{port}"])
    image = mount.mountpoint / "io.raw"
    image.write_bytes(b"\1" * MiB)
    hostile: list[socket.socket] = []
    try:
        for _ in range(20):  # idle: connected, never a byte
            hostile.append(socket.create_connection(("127.0.0.1", port), timeout=5))
        slow = socket.create_connection(("127.0.0.1", port), timeout=5)
        slow.sendall(b"GET /met")  # half a request line, then nothing
        hostile.append(slow)
        for junk in (b"\xff\xfe\x00garbage\r\n\r\n", b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n",
                     b"POST /metrics HTTP/1.1\r\nContent-Length: 99999999\r\n\r\nabc",
                     b"GET /metrics HTTP/1.1\r\nHost: x\r\n" + b"X: y\r\n" * 200 + b"\r\n"):
            with socket.create_connection(("127.0.0.1", port), timeout=5) as bad:
                bad.sendall(junk)
                with contextlib.suppress(OSError):
                    bad.recv(100)
        for _ in range(5):  # asks, reads a little, goes away
            with socket.create_connection(("127.0.0.1", port), timeout=5) as rude:
                rude.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
                with contextlib.suppress(OSError):
                    rude.recv(10)
        start = time.monotonic()
        data = b"\2" * 65536
        with open(image, "r+b", buffering=0) as f:
            for i in range(16):
                f.seek(i * 65536)
                f.write(data)
        assert image.read_bytes()[: 16 * 65536] == data * 16
        text = scrape(port)
        assert "mirrorfs_fuse_requests_total" in text
        assert time.monotonic() - start < 10, "hostile scrapers held the mount or the scrape"
    finally:
        for s in hostile:
            s.close()
