"""ecfs rbd snapshots, clones, diffs and maintenance, as a user runs them."""
import json
import os
import shutil
import subprocess

import pytest

from .util import assert_user_error, ecfs, ecfs_json

MiB = 1 << 20
RBD_TOOL = shutil.which("rbd")


@pytest.fixture
def store(tmp_path):
    st = tmp_path / "s"
    ecfs(st, "init")
    return st


def _img(tmp_path, name, size, writes):
    """A raw image file with ``writes`` [(offset, bytes)] applied."""
    p = tmp_path / name
    with open(p, "wb") as f:
        f.truncate(size)
        for off, data in writes:
            f.seek(off)
            f.write(data)
    return p


def _write(store, tmp_path, image, off, data):
    """Write bytes into an image with the CLI alone: a one-record diff stream."""
    size = ecfs_json(store, "rbd", "info", image)["size"]
    stream = (b"rbd diff v1\n" + b"s" + size.to_bytes(8, "little") +
              b"w" + off.to_bytes(8, "little") + len(data).to_bytes(8, "little") + data + b"e")
    ecfs(store, "rbd", "import-diff", "-", image, input=stream)


def test_snapshots_export_and_rollback(store, tmp_path):
    v1 = _img(tmp_path, "v1", 12 * MiB, [(0, os.urandom(MiB)), (9 * MiB, os.urandom(4096))])
    ecfs(store, "rbd", "import", v1, "a")
    ecfs(store, "rbd", "snap", "create", "a@s1")
    _write(store, tmp_path, "a", 4096, b"N" * 4096)
    snaps = ecfs_json(store, "rbd", "snap", "ls", "a")
    assert [(s["id"], s["name"], s["size"], s["protected"]) for s in snaps] == \
        [(1, "s1", 12 * MiB, "false")]
    assert "s1" in ecfs(store, "rbd", "snap", "ls", "a").stdout.decode()
    out = tmp_path / "e1"
    ecfs(store, "rbd", "export", "a@s1", out)
    assert out.read_bytes() == v1.read_bytes()
    head = ecfs(store, "rbd", "export", "a", "-").stdout
    assert head[4096:8192] == b"N" * 4096
    info = ecfs_json(store, "rbd", "info", "a@s1")
    assert info["snapshot"] == "s1" and info["protected"] == "false"
    assert ecfs_json(store, "rbd", "info", "a")["snapshot_count"] == 1
    ecfs(store, "rbd", "snap", "rollback", "a@s1")
    assert ecfs(store, "rbd", "export", "a", "-").stdout == v1.read_bytes()
    ecfs(store, "rbd", "snap", "rm", "a@s1")
    assert ecfs_json(store, "rbd", "snap", "ls", "a") == []


def test_protect_clone_children_flatten(store, tmp_path):
    v1 = _img(tmp_path, "v1", 8 * MiB, [(0, os.urandom(2 * MiB)), (6 * MiB, os.urandom(MiB))])
    ecfs(store, "rbd", "import", v1, "p")
    ecfs(store, "rbd", "snap", "create", "p@s")
    assert_user_error(ecfs(store, "rbd", "clone", "p@s", "c", check=False), "protect")
    ecfs(store, "rbd", "snap", "protect", "p@s")
    ecfs(store, "rbd", "clone", "p@s", "c")
    assert ecfs(store, "rbd", "children", "p@s").stdout.decode().split() == ["c"]
    assert [c["image"] for c in ecfs_json(store, "rbd", "children", "p@s")] == ["c"]
    info = ecfs_json(store, "rbd", "info", "c")
    assert info["parent"]["image"] == "p" and info["parent"]["snapshot"] == "s"
    assert info["parent"]["overlap"] == 8 * MiB
    assert "p@s" in ecfs(store, "rbd", "ls", "-l").stdout.decode()
    assert ecfs(store, "rbd", "export", "c", "-").stdout == v1.read_bytes()
    for args, msg in ((("snap", "unprotect", "p@s"), "clones"),
                      (("snap", "rm", "p@s"), "protected"),
                      (("rm", "p"), "snapshots")):
        assert_user_error(ecfs(store, "rbd", *args, check=False), msg)
    ecfs(store, "rbd", "flatten", "c")
    assert ecfs_json(store, "rbd", "info", "c")["parent"] is None
    assert ecfs(store, "rbd", "children", "p@s").stdout == b""
    ecfs(store, "rbd", "snap", "unprotect", "p@s")
    ecfs(store, "rbd", "snap", "rm", "p@s")
    ecfs(store, "rbd", "rm", "p")
    assert ecfs(store, "rbd", "export", "c", "-").stdout == v1.read_bytes()
    assert_user_error(ecfs(store, "rbd", "flatten", "c", check=False), "no parent")


def test_diff_output_like_rbd(store, tmp_path):
    v1 = _img(tmp_path, "v1", 12 * MiB, [(0, b"x" * 8192), (5 * MiB, b"y" * MiB)])
    ecfs(store, "rbd", "import", v1, "d")
    text = ecfs(store, "rbd", "diff", "d").stdout.decode().splitlines()
    assert text[0].split() == ["Offset", "Length", "Type"]
    assert [line.split() for line in text[1:]] == [["0", "8192", "data"],
                                                   [str(5 * MiB), str(MiB), "data"]]
    ecfs(store, "rbd", "snap", "create", "d@s")
    _write(store, tmp_path, "d", 9 * MiB, b"z" * 4096)
    got = json.loads(ecfs(store, "rbd", "diff", "d", "--from-snap", "s", "--format",
                          "json").stdout)
    assert got == [{"offset": 9 * MiB, "length": 4096, "exists": True}]
    whole = ecfs_json(store, "rbd", "diff", "d", "--from-snap", "s", "--whole-object")
    assert whole == [{"offset": 8 * MiB, "length": 4 * MiB, "exists": True}]
    assert_user_error(ecfs(store, "rbd", "diff", "d", "--from-snap", "nope", check=False),
                      "nope")


def test_export_diff_import_diff_round_trip(store, tmp_path):
    v1 = _img(tmp_path, "v1", 12 * MiB, [(0, os.urandom(MiB)), (9 * MiB, os.urandom(9999))])
    ecfs(store, "rbd", "import", v1, "src")
    ecfs(store, "rbd", "snap", "create", "src@s1")
    _write(store, tmp_path, "src", 100, os.urandom(5000))
    _write(store, tmp_path, "src", 9 * MiB, bytes(9999))          # zeroes
    ecfs(store, "rbd", "snap", "create", "src@s2")
    ecfs(store, "rbd", "resize", "src", "--size", "20M")
    _write(store, tmp_path, "src", 15 * MiB, os.urandom(100))
    full, inc, head = tmp_path / "full", tmp_path / "inc", tmp_path / "head"
    ecfs(store, "rbd", "export-diff", "src@s1", full)
    ecfs(store, "rbd", "export-diff", "src@s2", "--from-snap", "s1", inc)
    ecfs(store, "rbd", "export-diff", "src", "--from-snap", "s2", head)
    assert full.read_bytes().startswith(b"rbd diff v1\nt\x02\x00\x00\x00s1s")
    assert inc.read_bytes().startswith(b"rbd diff v1\nf\x02\x00\x00\x00s1t\x02\x00\x00\x00s2s")
    ecfs(store, "rbd", "create", "dst", "--size", "1")
    ecfs(store, "rbd", "import-diff", full, "dst")
    # the from-snapshot must exist: a stream out of order is refused, nothing applied
    before = ecfs(store, "rbd", "export", "dst", "-").stdout
    assert_user_error(ecfs(store, "rbd", "import-diff", head, "dst", check=False), "s2")
    assert ecfs(store, "rbd", "export", "dst", "-").stdout == before
    ecfs(store, "rbd", "import-diff", "-", "dst", input=inc.read_bytes())
    ecfs(store, "rbd", "import-diff", head, "dst")
    assert [s["name"] for s in ecfs_json(store, "rbd", "snap", "ls", "dst")] == ["s1", "s2"]
    for spec in ("@s1", "@s2", ""):
        assert ecfs(store, "rbd", "export", "dst" + spec, "-").stdout == \
            ecfs(store, "rbd", "export", "src" + spec, "-").stdout, spec
    # an end snapshot that exists already, a truncated stream: refused, nothing changes
    assert_user_error(ecfs(store, "rbd", "import-diff", inc, "dst", check=False), "s2")
    ecfs(store, "rbd", "create", "t", "--size", "1")
    assert_user_error(ecfs(store, "rbd", "import-diff", "-", "t", check=False,
                           input=full.read_bytes()[:-1]), "truncated")
    assert ecfs_json(store, "rbd", "info", "t")["size"] == MiB
    assert ecfs_json(store, "rbd", "snap", "ls", "t") == []

    if RBD_TOOL:
        # Ceph's own parser accepts the streams and merges them; the merged
        # stream imports to the same bytes
        merged = tmp_path / "merged"
        p = subprocess.run([RBD_TOOL, "-c", "/dev/null", "merge-diff", str(full), str(inc),
                            str(merged), "--no-progress"], capture_output=True, timeout=60)
        assert p.returncode == 0, p.stderr.decode(errors="replace")
        ecfs(store, "rbd", "create", "m", "--size", "1")
        ecfs(store, "rbd", "import-diff", merged, "m")
        assert ecfs(store, "rbd", "export", "m", "-").stdout == \
            ecfs(store, "rbd", "export", "src@s2", "-").stdout


def test_du_per_snapshot_and_sparsify(store, tmp_path):
    v1 = _img(tmp_path, "v1", 16 * MiB, [(0, b"a" * 4096), (4 * MiB, b"b" * 4096)])
    ecfs(store, "rbd", "import", v1, "u")
    ecfs(store, "rbd", "snap", "create", "u@s")
    _write(store, tmp_path, "u", 8 * MiB, b"c" * 4096)
    du = ecfs_json(store, "rbd", "du", "u")
    rows = [(r["name"], r.get("snapshot"), r["used_size"]) for r in du["images"]]
    assert rows == [("u", "s", 8 * MiB), ("u", None, 4 * MiB)]
    assert du["total_used_size"] == 12 * MiB and du["total_provisioned_size"] == 16 * MiB
    assert "u@s" in ecfs(store, "rbd", "du").stdout.decode()
    # zeros written over the new object: sparsify deallocates it
    _write(store, tmp_path, "u", 8 * MiB, bytes(4096))
    ecfs(store, "rbd", "sparsify", "u")
    du = ecfs_json(store, "rbd", "du", "u")
    assert [r["used_size"] for r in du["images"]] == [8 * MiB, 0]
    assert ecfs(store, "rbd", "export", "u", "-").stdout == v1.read_bytes()


def test_feature_enable_disable(store):
    ecfs(store, "rbd", "create", "f", "--size", "8")
    ecfs(store, "rbd", "feature", "disable", "f", "fast-diff", "object-map")
    assert ecfs_json(store, "rbd", "info", "f")["features"] == ["layering", "exclusive-lock"]
    assert_user_error(ecfs(store, "rbd", "feature", "enable", "f", "fast-diff", check=False),
                      "object-map")
    assert_user_error(ecfs(store, "rbd", "feature", "disable", "f", "bogus", check=False),
                      "bogus")
    assert_user_error(ecfs(store, "rbd", "feature", "disable", "f", "layering", check=False),
                      "layering")
    ecfs(store, "rbd", "feature", "enable", "f", "object-map", "fast-diff")
    info = ecfs_json(store, "rbd", "info", "f")
    assert info["features"] == ["layering", "exclusive-lock", "object-map", "fast-diff"]
    ecfs(store, "rbd", "object-map", "check", "f")


@pytest.mark.parametrize("args,msg", [
    (("rbd", "snap", "create", "b"), "NAME@SNAP"),
    (("rbd", "snap", "create", "b@"), "name"),
    (("rbd", "snap", "create", "nosuch@s"), "does not exist"),
    (("rbd", "snap", "rm", "b@nosuch"), "nosuch"),
    (("rbd", "snap", "rollback", "b@nosuch"), "nosuch"),
    (("rbd", "snap", "protect", "b@nosuch"), "nosuch"),
    (("rbd", "snap", "unprotect", "b@s"), "not protected"),
    (("rbd", "snap", "ls", "b@s"), "snapshot"),
    (("rbd", "clone", "b@nosuch", "c"), "nosuch"),
    (("rbd", "clone", "b@s", "b"), "protected"),
    (("rbd", "export", "b@nosuch", "-"), "nosuch"),
    (("rbd", "export-diff", "b", "--from-snap", "nosuch", "-"), "nosuch"),
    (("rbd", "import-diff", "/nonexistent", "b"), "nonexistent"),
    (("rbd", "flatten", "b"), "no parent"),
    (("rbd", "feature", "enable", "b", "shared"), "creation"),
])
def test_bad_input_is_one_line_and_changes_nothing(store, args, msg):
    ecfs(store, "rbd", "create", "b", "--size", "10")
    ecfs(store, "rbd", "snap", "create", "b@s")
    info = ecfs_json(store, "rbd", "info", "b")
    counters = ecfs_json(store, "status")["counters"]
    p = ecfs(store, *args, check=False)
    assert_user_error(p, msg)
    assert ecfs_json(store, "status")["counters"] == counters
    assert ecfs_json(store, "rbd", "info", "b") == info


def test_maintenance_is_proxied_to_the_lock_holder(store, tmp_path):
    from tests.rbdlike.test_notify import Writer
    ecfs(store, "rbd", "create", "h", "--size", "16")
    w = Writer(str(store), "h", count=8)
    try:
        w.wait(lambda: len(w.done) >= 8)
        st = ecfs_json(store, "rbd", "status", "h")
        assert st["lock_owner"]["pid"] == w.p.pid
        assert [x["pid"] for x in st["watchers"] if x["lock_owner"]] == [w.p.pid]
        assert f"pid {w.p.pid}" in ecfs(store, "rbd", "status", "h").stdout.decode()
        ecfs(store, "rbd", "snap", "create", "h@s")
        ecfs(store, "rbd", "resize", "h", "--size", "32")
        assert ecfs_json(store, "rbd", "info", "h")["size"] == 32 * MiB
        assert ecfs_json(store, "rbd", "status", "h")["lock_owner"]["pid"] == w.p.pid
        assert_user_error(ecfs(store, "rbd", "rm", "h", check=False), "snapshots")
        before = ecfs(store, "rbd", "export", "h@s", "-").stdout
        assert before[:65536] != bytes(65536)
    finally:
        w.stop()
    assert ecfs_json(store, "rbd", "status", "h") == {"watchers": [], "lock_owner": None}
