"""ecfs rados ... as a user runs it."""
import os

import pytest

from .util import assert_user_error, ecfs, ecfs_json, tree


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
    # numbers: ASCII digits only (int() takes any Unicode digit), no whitespace
    (["rados", "write", "obj", "-", "--offset", "\u0663"], "invalid offset"),   # Arabic-Indic 3
    (["rados", "write", "obj", "-", "--offset", "\uff13"], "invalid offset"),   # fullwidth 3
    (["rados", "write", "obj", "-", "--offset", "3\n"], "invalid offset"),
    (["rados", "read", "obj", "--offset", " 1", "--length", "1"], "invalid offset"),
    (["rados", "read", "obj", "--length", "\u0661K"], "invalid length"),
    (["rados", "bench", "\u0661", "write", "-b", "4K", "-t", "1"], "whole number"),
    (["rados", "bench", "1 ", "write", "-b", "4K", "-t", "1"], "whole number"),
    (["rados", "bench", "1", "write", "-b", "4K", "-t", "\u0661"], "whole number"),
    (["rados", "bench", "1", "write", "-b", "\u0664K", "-t", "1"], "invalid block size"),
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
    ecfs(store, "rados", "rm", "a", "a")       # one name twice: removed once, no error
    assert ecfs_json(store, "rados", "ls") == []


def test_bad_paths_are_refused_before_any_io(store, tmp_path):
    """Output and input paths are checked before an object is read, and
    rm checks every name without counting: counters and files unchanged."""
    ecfs(store, "rados", "put", "a2", "-", input=b"two")
    ecfs(store, "rados", "put", "obj", "-", input=b"payload")
    outdir = tmp_path / "out"
    outdir.mkdir()
    before_ctr = ecfs_json(store, "status")["counters"]
    before = tree(tmp_path)
    for args, msg in [
        (["get", "obj", "/nonexistent/dir/x"], "no such directory"),
        (["get", "obj", outdir], "directory"),
        (["read", "obj", "--length", "1", outdir], "directory"),
        (["read", "obj", "--length", "1", "/nonexistent/dir/x"], "no such directory"),
        (["rm", "a2", "nosuch"], "nosuch"),
        (["put", "x", outdir], "directory"),
        (["bench", "1", "write", "-t", "100000"], "at most 1024"),
    ]:
        assert_user_error(ecfs(store, "rados", *args, check=False), msg)
    assert ecfs_json(store, "status")["counters"] == before_ctr
    assert tree(tmp_path) == before
    assert ecfs_json(store, "rados", "ls") == ["a2", "obj"]


def test_sizes_take_binary_unit_spellings(store):
    data = os.urandom(3 * 4096)
    ecfs(store, "rados", "put", "u", "-", input=data)
    for off, length in (("4Ki", "4KiB"), ("4k", "4KB")):
        got = ecfs(store, "rados", "read", "u", "--offset", off, "--length", length).stdout
        assert got == data[4096:8192]


def test_bench_write_seq_rand(store):
    out = ecfs(store, "rados", "bench", "1", "write", "-b", "4K", "-t", "2", "--no-cleanup").stdout.decode()
    lines = out.splitlines()
    # rados bench's layout: header, per-second rows, summary
    assert lines[0].startswith("Maintaining 2 concurrent writes of 4096 bytes to objects of size 4096")
    assert lines[2].split() == ["sec", "Cur", "ops", "started", "finished", "avg", "MB/s",
                                "cur", "MB/s", "last", "lat(s)", "avg", "lat(s)"]
    rows = [ln.split() for ln in lines[3:] if ln.split() and ln.split()[0].isdigit()]
    assert [r[0] for r in rows[:2]] == ["0", "1"] and all(len(r) == 8 for r in rows)
    summary = dict(ln.split(":", 1) for ln in lines if ":" in ln and not ln.startswith("Object prefix"))
    for key in ("Total time run", "Total writes made", "Write size", "Object size",
                "Bandwidth (MB/sec)", "Stddev Bandwidth", "Average IOPS", "Stddev IOPS",
                "Average Latency(s)", "Max latency(s)", "Min latency(s)"):
        assert key in summary, key
    assert int(summary["Write size"]) == 4096 and int(summary["Total writes made"]) > 0
    assert "Cleaning up" not in out
    r = ecfs_json(store, "rados", "bench", "1", "seq")
    assert r["ops"] > 0 and r["shard_reads_per_op"] == pytest.approx(1.0)
    r = ecfs_json(store, "rados", "bench", "1", "rand", "-t", "2")
    assert r["ops"] > 0
    out = ecfs(store, "rados", "bench", "1", "write", "-b", "64K", "-t", "2").stdout.decode()
    assert "Total writes made:" in out
    assert "Cleaning up (deleting benchmark objects)" in out
    assert "Clean up completed and total clean up time :" in out
    names = ecfs_json(store, "rados", "ls")
    # the cleaned-up run left nothing; the --no-cleanup one left its objects
    assert "benchmark_last_metadata" in names
    assert len(names) == 1 + int(ecfs(store, "rados", "get", "benchmark_last_metadata", "-")
                                 .stdout.split()[1])
