"""ecfs init / status / osd through the command line."""
import json
import os

import pytest

from .util import assert_user_error, ecfs, ecfs_json, tree


def test_init_default_profile(tmp_path):
    st = tmp_path / "s"
    ecfs(st, "init")
    cfg = json.loads((st / "pool.json").read_text())
    assert isinstance(cfg["format_version"], int)
    assert (cfg["k"], cfg["m"], cfg["plugin"], cfg["chunk_size"]) == (4, 2, "isa_l_rs_vand", "auto")
    assert {f"osd.{i}" for i in range(6)} <= set(os.listdir(st))
    s = ecfs_json(st, "status")
    assert s["health"]["status"] == "HEALTH_OK"
    assert [o["id"] for o in s["osds"]] == list(range(6))
    assert all(o["up"] for o in s["osds"])


def test_init_into_existing_empty_dir_and_osd_dirs(tmp_path):
    st = tmp_path / "s"
    st.mkdir()
    dirs = [tmp_path / f"disk{i}" / "osd" for i in range(3)]
    ecfs(st, "init", "--k", "2", "--m", "1", "--osd-dir", *dirs, "--chunk-size", "8K")
    s = ecfs_json(st, "status")
    assert [o["path"] for o in s["osds"]] == [str(d) for d in dirs]
    assert s["pool"]["chunk_size"] == 8192


@pytest.mark.parametrize("args,msg", [
    (["--k", "1"], "k must be"),
    (["--k", "-3"], "K must be >= 2"),
    (["--osds", "100000"], "at most"),
    (["--object-size", "3M"], "object size"),
    (["--object-size", "64M"], "4K..32M"),   # an image default no image could take
    (["--m", "0"], "m must be"),
    (["--k", "5", "--m", "2", "--osds", "6"], "needs at least"),
    (["--osds", "5"], "needs at least"),
    (["--plugin", "nope"], "unknown plugin"),
    (["--chunk-size", "6K"], "chunk size"),
    (["--chunk-size", "2M"], "chunk size"),
    (["--chunk-size", "huge"], "invalid chunk size"),
    (["--k", "x"], "--k must be a whole number"),
    (["--k", "\u0663"], "--k must be a whole number"),          # Arabic-Indic 3
    (["--m", "\uff12"], "--m must be a whole number"),          # fullwidth 2
    (["--osds", "\u0666"], "--osds must be a whole number"),
    (["--osds", " 6"], "--osds must be a whole number"),
    (["--osds", "6\n"], "--osds must be a whole number"),
    (["--chunk-size", "\u0668K"], "invalid chunk size"),
    (["--object-size", "\u0664M"], "invalid object size"),
    (["--object-size", ""], "invalid object size"),
    (["--bogus"], "unrecognized"),
])
def test_init_refuses_bad_profiles_and_writes_nothing(tmp_path, args, msg):
    st = tmp_path / "s"
    p = ecfs(st, "init", *args, check=False)
    assert_user_error(p, msg)
    assert not st.exists()


def test_init_refuses_overlapping_osd_dirs(tmp_path):
    st, d = tmp_path / "s", tmp_path / "d"
    for dirs, msg in [
        ([d / "a", d / "a", d / "b"], "twice"),
        ([d / "a", d / "a" / "x", d / "b"], "inside OSD directory"),
        ([d / "a", d / "b" / "..", d / "b"], "inside OSD directory"),
        ([st, d / "a", d / "b"], "store directory itself"),
        ([tmp_path, d / "a", d / "b"], "inside OSD directory"),
        ([st / "counters", d / "a", d / "b"], "store uses"),
    ]:
        p = ecfs(st, "init", "--k", "2", "--m", "1", "--osd-dir", *dirs, check=False)
        assert_user_error(p, msg)
        assert sorted(os.listdir(tmp_path)) == [], dirs


def test_init_failing_late_removes_only_what_it_made(tmp_path):
    """An OSD path that passes the checks but cannot be made (here under
    /proc): everything created is taken away again, pre-existing empty
    directories stay, and the message names the path that failed."""
    if not os.path.isdir("/proc/self"):
        pytest.skip("no /proc")
    st, pre = tmp_path / "s", tmp_path / "pre"
    pre.mkdir()
    (tmp_path / "keep").write_text("x")
    bad = "/proc/ecfs-test-osd"
    p = ecfs(st, "init", "--k", "2", "--m", "1",
             "--osd-dir", tmp_path / "new" / "a", pre, bad, check=False)
    assert_user_error(p, f"cannot create {bad}")
    assert sorted(os.listdir(tmp_path)) == ["keep", "pre"]
    assert os.listdir(pre) == []
    st.mkdir()          # an existing empty store directory stays, emptied
    p = ecfs(st, "init", "--k", "2", "--m", "1", "--osd-dir", pre, st / "o", bad, check=False)
    assert_user_error(p, bad)
    assert os.listdir(st) == [] and os.listdir(pre) == []


def test_init_refuses_existing_store_unchanged(tmp_path):
    st = tmp_path / "s"
    ecfs(st, "init")
    before = tree(st)
    assert_user_error(ecfs(st, "init", check=False), "already")
    assert tree(st) == before


def test_init_refuses_nonempty_dir(tmp_path):
    st = tmp_path / "s"
    st.mkdir()
    (st / "precious").write_text("x")
    assert_user_error(ecfs(st, "init", check=False), "not empty")
    assert os.listdir(st) == ["precious"]


def test_newer_format_refused(tmp_path):
    st = tmp_path / "s"
    ecfs(st, "init")
    cfg = json.loads((st / "pool.json").read_text())
    cfg["format_version"] = 99
    (st / "pool.json").write_text(json.dumps(cfg))
    before = tree(st)
    for cmd in (["status"], ["rados", "ls"], ["osd", "ls"], ["rados", "put", "x", "-"]):
        assert_user_error(ecfs(st, *cmd, input=b"abc", check=False), "newer")
    assert tree(st) == before


def test_corrupt_pool_config_refused(tmp_path):
    st = tmp_path / "s"
    ecfs(st, "init")
    (st / "pool.json").write_text("{not json")
    assert_user_error(ecfs(st, "status", check=False), "pool.json")


def test_missing_store(tmp_path):
    assert_user_error(ecfs(tmp_path / "none", "status", check=False), "no ecfs store")


def test_counters_accumulate_across_processes_and_status_adds_nothing(tmp_path):
    st = tmp_path / "s"
    ecfs(st, "init")
    ecfs(st, "rados", "put", "a", "-", input=os.urandom(300_000))
    c1 = ecfs_json(st, "status")["counters"]
    assert c1["client_write_ops"] == 1 and c1["shard_writes"] > 0
    ecfs(st, "rados", "read", "a", "--offset", "4K", "--length", "4K")
    c2 = ecfs_json(st, "status")["counters"]
    assert c2["client_read_ops"] == 1 and c2["client_write_ops"] == 1
    assert c2["shard_reads"] == c1["shard_reads"] + 1
    c3 = ecfs_json(st, "status")["counters"]
    assert c3 == c2


def test_failed_command_does_not_count(tmp_path):
    st = tmp_path / "s"
    ecfs(st, "init")
    ecfs(st, "rados", "put", "a", "-", input=b"x" * 5000)
    c1 = ecfs_json(st, "status")["counters"]
    assert_user_error(ecfs(st, "rados", "read", "nope", "--length", "1", check=False))
    assert_user_error(ecfs(st, "rados", "read", "a", "--offset", "-5", "--length", "1", check=False))
    assert ecfs_json(st, "status")["counters"] == c1


def test_osd_down_up_and_health(tmp_path):
    st = tmp_path / "s"
    ecfs(st, "init")
    ecfs(st, "osd", "down", "2")
    s = ecfs_json(st, "status")
    assert s["health"]["status"] == "HEALTH_DEGRADED"
    assert "osd.2" in s["health"]["reason"]
    os.rename(st / "osd.4", tmp_path / "gone")
    s = ecfs_json(st, "status")
    assert "osd.4" in s["health"]["reason"] and s["health"]["status"] == "HEALTH_DEGRADED"
    ecfs(st, "osd", "down", "osd.5")
    assert ecfs_json(st, "status")["health"]["status"] == "HEALTH_ERR"
    ecfs(st, "osd", "up", "2")
    ecfs(st, "osd", "up", "5")
    assert_user_error(ecfs(st, "osd", "up", "4", check=False), "osd.4")
    os.rename(tmp_path / "gone", st / "osd.4")
    ecfs(st, "osd", "up", "4")
    assert ecfs_json(st, "status")["health"]["status"] == "HEALTH_OK"
    assert_user_error(ecfs(st, "osd", "down", "9", check=False), "osd.9")
    assert_user_error(ecfs(st, "osd", "down", "x", check=False), "invalid OSD")
    for bad in ("\u0663", "osd.\u0663", "\u00b3", "3\n", " 3", "osd.", ""):
        assert_user_error(ecfs(st, "osd", "down", bad, check=False), "invalid OSD")
    rows = ecfs_json(st, "osd", "ls")
    assert len(rows) == 6 and all(r["up"] for r in rows)
