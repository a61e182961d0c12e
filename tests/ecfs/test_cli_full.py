"""Full disks as an operator meets them: every OSD directory on one small
file system (the journal elsewhere), objects put until one is refused.
Nothing acknowledged is lost, no OSD is taken out, reads go on, status
names the full OSDs, and freeing space lets writes through again."""
import os
import subprocess

import pytest

from .util import assert_user_error, ecfs, ecfs_json


@pytest.fixture
def small_fs(tmp_path):
    fs = tmp_path / "disk"
    fs.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=20m", "tmpfs", str(fs)], check=True)
    try:
        yield fs
    finally:
        subprocess.run(["umount", "-l", str(fs)], check=False)


def test_full_osds_refuse_writes_and_keep_everything_acknowledged(tmp_path, small_fs):
    st = tmp_path / "s"
    ecfs(st, "init", *[a for i in range(6) for a in ("--osd-dir", str(small_fs / f"osd{i}"))])
    stored = {}
    for i in range(40):
        blob = os.urandom(1 << 20)
        p = ecfs(st, "rados", "put", f"bobj{i}", "-", input=blob, check=False)
        if p.returncode:
            assert_user_error(p, "full")
            assert p.returncode == 28          # ENOSPC
            break
        stored[f"bobj{i}"] = blob
    else:
        pytest.fail("20 MiB took 40 MiB of objects")
    refused = f"bobj{len(stored)}"
    assert len(stored) >= 5
    status = ecfs_json(st, "status")
    assert status["health"]["status"] != "HEALTH_OK" and "full" in status["health"]["reason"]
    assert all(o["up"] for o in status["osds"]), "a full OSD was taken out"
    assert all(o["status"] in ("full", "nearfull") for o in status["osds"])
    # the refused put changed nothing; everything acknowledged reads back
    assert ecfs(st, "rados", "stat", refused, check=False).returncode == 2
    assert sorted(ecfs(st, "rados", "ls").stdout.decode().split()) == sorted(stored)
    for n, b in stored.items():
        assert ecfs(st, "rados", "get", n, "-").stdout == b
    # removals go through on a full pool; then writes do again
    for n in list(stored)[:3]:
        ecfs(st, "rados", "rm", n)
        del stored[n]
    blob = os.urandom(1 << 20)
    ecfs(st, "rados", "put", "after", "-", input=blob)
    stored["after"] = blob
    for n, b in stored.items():
        assert ecfs(st, "rados", "get", n, "-").stdout == b
