"""``query-dirty-bitmaps`` against a real mount: a job's bitmap in memory is reported as not
persistent and without a file; a ``bitmap=`` job's as persistent, with its file."""

from __future__ import annotations

from pathlib import Path

from mounting import Mount, random_image
from test_control_file import control, qmp, sock_of


def test_query_dirty_bitmaps_tells_memory_from_file(mounted: Mount, tmp_path: Path) -> None:
    random_image(mounted, "a.img")
    random_image(mounted, "b.img")
    bitmap = tmp_path / "b.bitmap"
    # slow, so that both jobs are still running when asked
    assert control(mounted, f"mirror a.img {tmp_path}/a-target.img create=true speed=64K\n") == 0
    assert control(mounted, f"mirror b.img {tmp_path}/b-target.img create=true speed=64K "
                            f"bitmap={bitmap}\n") == 0
    reply = qmp(sock_of(mounted), "query-dirty-bitmaps")
    found = {entry["device"]: entry["bitmaps"][0] for entry in reply["return"]}
    assert found["a.img"]["persistent"] is False
    assert "__org.mirrorfs_file" not in found["a.img"]
    assert found["b.img"]["persistent"] is True
    assert found["b.img"]["__org.mirrorfs_file"] == str(bitmap)
    for image in ("a.img", "b.img"):
        assert control(mounted, f"cancel {image}\n") == 0
