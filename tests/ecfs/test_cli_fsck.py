"""ecfs fsck as an admin runs it on an unmounted store: what it finds,
what --repair fixes, and that it refuses a store in use."""
import glob
import os

from backend.objectstore import ObjectStore

from .util import assert_user_error, ecfs, ecfs_json, store_with_images

MiB = 1 << 20


def test_fsck_finds_and_repairs_shards_maps_and_orphans(tmp_path):
    st, img = store_with_images(tmp_path, 8 * MiB, "i")
    ecfs(st, "rbd", "create", "sparse", "--size", "64")
    out = ecfs(st, "fsck").stdout.decode()
    assert out.strip().endswith("clean"), out
    iid = ecfs_json(st, "rbd", "info", "i")["id"]
    sid = ecfs_json(st, "rbd", "info", "sparse")["id"]
    # a lost shard file, an object the map does not know of, and the
    # objects of an image whose directory entry is gone
    victim = sorted(glob.glob(str(st / "osd.*" / "objects" / "*" / f"rbd_data.{iid}.*.s1")))[0]
    os.unlink(victim)
    ecfs(st, "rados", "put", f"rbd_data.{sid}.0000000000000003", "-", input=b"x" * 4096)
    ecfs(st, "rados", "put", "rbd_data.0123456789ab.0000000000000000", "-", input=b"o" * 100)
    ecfs(st, "rados", "put", "rbd_data.not-an-image", "-", input=b"mine")   # a user's object
    p = ecfs(st, "fsck", check=False)
    assert p.returncode == 4
    out = p.stdout.decode()
    assert "shard 1 on osd." in out and "data file missing" in out
    assert "exists but the map says nonexistent" in out
    assert "rbd_data.0123456789ab.0000000000000000" in out and "belongs to no image" in out
    assert "not-an-image" not in out
    assert_user_error(p, "fsck --repair")
    out = ecfs(st, "fsck", "--repair").stdout.decode()
    assert "fixed: removed" in out and "object map rebuilt" in out and "rebuilt from" in out
    assert ecfs(st, "fsck").stdout.decode().strip().endswith("clean")
    assert ecfs(st, "scrub", "--full").returncode == 0
    ecfs(st, "rbd", "export", "i", str(tmp_path / "out.raw"))
    assert (tmp_path / "out.raw").read_bytes() == img
    assert ecfs(st, "rados", "get", "rbd_data.not-an-image", "-").stdout == b"mine"


def test_fsck_refuses_a_store_in_use(tmp_path):
    st = tmp_path / "s"
    ecfs(st, "init")
    s = ObjectStore(str(st))
    try:
        assert_user_error(ecfs(st, "fsck", check=False), "in use")
    finally:
        s.close()
    assert ecfs(st, "fsck").returncode == 0


def test_fsck_keeps_every_other_opener_out_until_it_ends(tmp_path):
    """No check-then-open window: the store fsck opens stays its own, so a
    mount or command started meanwhile waits for it to end."""
    import threading
    st = tmp_path / "s"
    ecfs(st, "init")
    alone = ObjectStore(str(st), alone=True)
    opened = []
    t = threading.Thread(target=lambda: opened.append(ObjectStore(str(st))))
    try:
        t.start()
        t.join(1.0)
        assert t.is_alive() and not opened       # waiting for fsck's store to close
        assert_user_error(ecfs(st, "fsck", check=False), "in use")
    finally:
        alone.close()
    t.join(30)
    assert opened
    opened[0].close()
