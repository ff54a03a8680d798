"""Every CLI command against a real mount and the real engine (issue 5, "Done when" 5).

Each command is run as a user runs it (the real CLI in a subprocess) for its success and for its
documented failure: exit 0 done, 1 refused by the state, 2 bad input; every failure is exactly one
line on stderr, prefixed ``mirrorfs COMMAND:``, never a traceback. Effects are checked in
``.mirrorfs/status.json`` and in the bytes of the source and target files.
(The CLI client's own unit tests against a fake QMP handler are ``tests/test_cli_client.py``.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any


from mounting import Mount, mirrorfs_argv, mirrorfs_cli, random_image, wait_for



def jobs(mount: Mount) -> dict[str, dict[str, Any]]:
    return {j["device"]: j for j in json.loads((mount.control / "status.json").read_text())}


def wait_ready(mount: Mount, device: str, timeout: float = 60.0) -> None:
    wait_for(lambda: jobs(mount).get(device, {}).get("ready", False), timeout, f"{device} ready", 0.05)


def ok(mount: Mount, *args: Any) -> str:
    """Run the CLI; it must succeed quietly on stderr. Returns stdout."""
    r = mount.cli(*args, check=False)
    assert r.returncode == 0 and r.stderr == "", (args, r.returncode, r.stderr)
    return r.stdout


def fails(mount: Mount | None, code: int, message: str, *args: Any) -> None:
    """Run the CLI; it must exit ``code`` with one stderr line holding ``message``."""
    r = (mount.cli(*args, check=False) if mount is not None else mirrorfs_cli(*args, check=False))
    command = str(args[0]) if args[0] != "bitmap" else "bitmap inspect"
    assert r.returncode == code, (args, r.returncode, r.stderr)
    assert r.stderr.count("\n") == 1 and r.stderr.startswith(f"mirrorfs {command}: "), (args, r.stderr)
    assert message in r.stderr, (args, message, r.stderr)


def test_mirror_pause_resume_set_speed_complete_no_pivot(mounted: Mount, tmp_path: Path) -> None:
    m = mounted.mountpoint
    data = random_image(mounted, "a.img")
    target = tmp_path / "a-target.img"
    out = ok(mounted, "mirror", m, "a.img", target, "--create", "--speed", "64K", "--buf-size", "256K",
             "--granularity", "64K", "--copy-mode", "write-blocking", "--on-target-error", "stop",
             "--job-id", "ja")
    assert out.startswith(f"mirroring a.img to {target} (job ja)")
    j = jobs(mounted)["ja"]
    assert (j["target"], j["speed"], j["copy-mode"], j["ready"]) == (str(target), 64 << 10, "write-blocking", False)

    # mirror: refused (the job id is taken: 1); bad input (unknown image, malformed size,
    # missing target without --create, image leaving the mount: 2).
    fails(mounted, 1, "job id 'ja' is in use", "mirror", m, "a.img", tmp_path / "other.img", "--create",
          "--job-id", "ja")
    fails(mounted, 2, "is already the target of job 'ja'", "mirror", m, "a.img", target,
          "--job-id", "jb")
    fails(mounted, 2, "nope.img", "mirror", m, "nope.img", tmp_path / "other.img", "--create")
    fails(mounted, 2, "granularity", "mirror", m, "a.img", tmp_path / "other.img", "--granularity", "3K")
    fails(mounted, 2, "leaves the mount", "mirror", m, "../a.img", tmp_path / "other.img", "--create")
    fails(mounted, 2, "--bitmap", "mirror", m, "a.img", tmp_path / "other.img", "--sync", "dirty")
    assert not (tmp_path / "other.img").exists()

    # complete before ready: refused, both forms; the job carries on.
    fails(mounted, 1, "'ja' cannot be completed: it is not ready yet", "complete", m, "ja")
    fails(mounted, 1, "'ja' cannot be completed: it is not ready yet", "complete", m, "ja", "--no-pivot")
    fails(mounted, 2, "no mirror job 'nope.img'", "complete", m, "nope.img")
    fails(mounted, 2, "no mirror job 'nope.img'", "complete", m, "nope.img", "--no-pivot")

    assert ok(mounted, "pause", m, "ja") == "paused ja\n"
    wait_for(lambda: jobs(mounted)["ja"]["status"] in ("paused", "standby"), 30, "paused")
    assert jobs(mounted)["ja"]["paused"] is True
    fails(mounted, 1, "paused", "complete", m, "ja")
    fails(mounted, 2, "no mirror job 'nope.img'", "pause", m, "nope.img")
    assert ok(mounted, "resume", m, "ja") == "resumed ja\n"
    assert jobs(mounted)["ja"]["paused"] is False
    fails(mounted, 2, "no mirror job 'nope.img'", "resume", m, "nope.img")

    assert ok(mounted, "set-speed", m, "ja", "1M").startswith("ja: speed limit")
    assert jobs(mounted)["ja"]["speed"] == 1 << 20
    fails(mounted, 2, "fast", "set-speed", m, "ja", "fast")
    fails(mounted, 2, "no mirror job 'nope.img'", "set-speed", m, "nope.img", "1M")
    assert jobs(mounted)["ja"]["speed"] == 1 << 20
    assert ok(mounted, "set-speed", m, "ja", "0") == "ja: speed limit none\n"
    assert jobs(mounted)["ja"]["speed"] == 0

    wait_ready(mounted, "ja")
    out = ok(mounted, "complete", m, "ja", "--no-pivot")
    assert out == "completed ja: the target is an exact copy, the mount stays on the source\n"
    assert jobs(mounted) == {}
    assert target.read_bytes() == data
    fails(mounted, 2, "no mirror job 'ja'", "complete", m, "ja", "--no-pivot")


def test_complete_with_pivot_cancel_and_cancel_force(mounted: Mount, tmp_path: Path) -> None:
    m = mounted.mountpoint
    data = random_image(mounted, "a.img")
    random_image(mounted, "b.img")
    ta, tb = tmp_path / "ta.img", tmp_path / "tb.img"

    # cancel after ready: an exact copy, the mount stays on the source.
    ok(mounted, "mirror", m, "a.img", ta, "--create")
    wait_ready(mounted, "a.img")
    assert ok(mounted, "cancel", m, "a.img") == "cancelled a.img after ready: the target is an exact copy\n"
    assert ta.read_bytes() == data and jobs(mounted) == {}
    fails(mounted, 2, "no mirror job 'a.img'", "cancel", m, "a.img")
    fails(mounted, 2, "no mirror job 'a.img'", "cancel", m, "a.img", "--force")
    fails(mounted, 2, "given twice", "cancel", m, "a.img", "a.img")

    # cancel --force before ready.
    ok(mounted, "mirror", m, "b.img", tb, "--create", "--speed", "64K", "--buf-size", "256K")
    assert not jobs(mounted)["b.img"]["ready"]
    assert ok(mounted, "cancel", m, "b.img", "--force") == "cancelled b.img\n"
    assert jobs(mounted) == {}

    # complete (pivot): the mount serves the target from then on.
    ok(mounted, "mirror", m, "a.img", ta)  # the existing target: no --create needed
    wait_ready(mounted, "a.img")
    assert ok(mounted, "complete", m, "a.img") == "completed a.img: the mount now serves the target\n"
    assert jobs(mounted) == {}
    with open(m / "a.img", "r+b") as f:
        f.write(b"pivoted")
    assert ta.read_bytes()[:7] == b"pivoted" and (mounted.source / "a.img").read_bytes() == data
    fails(mounted, 2, "no mirror job 'a.img'", "complete", m, "a.img")


def test_status_qmp_and_their_failures(mounted: Mount, tmp_path: Path) -> None:
    m = mounted.mountpoint
    assert ok(mounted, "status", m) == "no jobs\n"
    assert json.loads(ok(mounted, "status", m, "--json")) == []
    random_image(mounted, "a.img")
    ok(mounted, "mirror", m, "a.img", tmp_path / "t.img", "--create", "--sync", "none")
    wait_ready(mounted, "a.img")
    table = ok(mounted, "status", m)
    assert table.splitlines()[1].split()[:3] == ["a.img", "a.img", "ready"] and str(tmp_path / "t.img") in table
    [j] = json.loads(ok(mounted, "status", m, "--json"))
    assert (j["device"], j["ready"], j["type"], j["target"]) == ("a.img", True, "mirror", str(tmp_path / "t.img"))
    (tmp_path / "plain").mkdir()
    fails(None, 2, "no mirrorfs mount serves", "status", tmp_path / "plain")
    fails(None, 2, "no mirrorfs mount serves", "status", tmp_path / "plain", "--json")
    fails(None, 2, "is not a directory", "status", tmp_path / "missing")

    # qmp with a JSON command: the reply on stdout, exit 0 for a return, 1 for an error.
    r = mounted.cli("qmp", m, '{"execute": "query-block-jobs"}', check=False)
    assert r.returncode == 0 and r.stderr == ""
    [j] = json.loads(r.stdout)["return"]
    assert j["device"] == "a.img" and j["ready"] is True
    r = mounted.cli("qmp", m, '{"execute": "block-job-pause", "arguments": {"device": "nope"}}', check=False)
    assert r.returncode == 1
    assert json.loads(r.stdout)["error"]["class"] == "DeviceNotActive"
    r = mounted.cli("qmp", m, '{"execute": "no-such-command"}', check=False)
    assert r.returncode == 1 and json.loads(r.stdout)["error"]["class"] == "CommandNotFound"
    fails(mounted, 2, "invalid JSON", "qmp", m, '{"execute": ')
    fails(mounted, 2, "must be a JSON object", "qmp", m, '["query-block-jobs"]')
    # The interactive form, fed from a pipe.
    r = mounted.cli("qmp", m, input='query-block-jobs\n{"execute": "query-version"}\n', check=False)
    assert r.returncode == 0, r.stderr
    replies = [json.loads(ln) for ln in r.stdout.splitlines() if ln.startswith("{")]
    assert replies[0]["return"][0]["device"] == "a.img" and "qemu" in replies[1]["return"]
    assert jobs(mounted)["a.img"]["ready"] is True  # nothing of the above changed the job
    ok(mounted, "cancel", m, "a.img")


def test_bitmap_inspect_clean_dirty_and_invalid(mounted: Mount, tmp_path: Path) -> None:
    m = mounted.mountpoint
    data = random_image(mounted, "a.img")
    bitmap, target = tmp_path / "a.bitmap", tmp_path / "a-target.img"
    ok(mounted, "mirror", m, "a.img", target, "--create", "--bitmap", bitmap)
    wait_ready(mounted, "a.img")
    out = ok(mounted, "bitmap", "inspect", bitmap)  # a ready job with nothing dirty
    assert "clean: the target is identical to the source" in out
    info = json.loads(ok(mounted, "bitmap", "inspect", bitmap, "--json"))
    assert info["dirty-bytes"] == 0 and info["exit-code"] == 0
    ok(mounted, "complete", m, "a.img", "--no-pivot")
    assert target.read_bytes() == data
    # Completed: identical then, but no longer recording writes (exit 1).
    r = mounted.cli("bitmap", "inspect", bitmap, check=False)
    assert r.returncode == 1 and "ended: its job ended at" in r.stdout, (r.returncode, r.stdout, r.stderr)

    # Interrupted before ready: the file says what is left to do (exit 1).
    dirty_bitmap = tmp_path / "b.bitmap"
    ok(mounted, "mirror", m, "a.img", tmp_path / "b-target.img", "--create", "--bitmap", dirty_bitmap,
       "--speed", "64K", "--buf-size", "256K")
    ok(mounted, "cancel", m, "a.img", "--force")
    r = mounted.cli("bitmap", "inspect", dirty_bitmap, check=False)
    assert r.returncode == 1 and "bytes differed then" in r.stdout and r.stderr == "", (r.returncode, r.stdout, r.stderr)
    info = json.loads(mounted.cli("bitmap", "inspect", dirty_bitmap, "--json", check=False).stdout)
    assert 0 < info["dirty-bytes"] <= len(data)

    # Not a bitmap, truncated, missing: invalid (exit 2), never read as clean.
    junk = tmp_path / "junk.bitmap"
    junk.write_bytes(os.urandom(4096))
    fails(mounted, 2, "", "bitmap", "inspect", junk)
    cut = tmp_path / "cut.bitmap"
    cut.write_bytes(bitmap.read_bytes()[:20])
    fails(mounted, 2, "", "bitmap", "inspect", cut)
    fails(mounted, 2, "", "bitmap", "inspect", tmp_path / "missing.bitmap")


def test_a_cli_refusal_leaves_no_traceback_and_the_console_script_agrees(mounted: Mount) -> None:
    """The installed console script (not ``python -m``) gives the same one-line answer."""
    # The script pip installed next to the interpreter that runs the tests.
    exe = Path(sys.executable).parent / "mirrorfs"
    assert exe.exists(), f"no console script at {exe}: install the package (pip install -e .)"
    r = subprocess.run([str(exe), "pause", str(mounted.mountpoint), "nope.img"], capture_output=True,
                       text=True, timeout=60, env=mounted.env())
    assert r.returncode == 2 and r.stderr.startswith("mirrorfs pause: no mirror job 'nope.img'")
    assert "Traceback" not in r.stderr and r.stderr.count("\n") == 1


def test_output_into_a_closed_pipe_ends_quietly_as_sigpipe(mounted: Mount, tmp_path: Path) -> None:
    """``mirrorfs status --json | grep -q ...``: the reader may be gone before we write."""
    random_image(mounted, "p.img")
    mirrorfs_cli("mirror", mounted.mountpoint, "p.img", tmp_path / "p-target.img", "--create",
                 env=mounted.env())
    read_end, write_end = os.pipe()
    os.close(read_end)  # every write to the pipe now fails with EPIPE
    try:
        r = subprocess.run([*mirrorfs_argv(), "status", str(mounted.mountpoint), "--json"],
                           stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=60,
                           env=mounted.env())
    finally:
        os.close(write_end)
    assert r.returncode == 141, r.stderr
    assert r.stderr == ""


def test_mirror_to_a_missing_target_is_bad_input(mounted: Mount, tmp_path: Path) -> None:
    m = mounted.mountpoint
    random_image(mounted, "b.img")
    fails(mounted, 2, "does not exist; pass --create", "mirror", m, "b.img", tmp_path / "other.img")
    fails(mounted, 2, "does not exist", "mirror", m, "b.img", tmp_path / "no-dir" / "other.img", "--create")
    assert jobs(mounted) == {}
