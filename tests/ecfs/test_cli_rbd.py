"""ecfs rbd ... (images) as a user runs it."""
import json
import os
import signal
import subprocess

import pytest

from ..waiting import wait_for
from .util import assert_user_error, ecfs, ecfs_json, ecfs_popen, holds_open

MiB = 1 << 20


@pytest.fixture
def store(tmp_path):
    st = tmp_path / "s"
    ecfs(st, "init")
    return st


def _state(store):
    """What a failed command must not change: counters, objects, images."""
    st = ecfs_json(store, "status")
    return st["counters"], st["objects"], st["images"]


def test_create_info_ls_resize_rename_rm(store):
    ecfs(store, "rbd", "create", "a", "--size", "100")           # MiB, as rbd
    ecfs(store, "rbd", "create", "b", "--size", "1G", "--object-size", "1M")
    info = ecfs_json(store, "rbd", "info", "a")
    assert info["size"] == 100 * MiB and info["object_size"] == 4 * MiB
    assert info["features"] == ["layering", "exclusive-lock", "object-map", "fast-diff"]
    assert info["snapshot_count"] == 0 and info["lock_owner"] is None
    text = ecfs(store, "rbd", "info", "b").stdout.decode()
    assert "size 1 GiB in 1024 objects" in text and "order 20" in text
    assert ecfs(store, "rbd", "ls").stdout.decode().split() == ["a", "b"]
    assert json.loads(ecfs(store, "rbd", "ls", "--format", "json").stdout) == ["a", "b"]
    ecfs(store, "rbd", "resize", "a", "--size", "200")
    assert ecfs_json(store, "rbd", "info", "a")["size"] == 200 * MiB
    ecfs(store, "rbd", "rename", "a", "c")
    ecfs(store, "rbd", "rm", "c")
    assert ecfs(store, "rbd", "ls").stdout.decode().split() == ["b"]


@pytest.mark.parametrize("args,msg", [
    (("rbd", "create", "x", "--size", "-1"), "size"),
    (("rbd", "create", "x", "--size", "10Q"), "size"),
    (("rbd", "create", "x/y", "--size", "1"), "name"),
    (("rbd", "create", "x", "--size", "1", "--object-size", "3M"), "object size"),
    (("rbd", "create", "x", "--size", "1", "--image-feature", "bogus"), "feature"),
    (("rbd", "create", "b", "--size", "1"), "exists"),
    (("rbd", "info", "nosuch"), "does not exist"),
    (("rbd", "rm", "nosuch"), "does not exist"),
    (("rbd", "resize", "b", "--size", "1"), "allow-shrink"),
    (("rbd", "rename", "b", "bad@name"), "name"),
    # '.' and '..' are directory entries in the mount, never images or snapshots
    (("rbd", "create", ".", "--size", "1"), "'.' and '..'"),
    (("rbd", "create", "..", "--size", "1"), "'.' and '..'"),
    (("rbd", "rename", "b", ".."), "'.' and '..'"),
    (("rbd", "import", "-", "."), "'.' and '..'"),
    (("rbd", "clone", "b@s", ".."), "'.' and '..'"),
    (("rbd", "snap", "create", "b@."), "'.' and '..'"),
    (("rbd", "snap", "create", "b@.."), "'.' and '..'"),
    (("rbd", "export", "nosuch", "-"), "does not exist"),
    (("rbd", "import", "/nonexistent/file", "y"), "nonexistent"),
    # sizes: ASCII digits only (int() takes any Unicode digit), no whitespace
    (("rbd", "create", "x", "--size", "\u0663"), "invalid size"),       # Arabic-Indic 3
    (("rbd", "create", "x", "--size", "\uff13"), "invalid size"),       # fullwidth 3
    (("rbd", "create", "x", "--size", "\u0663M"), "invalid size"),
    (("rbd", "create", "x", "--size", "\u00b2"), "invalid size"),       # superscript 2
    (("rbd", "create", "x", "--size", "4M\n"), "invalid size"),
    (("rbd", "create", "x", "--size", " 4M"), "invalid size"),
    (("rbd", "create", "x", "--size", "4 M"), "invalid size"),
    (("rbd", "create", "x", "--size", "1_0"), "invalid size"),
    (("rbd", "create", "x", "--size", ""), "invalid size"),
    (("rbd", "create", "x", "--size", "9" * 5000), "invalid size"),    # past int()'s digit limit
    (("rbd", "create", "x", "--size", "1", "--object-size", ""), "invalid object size"),
    (("rbd", "create", "x", "--size", "1", "--object-size", "1M\n"), "invalid object size"),
    (("rbd", "import", "-", "x", "--object-size", ""), "invalid object size"),
    (("rbd", "resize", "b", "--size", "\u0662\u0660"), "invalid size"),
    # feature lists: no empty entries
    (("rbd", "feature", "disable", "b", "fast-diff,,"), "empty"),
    (("rbd", "feature", "disable", "b", ",fast-diff"), "empty"),
    (("rbd", "feature", "disable", "b", ""), "empty"),
    (("rbd", "create", "x", "--size", "1", "--image-feature", "layering,,"), "empty"),
])
def test_bad_input_is_one_line_and_changes_nothing(store, args, msg):
    ecfs(store, "rbd", "create", "b", "--size", "10")
    before = _state(store)
    p = ecfs(store, *args, check=False)
    assert_user_error(p, msg)
    assert _state(store) == before
    assert ecfs(store, "rbd", "ls").stdout.decode().split() == ["b"]
    assert ecfs_json(store, "rbd", "info", "b")["size"] == 10 * MiB


def test_import_export_sparse_round_trip(store, tmp_path):
    src = tmp_path / "in.img"
    with open(src, "wb") as f:
        f.write(os.urandom(MiB))
        f.seek(9 * MiB)
        f.write(os.urandom(5000))
    ecfs(store, "rbd", "import", src, "im")
    info = ecfs_json(store, "rbd", "info", "im")
    assert info["size"] == 9 * MiB + 5000
    assert info["objects_present"] == 2          # the all-zero object was not written
    out = tmp_path / "out.img"
    ecfs(store, "rbd", "export", "im", out)
    assert out.read_bytes() == src.read_bytes()
    assert os.stat(out).st_blocks * 512 < 3 * MiB   # sparse
    assert ecfs(store, "rbd", "export", "im", "-").stdout == src.read_bytes()
    ecfs(store, "rbd", "import", "-", "piped", input=src.read_bytes())
    assert ecfs(store, "rbd", "export", "piped", "-").stdout == src.read_bytes()
    du = ecfs_json(store, "rbd", "du", "im")
    assert du["images"][0]["used_size"] == 8 * MiB and du["images"][0]["provisioned_size"] == 9 * MiB + 5000


def test_object_map_check_and_rebuild(store):
    ecfs(store, "rbd", "create", "m", "--size", "12")
    image_id = ecfs_json(store, "rbd", "info", "m")["id"]
    ecfs(store, "rados", "put", f"rbd_object_map.{image_id}", "-", input=b"junk")
    p = ecfs(store, "rbd", "object-map", "check", "m", check=False)
    assert p.returncode != 0 and b"invalid" in p.stdout
    assert ecfs_json(store, "rbd", "info", "m")["flags"] == ["object map invalid",
                                                             "fast diff invalid"]
    assert "flags: object map invalid, fast diff invalid" in \
        ecfs(store, "rbd", "info", "m").stdout.decode()
    ecfs(store, "rbd", "object-map", "rebuild", "m")
    ecfs(store, "rbd", "object-map", "check", "m")
    assert ecfs_json(store, "rbd", "info", "m")["flags"] == []


def test_lock_ls_and_rm_without_owner(store):
    ecfs(store, "rbd", "create", "l", "--size", "4")
    assert ecfs(store, "rbd", "lock", "ls", "l").stdout == b""
    assert_user_error(ecfs(store, "rbd", "lock", "rm", "l", check=False), "not locked")


def test_export_never_overwrites_a_file_but_writes_devices(store, tmp_path):
    ecfs(store, "rbd", "create", "e", "--size", "1")
    out = tmp_path / "out.img"
    out.write_bytes(b"precious")
    assert_user_error(ecfs(store, "rbd", "export", "e", out, check=False), "exists")
    assert_user_error(ecfs(store, "rbd", "export-diff", "e", out, check=False), "exists")
    assert out.read_bytes() == b"precious"
    ecfs(store, "rbd", "export", "e", "/dev/null")          # a device is written, not replaced
    assert os.path.exists("/dev/null") and not os.path.isfile("/dev/null")


def test_listing_commands_never_checkpoint_beside_a_writer(tmp_path):
    """rbd ls / info / du / status beside a process that keeps writing: they
    leave the journal alone (a checkpoint there is a syncfs under the
    exclusive gate, stalling the writer every time)."""
    from backend.objectstore import ObjectStore
    st = tmp_path / "s"
    ecfs(st, "init")
    ecfs(st, "rbd", "create", "img", "--size", "8")
    writer = ObjectStore(str(st))
    try:
        writer.write_full("busy", os.urandom(64 << 10))
        size = writer.journal.size()
        assert size > 16
        for args in (("rbd", "ls", "-l"), ("rbd", "info", "img"), ("rbd", "du"),
                     ("rbd", "status", "img"), ("status",)):
            ecfs(st, *args)
            assert writer.journal.size() == size, f"{' '.join(args)} checkpointed"
    finally:
        writer.close()


def test_pool_object_size_is_the_image_default(tmp_path):
    """``ecfs init --object-size`` sets the object size of every new image
    (create, import) that names none; an explicit --object-size wins."""
    st = tmp_path / "s"
    ecfs(st, "init", "--object-size", "1M")
    ecfs(st, "rbd", "create", "i", "--size", "24M")
    assert "order 20 (1 MiB objects)" in ecfs(st, "rbd", "info", "i").stdout.decode()
    assert ecfs_json(st, "rbd", "info", "i")["objects"] == 24
    ecfs(st, "rbd", "create", "big", "--size", "24M", "--object-size", "8M")
    assert ecfs_json(st, "rbd", "info", "big")["object_size"] == 8 * MiB
    ecfs(st, "rbd", "import", "-", "im", input=os.urandom(3 * MiB))
    assert ecfs_json(st, "rbd", "info", "im")["object_size"] == MiB
    ecfs(st, "rbd", "import", "-", "im8", "--object-size", "8M", input=os.urandom(MiB))
    assert ecfs_json(st, "rbd", "info", "im8")["object_size"] == 8 * MiB


def _writing_into(pid: int, d) -> bool:
    """Process ``pid`` holds a file in directory ``d`` open (named or not:
    an O_TMPFILE file shows as 'd/#INODE (deleted)')."""
    return holds_open(pid, lambda target: target.startswith(f"{d}/"))


@pytest.mark.parametrize("verb", ["export", "export-diff"])
def test_killed_export_leaves_nothing_behind(store, tmp_path, verb):
    src = tmp_path / "in.img"
    src.write_bytes(os.urandom(64 * MiB))      # no zeros: every object is read and written
    ecfs(store, "rbd", "import", src, "big")
    outdir = tmp_path / "out"
    outdir.mkdir()
    out = outdir / "big.out"
    p = ecfs_popen(store, "rbd", verb, "big", out, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: _writing_into(p.pid, outdir) or p.poll() is not None,
                 what=f"rbd {verb} writing its output")
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(timeout=60)
    assert p.returncode == -signal.SIGKILL, f"rbd {verb} ended before the kill ({p.returncode})"
    assert not out.exists()
    ecfs(store, "rbd", verb, "big", out)      # the next run into the same directory
    assert os.listdir(outdir) == ["big.out"]
    want = src.read_bytes() if verb == "export" else \
        ecfs(store, "rbd", "export-diff", "big", "-").stdout
    assert out.read_bytes() == want


def test_next_export_removes_tmp_files_of_dead_runs(store, tmp_path):
    """Where the file system has no O_TMPFILE an export writes FILE.ecfs-tmp.PID;
    one left by a run that died (its pid gone) goes with the next export to
    FILE, and nothing else does: a live process's, another FILE's, a name
    that only looks alike."""
    ecfs(store, "rbd", "create", "e", "--size", "1")
    ecfs(store, "rbd", "import", "-", "d", input=os.urandom(MiB))
    dead = subprocess.Popen(["true"])
    dead.wait()
    outdir = tmp_path / "out"
    outdir.mkdir()
    keep = [f"x.img.ecfs-tmp.{os.getpid()}", f"other.img.ecfs-tmp.{dead.pid}",
            "x.img.ecfs-tmp.notapid", f"x.img.ecfs-tmp.{dead.pid}.more"]
    for n in keep + [f"x.img.ecfs-tmp.{dead.pid}"]:
        (outdir / n).write_bytes(b"partial")
    ecfs(store, "rbd", "export", "e", outdir / "x.img")
    assert sorted(os.listdir(outdir)) == sorted(keep + ["x.img"])
    (outdir / f"y.diff.ecfs-tmp.{dead.pid}").write_bytes(b"partial")
    ecfs(store, "rbd", "export-diff", "d", outdir / "y.diff")
    assert sorted(os.listdir(outdir)) == sorted(keep + ["x.img", "y.diff"])
    assert (outdir / "y.diff").read_bytes() == ecfs(store, "rbd", "export-diff", "d", "-").stdout


@pytest.mark.parametrize("tmpfile", [True, False], ids=["O_TMPFILE", "named-tmp"])
def test_new_output_file_appears_whole_or_not_at_all(tmp_path, monkeypatch, tmpfile):
    from ecfs import outfile
    if not tmpfile:       # as on a file system without O_TMPFILE (FUSE, NFS)
        monkeypatch.setattr(outfile, "_open_unnamed", lambda d, path: None)
    old = os.umask(0o027)
    try:
        with outfile.new_file(str(tmp_path / "f")) as f:
            f.write(b"abc")
            during = os.listdir(tmp_path)
    finally:
        os.umask(old)
    assert during == ([] if tmpfile else [f"f.ecfs-tmp.{os.getpid()}"])
    assert os.listdir(tmp_path) == ["f"] and (tmp_path / "f").read_bytes() == b"abc"
    assert os.stat(tmp_path / "f").st_mode & 0o777 == 0o640      # as open() makes files
    with pytest.raises(RuntimeError):
        with outfile.new_file(str(tmp_path / "g")) as f:
            f.write(b"partial")
            raise RuntimeError("the export failed")
    assert os.listdir(tmp_path) == ["f"]
