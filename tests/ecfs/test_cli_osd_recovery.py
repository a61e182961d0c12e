"""ecfs osd down/up as an admin uses it: writes while an OSD is away, then
'osd up' rebuilds what it missed; health tells the truth meanwhile."""
import os

from .util import ecfs, ecfs_json


def _health(store):
    return ecfs_json(store, "status")["health"]


def test_down_write_up_then_lose_two_others(tmp_path):
    st = tmp_path / "s"
    ecfs(st, "init")
    blobs = {f"o{i}": os.urandom(50_000 + i * 7000) for i in range(8)}
    for n, b in blobs.items():
        ecfs(st, "rados", "put", n, "-", input=b)
    ecfs(st, "osd", "down", "2")
    for n in ("o0", "o3", "o5"):
        blobs[n] = os.urandom(90_000)
        ecfs(st, "rados", "put", n, "-", input=blobs[n])
    ecfs(st, "rados", "rm", "o7")
    del blobs["o7"]
    h = _health(st)
    assert h["status"] != "HEALTH_OK" and "osd.2" in h["reason"]
    out = ecfs(st, "osd", "up", "2").stdout.decode()
    assert "marked up osd.2" in out
    assert _health(st)["status"] == "HEALTH_OK"
    # the returned OSD is current: any two others may go now
    ecfs(st, "osd", "down", "0")
    ecfs(st, "osd", "down", "4")
    assert sorted(ecfs(st, "rados", "ls").stdout.decode().split()) == sorted(blobs)
    for n, b in blobs.items():
        assert ecfs(st, "rados", "get", n, "-").stdout == b


def test_directory_back_without_osd_up_stays_out(tmp_path):
    st = tmp_path / "s"
    ecfs(st, "init")
    ecfs(st, "rados", "put", "x", "-", input=os.urandom(40_000))
    osd1 = st / "osd.1"
    os.rename(osd1, st / "away")
    new = os.urandom(40_000)
    ecfs(st, "rados", "put", "x", "-", input=new)
    os.rename(st / "away", osd1)
    h = _health(st)
    assert h["status"] != "HEALTH_OK" and "osd.1" in h["reason"] and "behind" in h["reason"]
    ecfs(st, "osd", "up", "1")
    assert _health(st)["status"] == "HEALTH_OK"
    assert ecfs(st, "rados", "get", "x", "-").stdout == new


def test_min_size_k_plus_1_by_default_k_on_request(tmp_path):
    """As Ceph's EC pools: with M OSDs down, writes stop (a clear error,
    nothing changes) while reads go on; 'init --min-size K' lets writes go
    on down to K shards."""
    from .util import assert_user_error
    blob, new = os.urandom(60_000), os.urandom(60_000)
    for min_size, writes in ((None, False), ("4", True)):
        st = tmp_path / f"s{min_size}"
        ecfs(st, "init", *(["--min-size", min_size] if min_size else []))
        ecfs(st, "rados", "put", "x", "-", input=blob)
        ecfs(st, "osd", "down", "0")
        ecfs(st, "osd", "down", "1")
        p = ecfs(st, "rados", "put", "x", "-", input=new, check=False)
        if writes:
            assert p.returncode == 0, p.stderr
        else:
            assert_user_error(p, "min_size")
        assert ecfs(st, "rados", "get", "x", "-").stdout == (new if writes else blob)
