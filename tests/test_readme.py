"""README.md's worked examples run as written (issue 7, Done when 4).

Every fenced ``sh`` block preceded by ``<!-- readme-test: NAME -->`` is extracted and run with
``bash -euo pipefail`` in an empty temporary directory, with the checkout's ``.venv/bin`` first
on ``PATH``. The only change made to a block is in ``SUBSTITUTIONS`` (booting the reader's VM
becomes a ``qemu-io`` writer); a substitution that no longer matches fails the test, so the README
and this file cannot drift apart. Each example's output must show what the README says it shows
(``EXPECT``). Whatever happens, the test kills the processes the block started (its own process
group) and unmounts what it mounted.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
from pathlib import Path

import pytest

import mounting
from mounting import is_mounted, mirrorfs_cli

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
pytestmark = [pytest.mark.fuse, pytest.mark.timeout(240)]

_BLOCK = re.compile(r"<!-- readme-test: ([\w-]+) -->\s*\n```sh\n(.*?)\n```", re.S)

#: A stand-in for the reader's VM: a background loop of qemu-io writes (O_DIRECT, as QEMU's
#: cache=none) through the mount, until killed.
QEMU_IO_WRITER = ("( i=0; while :; do qemu-io -f raw -t none -c \"write -q -P $((i % 200 + 1)) "
                  "$(( (i * 7) % 60 ))M 64k\" mnt/vm.raw; i=$((i + 1)); done ) &")

SUBSTITUTIONS: dict[str, list[tuple[str, str]]] = {
    "vm-migration": [(
        "qemu-system-x86_64 -accel kvm -m 2G -nographic "
        "-drive file=mnt/vm.raw,format=raw,if=virtio,cache=none &",
        QEMU_IO_WRITER)],
}

#: Regexes each example's output must match.
EXPECT: dict[str, list[str]] = {
    "vm-migration": [r"mirroring vm\.raw to \S+/new-storage/vm\.raw",
                     r"completed vm\.raw: the mount now serves the target", r"no jobs"],
    "nbd-replication": [r"db\.raw\s+running", r"db\.raw\s+ready", r"Images are identical\.",
                        r"clean: the target is identical to the source",
                        r"ended: its job ended at .*\n.*exit 1"],
    "control-files": [r"no jobs", r"vm\.raw\s+ready", r"refused: the job has ended",
                      r"mirror vm\.raw \S+ create=true.*ok",
                      r"complete vm\.raw pivot=false.*ok",
                      r"pause vm\.raw.*error", r"backup/vm\.raw is identical"],
    "persistent-replication": [r"db\.raw\s+running \(target away\)", r"Images are identical\."],
    "replica-and-migration": [r"dr\s+vm\.raw\s+ready.*\n.*move\s+vm\.raw\s+ready",
                              r"completed move: the mount now serves the target",
                              r"JOB.*\n+dr\s+vm\.raw\s+ready", r"Images are identical\."],
    "crash-recipe": [r"dirty: finish the interrupted job", r"Images are identical\.",
                     r"ended: its job ended at .*\n.*exit 1"],
}


def readme_blocks() -> dict[str, str]:
    """The marked ``sh`` blocks of README.md by name."""
    blocks = {m.group(1): m.group(2) for m in _BLOCK.finditer(README.read_text())}
    return blocks


def test_every_example_is_marked_and_known() -> None:
    blocks = readme_blocks()
    assert set(blocks) == set(EXPECT), f"README examples {sorted(blocks)} vs tested {sorted(EXPECT)}"
    # Every sh block in the README is a tested one.
    assert README.read_text().count("```sh") == len(blocks)


def _prepare(name: str, script: str) -> str:
    for old, new in SUBSTITUTIONS.get(name, []):
        assert script.count(old) == 1, f"README example {name!r} no longer contains: {old}"
        script = script.replace(old, new)
    return script


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(EXPECT))
def test_readme_example_runs(name: str, tmp_path: Path) -> None:
    script = _prepare(name, readme_blocks()[name])
    work = tmp_path / "w"
    work.mkdir()
    mnt = work / "mnt"
    mounting.STARTED.append((mnt, None))  # the session-end leak check covers this mount too
    env = dict(os.environ)
    env["PATH"] = f"{REPO / '.venv' / 'bin'}:{env.get('PATH', '')}"
    env["MIRRORFS_LOG_FILE"] = str(tmp_path / "mirrorfs.log")
    proc = subprocess.Popen(["bash", "-euo", "pipefail", "-c", script], cwd=work, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"README example {name!r} did not finish in 180 s:\n{out[-3000:]}")
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # background processes the block left running
        except ProcessLookupError:
            pass
        if is_mounted(mnt):
            mirrorfs_cli("unmount", mnt, check=False, env=env)
        if is_mounted(mnt):
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True)
    print(out)
    assert proc.returncode == 0, f"README example {name!r} exited {proc.returncode}:\n{out[-3000:]}"
    for pattern in EXPECT[name]:
        assert re.search(pattern, out), f"README example {name!r}: no {pattern!r} in:\n{out[-3000:]}"
    assert not is_mounted(mnt), "the example must unmount what it mounted"
