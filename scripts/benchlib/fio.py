"""The fio workloads of the benchmark and one fio run, always with O_DIRECT."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from benchlib.procs import BenchError, run


@dataclass(frozen=True)
class Workload:
    args: tuple[str, ...]
    metric: str  # "MB/s" or "IOPS"
    label: str

    @property
    def side(self) -> str:
        return "read" if "read" in self.args[0] else "write"


WORKLOADS: dict[str, Workload] = {
    "seq-write-1M": Workload(("--rw=write", "--bs=1M", "--ioengine=psync", "--iodepth=1"), "MB/s",
                             "seq write 1M"),
    "seq-read-1M": Workload(("--rw=read", "--bs=1M", "--ioengine=psync", "--iodepth=1"), "MB/s", "seq read 1M"),
    "rand-write-4k-qd1": Workload(("--rw=randwrite", "--bs=4k", "--ioengine=psync", "--iodepth=1"), "IOPS",
                                  "rand write 4k, QD1"),
    "rand-write-4k-qd16": Workload(("--rw=randwrite", "--bs=4k", "--ioengine=libaio", "--iodepth=16"), "IOPS",
                                   "rand write 4k, QD16 (libaio)"),
    "rand-read-4k-qd1": Workload(("--rw=randread", "--bs=4k", "--ioengine=psync", "--iodepth=1"), "IOPS",
                                 "rand read 4k, QD1"),
}


@dataclass(frozen=True)
class FioResult:
    value: float  # in the workload's metric (MB/s with 1 MB = 10^6 bytes, or IOPS)
    requests: int  # requests fio completed


def fio_argv(path: Path, workload: str, size: int, runtime: float) -> list[str]:
    return ["fio", "--name=bench", f"--filename={path}", f"--size={size}", "--direct=1", "--time_based",
            f"--runtime={round(runtime * 1000)}ms", "--randrepeat=0", "--norandommap", "--invalidate=0",
            "--output-format=json", *WORKLOADS[workload].args]


def run_fio(path: Path, workload: str, size: int, runtime: float) -> FioResult:
    proc = run(fio_argv(path, workload, size, runtime), timeout=runtime + 120)
    out = json.loads(proc.stdout[proc.stdout.index("{"):])
    job = out["jobs"][0]
    if job["error"]:
        raise BenchError(f"fio {workload} on {path}: error {job['error']}")
    wl = WORKLOADS[workload]
    side = job[wl.side]
    value = side["bw_bytes"] / 1e6 if wl.metric == "MB/s" else side["iops"]
    return FioResult(value, int(side["total_ios"]))
