"""ecfs osd rebuild / replace as an operator uses them: a wiped disk, a new
directory for a lost one, a backfill killed and run again, and a rebuild
under a mount that keeps serving fio with verification."""
import os
import shutil
import signal
import subprocess

import pytest

from .mountutil import mounted, need_root
from .util import _cmd, assert_user_error, ecfs, ecfs_json, ecfs_popen, store_with_images
from ..waiting import wait_for

MiB = 1 << 20


def _store(tmp_path, size=24 * MiB):
    return store_with_images(tmp_path, size, "i")


def _export(st, tmp_path):
    out = tmp_path / "out.raw"
    if out.exists():
        out.unlink()
    ecfs(st, "rbd", "export", "i", str(out))
    return out.read_bytes()


def _lose_two_others(st, keep):
    others = [i for i in range(6) if i != keep][:2]
    for i in others:
        ecfs(st, "osd", "down", str(i))
    return others


def test_rebuild_a_wiped_osd_then_any_two_others_may_fail(tmp_path):
    st, img = _store(tmp_path)
    shutil.rmtree(st / "osd.3" / "objects")
    os.mkdir(st / "osd.3" / "objects")
    out = ecfs(st, "osd", "rebuild", "3").stdout.decode()
    assert "osd.3 rebuilt" in out and "marked up" in out
    assert ecfs_json(st, "status")["health"]["status"] == "HEALTH_OK"
    assert ecfs(st, "scrub", "--deep").returncode == 0
    _lose_two_others(st, 3)
    assert _export(st, tmp_path) == img


def test_replace_a_lost_osd_with_a_new_directory(tmp_path):
    st, img = _store(tmp_path)
    shutil.rmtree(st / "osd.4")
    assert "osd.4" in ecfs_json(st, "status")["health"]["reason"]
    assert_user_error(ecfs(st, "osd", "rebuild", "4", check=False), "osd replace 4")
    new = tmp_path / "disk2" / "osd4"
    out = ecfs(st, "osd", "replace", "4", "--dir", str(new)).stdout.decode()
    assert "osd.4 replaced" in out
    osds = {o["id"]: o for o in ecfs_json(st, "osd", "ls")}
    assert osds[4]["path"] == str(new) and osds[4]["up"]
    assert ecfs(st, "scrub", "--full").returncode == 0
    _lose_two_others(st, 4)
    assert _export(st, tmp_path) == img
    # a non-empty directory is refused, nothing changed
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x").write_text("x")
    assert_user_error(ecfs(st, "osd", "replace", "5", "--dir", str(busy), check=False),
                      "not empty")


def test_a_killed_rebuild_goes_on_where_it_stopped(tmp_path):
    st, img = _store(tmp_path, size=40 * MiB)
    shutil.rmtree(st / "osd.1" / "objects")
    os.mkdir(st / "osd.1" / "objects")
    prog = st / "backfill" / "osd.1"
    p = subprocess.Popen(_cmd(st, ["osd", "rebuild", "1", "--max-rate", "2M"]),
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for(lambda: prog.exists() and prog.read_bytes().count(b"\0") >= 3,
                 what="three objects backfilled")
    finally:
        p.kill()
        p.wait(30)
    assert p.returncode == -signal.SIGKILL
    st_ = ecfs_json(st, "status")
    assert "backfilling" in st_["health"]["reason"], st_["health"]
    [bf] = st_["backfill"]
    done = prog.read_bytes().count(b"\0")
    nobj = len(ecfs(st, "rados", "ls").stdout.split())
    assert (bf["osd"], bf["done"], bf["total"]) == (1, done, nobj), bf
    assert 0 < bf["percent"] < 100
    text = ecfs(st, "status").stdout.decode()
    assert f"backfill: osd.1 {done}/{bf['total']} objects" in text, text
    out = ecfs(st, "osd", "rebuild", "1").stdout.decode()
    done_before = int(out.split("(")[1].split()[0])
    assert done_before >= 3, out
    assert not prog.exists()
    assert ecfs_json(st, "status")["backfill"] == []
    assert ecfs(st, "scrub", "--deep").returncode == 0
    _lose_two_others(st, 1)
    assert _export(st, tmp_path) == img


def _fio_store(tmp_path):
    """A default store with a 32 MiB image 'f', its mount point, and a fio
    job writing 24 MiB of it at random with crc32c verify blocks."""
    need_root()
    st = tmp_path / "s"
    ecfs(st, "init")
    ecfs(st, "rbd", "create", "f", "--size", "32")
    mnt = tmp_path / "mnt"
    job = ["--name=v", f"--filename={mnt / 'f'}", "--size=24M", "--rw=randwrite", "--bs=16k",
           "--ioengine=psync", "--direct=1", "--verify=crc32c", "--randseed=7",
           "--output-format=terse"]
    return st, mnt, job


def test_rebuild_while_a_mount_serves_fio_with_verify(tmp_path):
    st, mnt, job = _fio_store(tmp_path)
    with mounted(st, mnt):
        subprocess.run(["fio", *job, "--do_verify=0"], check=True, capture_output=True,
                       timeout=300, cwd=tmp_path)
        shutil.rmtree(st / "osd.2" / "objects")
        os.mkdir(st / "osd.2" / "objects")
        writer = subprocess.Popen(["fio", *job, "--do_verify=0", "--time_based", "--runtime=4",
                                   "--randseed=8", "--offset=0"], stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, cwd=tmp_path)
        try:
            ecfs(st, "osd", "rebuild", "2")
        finally:
            assert writer.wait(120) == 0, writer.stderr.read()
        # what the second job wrote last is what must read back: verify it
        subprocess.run(["fio", *job, "--do_verify=0", "--randseed=9"], check=True,
                       capture_output=True, timeout=300, cwd=tmp_path)
        v = subprocess.run(["fio", *job, "--verify_only", "--randseed=9"],
                           capture_output=True, text=True, timeout=300, cwd=tmp_path)
        assert v.returncode == 0, v.stdout + v.stderr
    health = ecfs_json(st, "status")["health"]
    assert health["status"] == "HEALTH_OK", health      # osd.2 stayed up, nothing behind
    p = ecfs(st, "scrub", "--deep", check=False)
    assert p.returncode == 0, p.stdout.decode()
    _lose_two_others(st, 2)
    with mounted(st, mnt):
        v = subprocess.run(["fio", *job, "--verify_only", "--randseed=9"],
                           capture_output=True, text=True, timeout=300, cwd=tmp_path)
        assert v.returncode == 0, v.stdout + v.stderr


def test_a_rebuild_that_cannot_succeed_drops_nothing(tmp_path):
    """With two other OSDs down no object of a 4+2 pool can be rebuilt:
    'osd rebuild 0' fails, leaves every shard of osd.0 as it was, 'osd up 0'
    will not call the half-done OSD current, and once the others are back
    the rebuild goes through."""
    st, img = _store(tmp_path, size=8 * MiB)
    before = {p: open(p, "rb").read() for p in
              map(str, (st / "osd.0" / "objects").rglob("*")) if os.path.isfile(p)}
    ecfs(st, "osd", "down", "1")
    ecfs(st, "osd", "down", "2")
    p = ecfs(st, "osd", "rebuild", "0", check=False)
    assert_user_error(p, "could not be rebuilt")
    after = {p: open(p, "rb").read() for p in before}
    assert after == before, "the rebuild dropped shards it could not replace"
    assert_user_error(ecfs(st, "osd", "up", "0", check=False), "being backfilled")
    ecfs(st, "osd", "up", "1")
    ecfs(st, "osd", "up", "2")
    ecfs(st, "osd", "rebuild", "0")
    assert ecfs_json(st, "status")["health"]["status"] == "HEALTH_OK"
    _lose_two_others(st, 0)
    assert _export(st, tmp_path) == img


def test_replace_with_a_bad_directory_changes_nothing(tmp_path):
    st, _ = _store(tmp_path, size=4 * MiB)
    for bad in (st / "osd.3", st, st / "osd.0" / "x"):
        assert ecfs(st, "osd", "replace", "5", "--dir", str(bad), check=False).returncode != 0
        assert ecfs_json(st, "status")["health"]["status"] == "HEALTH_OK", bad


def test_add_and_rm_while_a_mount_serves_fio_with_verify(tmp_path):
    """osd add, then osd rm, online: the mount follows each new placement
    mid-run (its writes planned on the old map are planned again), the
    moved shards are copied and then leave their old OSDs, and the new
    set carries the data with two OSDs gone."""
    st, mnt, job = _fio_store(tmp_path)
    with mounted(st, mnt):
        subprocess.run(["fio", *job, "--do_verify=0"], check=True, capture_output=True,
                       timeout=300, cwd=tmp_path)
        for argv, seed in ((["add"], 8), (["rm", "2"], 10)):
            writer = subprocess.Popen(["fio", *job, "--do_verify=0", "--time_based",
                                       "--runtime=4", f"--randseed={seed}", "--offset=0"],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                      cwd=tmp_path)
            try:
                out = ecfs(st, "osd", *argv).stdout.decode()
            finally:
                assert writer.wait(120) == 0, writer.stderr.read()
            assert ("added osd.6" if argv == ["add"] else "removed osd.2") in out, out
            assert "objects copied" in out, out
        subprocess.run(["fio", *job, "--do_verify=0", "--randseed=9"], check=True,
                       capture_output=True, timeout=300, cwd=tmp_path)
        v = subprocess.run(["fio", *job, "--verify_only", "--randseed=9"],
                           capture_output=True, text=True, timeout=300, cwd=tmp_path)
        assert v.returncode == 0, v.stdout + v.stderr
    osds = ecfs_json(st, "osd", "ls")
    assert [o["id"] for o in osds] == [0, 1, 3, 4, 5, 6] and all(o["up"] for o in osds)
    assert not (st / "osd.2").exists()
    assert ecfs_json(st, "status")["health"]["status"] == "HEALTH_OK"
    p = ecfs(st, "scrub", "--deep", check=False)
    assert p.returncode == 0, p.stdout.decode()
    assert ecfs(st, "fsck", check=False).returncode == 0
    for i in (0, 6):                 # the new one among the two lost: the rest suffice
        ecfs(st, "osd", "down", str(i))
    with mounted(st, mnt):
        v = subprocess.run(["fio", *job, "--verify_only", "--randseed=9"],
                           capture_output=True, text=True, timeout=300, cwd=tmp_path)
        assert v.returncode == 0, v.stdout + v.stderr


def test_add_on_a_directory_that_is_not_empty_changes_nothing(tmp_path):
    st, img = _store(tmp_path)
    used = tmp_path / "used"
    used.mkdir()
    (used / "file").write_text("x")
    before = (st / "pool.json").read_text()
    assert_user_error(ecfs(st, "osd", "add", "--dir", str(used), check=False), "not empty")
    assert (st / "pool.json").read_text() == before
    assert len(ecfs_json(st, "osd", "ls")) == 6


@pytest.mark.parametrize("at", [1, 2])
def test_a_killed_add_or_rm_is_finished_by_running_it_again(tmp_path, at):
    """Killed after the copy (at=1: nothing switched, the copies unused) or
    after the switch (at=2: the old copies left): the store stays whole and
    running the command again ends where one uninterrupted run would."""
    st, img = _store(tmp_path)
    if at == 1:
        ecfs(st, "osd", "down", "2")
        assert_user_error(ecfs(st, "osd", "add", check=False), "every OSD up")
        assert len(ecfs_json(st, "osd", "ls")) == 6
        ecfs(st, "osd", "up", "2")
    for argv, ids in ((["add"], list(range(7))), (["rm", "0"], list(range(1, 7)))):
        was = [o["id"] for o in ecfs_json(st, "osd", "ls")]
        p = ecfs_popen(st, "osd", *argv, env={"ECFS_CRASH_AT": str(at)},
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        assert p.wait(120) == -signal.SIGKILL
        assert [o["id"] for o in ecfs_json(st, "osd", "ls")] == (was if at == 1 else ids)
        status = ecfs_json(st, "status")
        assert status["health"]["status"] == "HEALTH_OK"
        assert status["rebalance"]["op"] == argv[0] and not status["rebalance"]["running"]
        assert "interrupted" in ecfs(st, "status").stdout.decode()
        assert _export(st, tmp_path) == img
        if at == 1 or argv[0] == "rm":
            ecfs(st, "osd", *argv)
        assert [o["id"] for o in ecfs_json(st, "osd", "ls")] == ids
    assert not (st / "osd.0").exists() and not (st / "rebalance.json").exists()
    assert ecfs(st, "scrub", "--deep", check=False).returncode == 0
    assert ecfs(st, "fsck", check=False).returncode == 0
    for i in (1, 6):
        ecfs(st, "osd", "down", str(i))
    assert _export(st, tmp_path) == img


def test_rm_refuses_what_would_leave_too_few_osds(tmp_path):
    st, img = _store(tmp_path)
    before = (st / "pool.json").read_text()
    assert_user_error(ecfs(st, "osd", "rm", "1", check=False), "K+M=6 needs that many OSDs")
    assert_user_error(ecfs(st, "osd", "rm", "9", check=False), "no osd.9")
    assert (st / "pool.json").read_text() == before


def test_fsck_repair_settles_an_interrupted_add_or_rm(tmp_path):
    """fsck names an add or rm killed mid-way, and --repair settles it: an
    add killed before its switch is dropped (the pool as before it, its
    directory emptied), an rm killed after its switch is finished."""
    st, img = _store(tmp_path)
    for argv, at, ids in ((["add"], 1, list(range(6))), (["rm", "1"], 2, [0, 2, 3, 4, 5])):
        if argv == ["rm", "1"]:
            ecfs(st, "osd", "add")
        p = ecfs_popen(st, "osd", *argv, env={"ECFS_CRASH_AT": str(at)},
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        assert p.wait(120) == -signal.SIGKILL
        out = ecfs(st, "fsck", check=False)
        assert out.returncode == 4 and "was interrupted" in out.stdout.decode(), out.stdout
        out = ecfs(st, "fsck", "--repair", check=False)
        assert out.returncode == 0, out.stdout.decode()
        assert ecfs(st, "fsck").stdout.decode().strip().endswith("clean")
        assert [o["id"] for o in ecfs_json(st, "osd", "ls")] == (ids if at == 1 else
                                                                  [0, 2, 3, 4, 5, 6])
        assert ecfs_json(st, "status")["rebalance"] is None
    assert not (st / "osd.1").exists()
    assert _export(st, tmp_path) == img
