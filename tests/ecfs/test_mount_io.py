"""Real tools over the mount: fio with verification across a remount,
ext4 on a mapped image (with OSDs lost), discard, and a crash."""
import hashlib
import os
import shutil
import signal
import subprocess

import pytest

from ecfs import mounts
from ecfs.fuse import HAS_FALLOCATE

from ..backend.util import check_parity
from .mountutil import losetup_detach_all_for, mounted, need_root, wait_for
from .util import ecfs, ecfs_json

MiB = 1 << 20
needs_discard = pytest.mark.skipif(
    not HAS_FALLOCATE, reason="stock pyfuse3 has no fallocate handler (scripts/install builds "
                              "the patched one)")


@pytest.fixture
def store(tmp_path):
    need_root()
    st = tmp_path / "s"
    ecfs(st, "init")
    yield st
    losetup_detach_all_for(str(tmp_path))


def fio(*args, cwd):
    p = subprocess.run(["fio", "--output-format=normal", *args], capture_output=True, text=True,
                       cwd=cwd, timeout=300)
    assert p.returncode == 0 and "err= 0" in p.stdout, p.stdout + p.stderr
    return p.stdout


FIO_JOBS = [
    # (name, rw, bs, size, iodepth)
    ("rand4k", "randwrite", "4k", "8M", 8),
    ("seq1m", "write", "1M", "24M", 4),
]


def test_fio_verify_survives_a_remount(store, tmp_path):
    mnt = tmp_path / "mnt"
    ecfs(store, "rbd", "create", "f", "--size", "64")
    jobs = []
    for i, (name, rw, bs, size, depth) in enumerate(FIO_JOBS):
        jobs.append([f"--name={name}", f"--filename={mnt / 'f'}", f"--offset={i * 32}M",
                     f"--size={size}", f"--rw={rw}", f"--bs={bs}", "--ioengine=libaio",
                     f"--iodepth={depth}", "--direct=1", "--verify=crc32c",
                     "--randseed=1234", "--fsync_on_close=1"])
    with mounted(store, mnt):
        for job in jobs:
            fio(*job, "--do_verify=1", "--verify_fatal=1", cwd=tmp_path)
    with mounted(store, mnt):
        for job in jobs:
            fio(*job, "--verify_only", "--verify_fatal=1", cwd=tmp_path)
    check_parity(str(store))


def _tree(root):
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            p = os.path.join(d, f)
            out[os.path.relpath(p, root)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return out


def _mkfs_and_fill(store, mnt, fsdir, tmp_path):
    dev = ecfs(store, "rbd", "map", "disk").stdout.decode().strip()
    assert dev.startswith("/dev/loop")
    shown = ecfs_json(store, "rbd", "showmapped")
    assert [(x["name"], x["device"]) for x in shown] == [("disk", dev)]
    subprocess.run(["mkfs.ext4", "-q", "-F", dev], check=True)
    os.makedirs(fsdir, exist_ok=True)
    subprocess.run(["mount", dev, fsdir], check=True)
    try:
        for i in range(12):
            os.makedirs(fsdir / f"d{i % 3}", exist_ok=True)
            (fsdir / f"d{i % 3}" / f"f{i}").write_bytes(os.urandom(37_000 * (i + 1)))
        big = fsdir / "big"
        big.write_bytes(os.urandom(6 * MiB))
        tree = _tree(fsdir)
    finally:
        subprocess.run(["umount", fsdir], check=True)
    ecfs(store, "rbd", "unmap", dev)
    assert ecfs_json(store, "rbd", "showmapped") == []
    return tree


def _check_fs(store, fsdir, tree):
    dev = ecfs(store, "rbd", "map", "disk").stdout.decode().strip()
    try:
        p = subprocess.run(["e2fsck", "-fn", dev], capture_output=True, text=True)
        assert p.returncode == 0, p.stdout + p.stderr
        subprocess.run(["mount", "-o", "ro", dev, fsdir], check=True)
        try:
            assert _tree(fsdir) == tree
        finally:
            subprocess.run(["umount", fsdir], check=True)
    finally:
        ecfs(store, "rbd", "unmap", dev, check=False)


def test_ext4_on_a_mapped_image_survives_lost_osds(store, tmp_path):
    mnt, fsdir = tmp_path / "mnt", tmp_path / "fs"
    ecfs(store, "rbd", "create", "disk", "--size", "64")
    with mounted(store, mnt):
        tree = _mkfs_and_fill(store, mnt, fsdir, tmp_path)
    with mounted(store, mnt):
        _check_fs(store, fsdir, tree)
    # lose one OSD directory, then M of them: still clean, still matching
    for lost in (["osd.1"], ["osd.1", "osd.4"]):
        for d in lost:
            if (store / d).exists():
                shutil.move(store / d, tmp_path / f"gone-{d}")
        with mounted(store, mnt):
            st = ecfs_json(store, "status")
            assert st["health"]["status"] != "HEALTH_OK"
            _check_fs(store, fsdir, tree)


def test_zero_writes_and_sparsify_free_space(store, tmp_path):
    mnt = tmp_path / "mnt"
    ecfs(store, "rbd", "create", "z", "--size", "32")
    with mounted(store, mnt):
        with open(mnt / "z", "r+b") as f:
            f.write(os.urandom(16 * MiB))
            f.flush()
            assert ecfs_json(store, "rbd", "du", "z")["images"][0]["used_size"] == 16 * MiB
            f.seek(4 * MiB)
            f.write(bytes(8 * MiB))          # zeros over two whole objects: deleted
            f.flush()
            assert ecfs_json(store, "rbd", "du", "z")["images"][0]["used_size"] == 8 * MiB
            f.seek(0)
            f.write(bytes(4 * MiB - 4096))   # not a whole object: stays until sparsify
            f.flush()
    ecfs(store, "rbd", "sparsify", "z")
    du = ecfs_json(store, "rbd", "du", "z")["images"][0]["used_size"]
    assert du == 8 * MiB                      # object 0 keeps its last page
    data = ecfs(store, "rbd", "export", "z", "-").stdout
    assert data[:4 * MiB - 4096] == bytes(4 * MiB - 4096) and data[4 * MiB:12 * MiB] == \
        bytes(8 * MiB)


@needs_discard
def test_discard_frees_objects(store, tmp_path):
    mnt, fsdir = tmp_path / "mnt", tmp_path / "fs"
    ecfs(store, "rbd", "create", "d", "--size", "1024")
    ecfs(store, "rbd", "create", "disk", "--size", "128")
    with mounted(store, mnt):
        with open(mnt / "d", "r+b") as f:
            for off in range(0, 64 * MiB, 4 * MiB):
                f.seek(off)
                f.write(os.urandom(4096))
        assert ecfs_json(store, "rbd", "du", "d")["images"][0]["used_size"] == 64 * MiB
        subprocess.run(["fallocate", "--punch-hole", "--offset", str(8 * MiB), "--length",
                        str(8 * MiB), mnt / "d"], check=True)
        assert ecfs_json(store, "rbd", "du", "d")["images"][0]["used_size"] == 56 * MiB
        dev = ecfs(store, "rbd", "map", "d").stdout.decode().strip()
        try:
            subprocess.run(["blkdiscard", dev], check=True)
        finally:
            ecfs(store, "rbd", "unmap", dev)
        assert ecfs_json(store, "rbd", "du", "d")["images"][0]["used_size"] == 0
        # ext4: delete a big file, fstrim, du drops
        dev = ecfs(store, "rbd", "map", "disk").stdout.decode().strip()
        try:
            subprocess.run(["mkfs.ext4", "-q", "-F", "-E", "nodiscard", dev], check=True)
            os.makedirs(fsdir, exist_ok=True)
            subprocess.run(["mount", dev, fsdir], check=True)
            try:
                (fsdir / "big").write_bytes(os.urandom(64 * MiB))
                os.sync()
                before = ecfs_json(store, "rbd", "du", "disk")["images"][0]["used_size"]
                os.unlink(fsdir / "big")
                os.sync()                    # ext4 frees the blocks when the journal commits
                subprocess.run(["fstrim", fsdir], check=True)
                after = ecfs_json(store, "rbd", "du", "disk")["images"][0]["used_size"]
                # objects ext4 still uses in part stay; the rest are deleted
                assert after <= before - 32 * MiB, (before, after)
            finally:
                subprocess.run(["umount", fsdir], check=True)
        finally:
            ecfs(store, "rbd", "unmap", dev)


def test_sigkill_during_fio_keeps_fsynced_data_and_parity(store, tmp_path):
    mnt = tmp_path / "mnt"
    ecfs(store, "rbd", "create", "k", "--size", "64")
    with mounted(store, mnt) as pid:
        # a first pass, fsynced and verified: it must survive the crash
        base = [f"--filename={mnt / 'k'}", "--size=16M", "--bs=64k", "--ioengine=libaio",
                "--iodepth=4", "--direct=1", "--verify=crc32c", "--randseed=99"]
        fio("--name=base", "--rw=randwrite", *base, "--fsync_on_close=1", "--do_verify=1",
            cwd=tmp_path)
        # then a writer over another range while the mount is killed
        p = subprocess.Popen(["fio", "--name=busy", f"--filename={mnt / 'k'}", "--offset=32M",
                              "--size=16M", "--rw=randwrite", "--bs=4k", "--ioengine=libaio",
                              "--iodepth=8", "--direct=1", "--fsync=8", "--time_based",
                              "--runtime=60"], cwd=tmp_path, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
        try:
            wait_for(lambda: ecfs_json(store, "status")["counters"]["client_write_ops"] > 300,
                     timeout=60, what="writes under way")
            os.kill(pid, signal.SIGKILL)
            wait_for(lambda: not mounts.pid_alive(pid), what="mount killed")
        finally:
            p.kill()
            p.wait()
    with mounted(store, mnt):
        fio("--name=base", "--rw=randwrite", *base, "--verify_only", "--verify_fatal=1",
            cwd=tmp_path)
    check_parity(str(store))


def test_unavailable_data_is_eio_never_zeros(store, tmp_path):
    """The OSDs holding object 10's info shards down (HEALTH_ERR): reading
    that object through the mount fails with EIO, and the CLI says
    'unavailable', never zeros and never 'does not exist'."""
    from rbdlike.header import data_object
    from rbdlike.directory import load as load_dir
    from backend.objectstore import ObjectStore
    mnt = tmp_path / "mnt"
    img = tmp_path / "img.raw"
    img.write_bytes(os.urandom(48 * MiB))
    ecfs(store, "rbd", "import", str(img), "i")
    with ObjectStore(str(store), readonly=True) as s:
        name = data_object(load_dir(s)["i"], 10)
        loc = s.osdmap.place(name, s.width)
        victims = sorted({loc[j] for j in s.info_shards})
    for osd in victims:
        ecfs(store, "osd", "down", str(osd))
    assert ecfs_json(store, "status")["health"]["status"] == "HEALTH_ERR"
    p = ecfs(store, "rados", "stat", name, check=False)
    assert p.returncode != 0 and b"unavailable" in p.stderr, p.stderr
    with mounted(store, mnt):
        p = subprocess.run(["dd", f"if={mnt / 'i'}", "of=/dev/null", "bs=4M", "skip=10",
                            "count=1", "iflag=direct"], capture_output=True, text=True)
        assert p.returncode != 0 and "Input/output error" in p.stderr, p.stderr
