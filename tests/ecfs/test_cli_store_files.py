"""Damaged, missing or unreadable store files: one clear error line naming
the file (or an OSD reported down with the reason), and nothing changed."""
import json
import os
import shutil
import tempfile

import pytest

from .util import assert_user_error, ecfs, ecfs_as, ecfs_json, tree


@pytest.fixture
def store(tmp_path):
    st = tmp_path / "s"
    ecfs(st, "init")
    ecfs(st, "rados", "put", "obj", "-", input=b"payload")
    return st


def test_damaged_osdmap_is_an_error_naming_it(store):
    path = store / "osdmap.json"
    good = path.read_bytes()
    for i, content in enumerate([
            b"garbage\n",
            b'{"down": [1], "rea',                 # truncated
            b"[]",
            b'{"down": "1"}',
            b'{"down": [7]}']):                    # no such OSD
        path.write_bytes(content)
        before = tree(store)
        cmds = [["status"]] + ([["osd", "down", "1"], ["rados", "get", "obj", "-"]] if i < 2 else [])
        for cmd in cmds:
            assert_user_error(ecfs(store, *cmd, check=False), str(path))
        assert tree(store) == before
    path.write_bytes(good)
    assert ecfs_json(store, "status")["health"]["status"] == "HEALTH_OK"


def test_damaged_pool_config_values_are_errors(store):
    good = json.loads((store / "pool.json").read_text())
    cases = [
        ("write_mode", "bogus", "write_mode"),
        ("object_size", "4M", "object_size"),
        ("object_size", 3000, "object size"),
        ("chunk_size", 6000, "chunk size"),
        ("chunk_size", "big", "chunk_size"),
        ("format_version", True, "format_version"),
        ("format_version", 0, "format_version"),
        ("k", 2.5, "k must"),
        ("osds", 6, "osds"),
        ("osds", good["osds"][:1] + good["osds"][:1] + good["osds"][2:], "osd.0"),
    ]
    for key, value, msg in cases:
        cfg = dict(good, **{key: value})
        (store / "pool.json").write_text(json.dumps(cfg))
        before = tree(store)
        p = ecfs(store, "status", check=False)
        assert_user_error(p, msg)
        assert "pool.json" in p.stderr.decode(), (key, value)
        assert tree(store) == before


def test_damaged_counters_file_is_an_error_naming_it(store):
    total = store / "counters" / "total.ctr"
    for content in (b"garbage\n", os.urandom(total.stat().st_size)):
        total.write_bytes(content)
        before = tree(store)
        for cmd in (["status"], ["rados", "put", "x", "-"]):
            assert_user_error(ecfs(store, *cmd, input=b"x", check=False), str(total))
        assert tree(store) == before
    total.write_bytes(b"")      # empty: nothing folded into it yet, reads as zeros
    assert ecfs_json(store, "status")["counters"]["client_write_ops"] == 0


def test_broken_osd_directories_are_down_with_reasons(store, tmp_path):
    os.unlink(store / "osd.1" / "osd.json")
    os.rename(store / "osd.2" / "objects", tmp_path / "objects2")
    s = ecfs_json(store, "status")
    assert s["health"]["status"] == "HEALTH_DEGRADED"
    reasons = {o["id"]: o["reason"] for o in s["osds"] if not o["up"]}
    assert set(reasons) == {1, 2}
    assert "osd.json missing" in reasons[1] and "objects/ missing" in reasons[2]
    assert "osd.1" in s["health"]["reason"] and "osd.2" in s["health"]["reason"]
    assert ecfs(store, "rados", "get", "obj", "-").stdout == b"payload"   # degraded read
    (store / "osd.3" / "osd.json").write_text("[]")
    s = ecfs_json(store, "status")
    assert s["health"]["status"] == "HEALTH_ERR"
    assert "damaged" in {o["id"]: o["reason"] for o in s["osds"]}[3]
    p = ecfs(store, "status")
    assert b"osd.json missing" in p.stdout and p.stderr == b""


def test_status_lists_cache_hits_and_stdout_write_errors_are_one_line(store):
    assert ecfs_json(store, "status")["counters"]["cache_hits"] == 0
    assert b"cache_hits" in ecfs(store, "status", "--verbose").stdout
    assert b"\n  cache_hits" not in ecfs(store, "status").stdout   # a summary, as ceph -s
    with open("/dev/full", "wb") as full:
        for cmd in (["status"], ["rados", "get", "obj", "-"]):
            p = ecfs(store, *cmd, check=False, stdout=full)
            assert_user_error(p, "standard output")


@pytest.fixture
def public_tmp():
    """A directory every user can reach (pytest's own is root-only)."""
    d = tempfile.mkdtemp(prefix="ecfs-test-", dir="/tmp")
    os.chmod(d, 0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to make a root-owned store")
def test_other_user_on_root_store_gets_permission_error(public_tmp):
    nobody = (65534, 65534)
    store = os.path.join(public_tmp, "s")
    ecfs(store, "init")
    before = tree(store)
    assert os.access(os.path.join(store, "pool.json"), os.R_OK)
    for cmd in (["status"], ["rados", "ls"], ["osd", "down", "1"]):
        p = ecfs_as(*nobody, store, *cmd)
        assert_user_error(p, "permission denied")
        assert store in p.stderr.decode()
    # init validates before it writes: nothing is made when one OSD path is unwritable
    os.chmod(public_tmp, 0o777)
    p = ecfs_as(*nobody, os.path.join(public_tmp, "n"), "init", "--k", "2", "--m", "1",
                "--osd-dir", os.path.join(public_tmp, "d0"), "/root/ecfs-test-osd",
                os.path.join(public_tmp, "d2"))
    assert_user_error(p, "/root")
    assert sorted(os.listdir(public_tmp)) == ["s"]
    assert tree(store) == before
