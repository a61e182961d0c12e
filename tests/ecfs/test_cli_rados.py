"""ecfs rados ... as a user runs it."""
import os

import pytest

from .util import assert_user_error, ecfs, ecfs_json


@pytest.fixture
def store(tmp_path):
    st = tmp_path / "s"
    ecfs(st, "init")
    return st


def test_put_get_roundtrip_files_and_stdio(store, tmp_path):
    for size in (0, 1, 4095, 4096, 100_000, 300_000, 1 << 20):
        data = os.urandom(size)
        f = tmp_path / "in"
        f.write_bytes(data)
        ecfs(store, "rados", "put", f"o{size}", f)
        out = tmp_path / "out"
        ecfs(store, "rados", "get", f"o{size}", out)
        assert out.read_bytes() == data
        assert ecfs(store, "rados", "get", f"o{size}", "-").stdout == data
    data = os.urandom(70_000)
    ecfs(store, "rados", "put", "stdin", "-", input=data)
    assert ecfs(store, "rados", "get", "stdin", "-").stdout == data


def test_write_read_at_offsets(store, tmp_path):
    base = bytearray(os.urandom(200_000))
    ecfs(store, "rados", "put", "x", "-", input=bytes(base))
    patch = os.urandom(5000)
    ecfs(store, "rados", "write", "x", "-", "--offset", "8K", input=patch)
    base[8192:8192 + 5000] = patch
    got = ecfs(store, "rados", "read", "x", "--offset", "8000", "--length", "6K").stdout
    assert got == bytes(base[8000:8000 + 6144])
    out = tmp_path / "o"
    ecfs(store, "rados", "read", "x", "--offset", "0", "--length", "1M", out)
    assert out.read_bytes() == bytes(base)     # short at the object's end
    # growing past the end fills with zeros
    ecfs(store, "rados", "write", "x", "-", "--offset", "300000", input=b"tail")
    got = ecfs(store, "rados", "get", "x", "-").stdout
    assert got == bytes(base) + bytes(100_000) + b"tail"


def test_names_with_slash_and_unicode(store):
    names = ["a/b/c", "ünïcødé/名前", "x" * 250, ".hidden", "%41"]
    for n in names:
        ecfs(store, "rados", "put", n, "-", input=n.encode())
    assert ecfs_json(store, "rados", "ls") == sorted(names)
    for n in names:
        assert ecfs(store, "rados", "get", n, "-").stdout == n.encode()
    s = ecfs_json(store, "rados", "stat", "a/b/c")
    assert s["size"] == 5 and s["name"] == "a/b/c"
    assert "size 5" in ecfs(store, "rados", "stat", "a/b/c").stdout.decode()
    ecfs(store, "rados", "rm", "a/b/c")
    assert "a/b/c" not in ecfs_json(store, "rados", "ls")


@pytest.mark.parametrize("args,msg", [
    (["rados", "put", "x" * 251, "-"], "1..250"),
    (["rados", "put", "", "-"], "1..250"),
    (["rados", "get", "missing", "-"], "does not exist"),
    (["rados", "stat", "missing"], "does not exist"),
    (["rados", "rm", "missing"], "does not exist"),
    (["rados", "put", "x", "/nonexistent/file"], "no such file"),
    (["rados", "read", "obj", "--offset", "-1", "--length", "1"], "offset"),
    (["rados", "read", "obj", "--offset", "1", "--length", "-1"], "length"),
    (["rados", "read", "obj", "--offset", "1T", "--length", "1"], "limit"),
    (["rados", "write", "obj", "-", "--offset", "200M"], "limit"),
    (["rados", "write", "obj", "-", "--offset", "12Q"], "offset"),
    (["rados", "read", "obj"], "required"),
    (["rados", "frobnicate"], "invalid choice"),
    (["rados", "bench", "0", "write"], "positive"),
    (["rados", "bench", "1", "seq"], "no benchmark objects"),
])
def test_bad_input_one_line_no_change(store, args, msg):
    ecfs(store, "rados", "put", "obj", "-", input=b"payload")
    before = ecfs_json(store, "status")["counters"]
    p = ecfs(store, *args, input=b"abc", check=False)
    assert_user_error(p, msg)
    assert ecfs_json(store, "status")["counters"] == before
    assert ecfs(store, "rados", "get", "obj", "-").stdout == b"payload"
    assert ecfs_json(store, "rados", "ls") == ["obj"]


def test_rm_several_is_all_or_nothing(store):
    ecfs(store, "rados", "put", "a", "-", input=b"1")
    p = ecfs(store, "rados", "rm", "a", "missing", check=False)
    assert_user_error(p, "missing")
    assert ecfs_json(store, "rados", "ls") == ["a"]


def test_bench_write_seq_rand(store):
    out = ecfs(store, "rados", "bench", "1", "write", "-b", "4K", "-t", "2", "--no-cleanup").stdout.decode()
    assert "Total writes made:" in out and "Bandwidth (MB/sec):" in out
    r = ecfs_json(store, "rados", "bench", "1", "seq")
    assert r["ops"] > 0 and r["shard_reads_per_op"] == pytest.approx(1.0)
    r = ecfs_json(store, "rados", "bench", "1", "rand", "-t", "2")
    assert r["ops"] > 0
    w = ecfs_json(store, "rados", "bench", "1", "write", "-b", "64K", "-t", "2")
    assert w["ops"] > 0
    names = ecfs_json(store, "rados", "ls")
    # the cleaned-up run left nothing; the --no-cleanup one left its objects
    assert "benchmark_last_metadata" in names
    assert len(names) == 1 + int(ecfs(store, "rados", "get", "benchmark_last_metadata", "-")
                                 .stdout.split()[1])
