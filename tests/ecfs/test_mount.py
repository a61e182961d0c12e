"""The FUSE mount as users touch it: files, errnos, snapshots, lifecycle."""
import errno
import os
import signal
import subprocess

import pytest

from ecfs import mounts

from .mountutil import force_unmount, mount_pid, mounted, need_root, wait_for
from .util import assert_user_error, ecfs, ecfs_json

MiB = 1 << 20


@pytest.fixture
def store(tmp_path):
    need_root()
    st = tmp_path / "s"
    ecfs(st, "init")
    return st


def test_images_as_files(store, tmp_path):
    mnt = tmp_path / "mnt"
    ecfs(store, "rbd", "create", "demo", "--size", "64")
    src = tmp_path / "disk.img"
    src.write_bytes(os.urandom(5 * MiB + 123))
    with mounted(store, mnt):
        assert sorted(os.listdir(mnt)) == [".snap", "demo"]
        assert os.stat(mnt / "demo").st_size == 64 * MiB
        assert os.stat(mnt / "demo").st_blocks == 0             # nothing allocated yet
        subprocess.run(["cp", src, mnt / "new"], check=True)   # create = new image
        assert (mnt / "new").read_bytes() == src.read_bytes()
        assert ecfs_json(store, "rbd", "info", "new")["size"] == 5 * MiB + 123
        # two objects per the map, counted up to the image size
        assert os.stat(mnt / "new").st_blocks == (5 * MiB + 123) // 512
        # truncate = resize, both ways
        os.truncate(mnt / "new", 9 * MiB)
        assert ecfs_json(store, "rbd", "info", "new")["size"] == 9 * MiB
        os.truncate(mnt / "new", MiB)
        assert (mnt / "new").read_bytes() == src.read_bytes()[:MiB]
        # a write past the end grows the image
        with open(mnt / "new", "r+b") as f:
            f.seek(3 * MiB)
            f.write(b"tail")
        assert os.stat(mnt / "new").st_size == 3 * MiB + 4
        os.rename(mnt / "new", mnt / "moved")
        assert sorted(os.listdir(mnt)) == [".snap", "demo", "moved"]
        assert ecfs(store, "rbd", "ls").stdout.decode().split() == ["demo", "moved"]
        os.unlink(mnt / "moved")
        assert ecfs(store, "rbd", "ls").stdout.decode().split() == ["demo"]
        # statfs: usable capacity of the OSDs' file system, times K/(K+M)
        v, raw = os.statvfs(mnt), os.statvfs(store / "osd.0")
        assert abs(v.f_bavail * v.f_frsize - raw.f_bavail * raw.f_frsize * 4 // 6) < 64 * MiB


def test_errnos_users_expect(store, tmp_path):
    mnt = tmp_path / "mnt"
    ecfs(store, "rbd", "create", "img", "--size", "4")
    with mounted(store, mnt):
        for fn, err in ((lambda: os.mkdir(mnt / "d"), errno.EPERM),
                        (lambda: os.symlink("img", mnt / "l"), errno.EPERM),
                        (lambda: os.chmod(mnt / "img", 0o755), errno.EPERM),
                        (lambda: os.setxattr(mnt / "img", "user.x", b"1"), errno.ENOTSUP),
                        (lambda: os.getxattr(mnt / "img", "user.x"), errno.EOPNOTSUPP),
                        (lambda: open(mnt / ".snap" / "x", "w"), errno.EROFS),
                        (lambda: open(mnt / "a@b", "w"), errno.EINVAL),
                        (lambda: open(mnt / ("n" * 251), "w"), errno.ENAMETOOLONG),
                        (lambda: os.truncate(mnt / "img", 1 << 51), errno.EFBIG),
                        (lambda: os.stat(mnt / "nosuch"), errno.ENOENT)):
            with pytest.raises(OSError) as e:
                fn()
            assert e.value.errno == err, fn
        # mode, owner and mtime are kept with the image, across mounts
        os.chmod(mnt / "img", 0o600)
        os.chown(mnt / "img", 1234, 5678)
        os.utime(mnt / "img", ns=(1_600_000_000_000_000_000, 1_600_000_000_000_000_000))
    with mounted(store, mnt):
        st = os.stat(mnt / "img")
        assert (st.st_mode & 0o777, st.st_uid, st.st_gid) == (0o600, 1234, 5678)
        assert st.st_mtime_ns == 1_600_000_000_000_000_000
        assert os.listxattr(mnt / "img") == []
        # rm is EBUSY while the image has snapshots
        ecfs(store, "rbd", "snap", "create", "img@s")
        with pytest.raises(OSError) as e:
            os.unlink(mnt / "img")
        assert e.value.errno == errno.EBUSY
        # a snapshot is a read-only view: renaming it out (or in) is EROFS,
        # so mv does not fall back to copying it into a new image
        p = subprocess.run(["mv", mnt / ".snap" / "img" / "s", mnt / "copy"],
                           capture_output=True, text=True)
        assert p.returncode != 0 and "Read-only" in p.stderr, p.stderr
        assert sorted(os.listdir(mnt)) == [".snap", "img"]


def test_snapshot_view_through_the_mount(store, tmp_path):
    mnt = tmp_path / "mnt"
    ecfs(store, "rbd", "create", "v", "--size", "16")
    first, second = os.urandom(MiB), os.urandom(MiB)
    with mounted(store, mnt):
        with open(mnt / "v", "r+b") as f:
            f.write(first)
            f.flush()
            os.fsync(f.fileno())
            ecfs(store, "rbd", "snap", "create", "v@s1")   # proxied to this mount
            f.seek(0)
            f.write(second)
        assert sorted(os.listdir(mnt / ".snap")) == ["v"]
        assert os.listdir(mnt / ".snap" / "v") == ["s1"]
        assert (mnt / ".snap" / "v" / "s1").read_bytes()[:MiB] == first
        assert (mnt / "v").read_bytes()[:MiB] == second
        with pytest.raises(OSError) as e:
            open(mnt / ".snap" / "v" / "s1", "r+b")
        assert e.value.errno == errno.EROFS


def test_read_only_mount(store, tmp_path):
    mnt = tmp_path / "mnt"
    ecfs(store, "rbd", "create", "r", "--size", "4")
    with mounted(store, mnt, "-o", "ro"):
        assert (mnt / "r").read_bytes() == bytes(4 * MiB)
        for fn in (lambda: open(mnt / "r", "r+b"), lambda: open(mnt / "n", "w"),
                   lambda: os.unlink(mnt / "r")):
            with pytest.raises(OSError) as e:
                fn()
            assert e.value.errno == errno.EROFS


def test_exclusive_mount_refuses_other_writers_at_open(store, tmp_path):
    m1, m2 = tmp_path / "m1", tmp_path / "m2"
    ecfs(store, "rbd", "create", "x", "--size", "4")
    with mounted(store, m1, "--exclusive"), mounted(store, m2):
        with open(m1 / "x", "r+b") as f:
            f.write(b"mine")
            f.flush()
            with pytest.raises(OSError) as e:
                open(m2 / "x", "r+b")
            assert e.value.errno == errno.EBUSY
            assert (m2 / "x").read_bytes()[:4] == b"mine"    # reading is fine
        # closed: the lock goes back once m1 has seen the release, which the
        # kernel sends after close() returned (FUSE RELEASE is asynchronous)
        def opened():
            try:
                return open(m2 / "x", "r+b")
            except OSError as e:
                if e.errno != errno.EBUSY:
                    raise
                return None
        g = wait_for(opened, what="m1 handed the lock back after the close")
        with g:
            g.write(b"your")
        assert (m1 / "x").read_bytes()[:4] == b"your"


def test_two_mounts_hand_the_lock_over(store, tmp_path):
    m1, m2 = tmp_path / "m1", tmp_path / "m2"
    ecfs(store, "rbd", "create", "h", "--size", "4")
    with mounted(store, m1), mounted(store, m2):
        with open(m1 / "h", "r+b") as f, open(m2 / "h", "r+b") as g:
            f.write(b"one")
            f.flush()
            g.write(b"two")          # m1 hands the lock over
            g.flush()
            f.seek(0)
            f.write(b"ONE")          # and back
            f.flush()
        assert (m2 / "h").read_bytes()[:3] == b"ONE"


def test_lifecycle_umount_refusals_and_stale_mounts(store, tmp_path):
    mnt = tmp_path / "mnt"
    os.makedirs(mnt)
    ecfs(store, "rbd", "create", "c", "--size", "4")
    with mounted(store, mnt) as pid:
        assert_user_error(ecfs(store, "mount", mnt, check=False), "already mounted")
        with open(mnt / "c", "r+b") as f:
            f.write(b"kept")
        # an outside fusermount3 -u: the process flushes and exits by itself
        subprocess.run(["fusermount3", "-u", mnt], check=True)
        wait_for(lambda: not mounts.pid_alive(pid), what="mount process exit")
    assert ecfs(store, "rbd", "export", "c", "-").stdout[:4] == b"kept"
    # SIGKILL leaves a stale mount point; the next mount clears it
    with mounted(store, mnt) as pid:
        with open(mnt / "c", "r+b") as f:
            f.write(b"KEPT")
            os.fsync(f.fileno())
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: not mounts.pid_alive(pid), what="killed")
        assert mounts.fstype(str(mnt)) == mounts.FSTYPE      # stale
        with mounted(store, mnt) as pid2:
            assert pid2 != pid
            assert (mnt / "c").read_bytes()[:4] == b"KEPT"
    assert mount_pid(mnt) is None
    assert_user_error(ecfs(store, "umount", mnt, check=False), "not an ecfs mount")
    for args, msg in ((("mount", tmp_path / "nosuch"), "does not exist"),
                      (("mount", mnt, "-o", "bogus"), "bogus"),
                      (("mount", mnt, "--cache-size", "12Q"), "cache size")):
        assert_user_error(ecfs(store, *args, check=False), msg)
    force_unmount(mnt)


def test_umount_refuses_while_busy_like_umount8(store, tmp_path):
    mnt = tmp_path / "mnt"
    ecfs(store, "rbd", "create", "b", "--size", "8")
    with mounted(store, mnt) as pid:
        fd = os.open(mnt / "b", os.O_RDWR)
        try:
            assert_user_error(ecfs(store, "umount", mnt, check=False), "busy")
            assert mounts.pid_alive(pid)
            os.pwrite(fd, b"still here", 0)        # the mount still serves
        finally:
            os.close(fd)
        dev = ecfs(store, "rbd", "map", "b").stdout.decode().strip()
        try:
            assert_user_error(ecfs(store, "umount", mnt, check=False), "busy")
        finally:
            ecfs(store, "rbd", "unmap", dev)
        ecfs(store, "umount", mnt)
        assert not mounts.pid_alive(pid)
    assert ecfs(store, "rbd", "export", "b", "-").stdout[:10] == b"still here"


def test_reopening_for_write_never_meets_its_own_closing_lock(store, tmp_path):
    mnt = tmp_path / "mnt"
    ecfs(store, "rbd", "create", "o", "--size", "4")
    with mounted(store, mnt):
        for i in range(150):
            fd = os.open(mnt / "o", os.O_RDWR)
            try:
                os.pwrite(fd, i.to_bytes(4, "little"), 0)
            finally:
                os.close(fd)
        assert (mnt / "o").read_bytes()[:4] == (149).to_bytes(4, "little")


def test_zeros_that_grow_an_image_are_not_stored(store, tmp_path):
    mnt = tmp_path / "mnt"
    with mounted(store, mnt):
        subprocess.run(["dd", "if=/dev/zero", f"of={mnt / 'z'}", "bs=1M", "count=16",
                        "status=none"], check=True)
        assert os.stat(mnt / "z").st_size == 16 * MiB
        assert ecfs_json(store, "rbd", "du", "z")["images"][0]["used_size"] == 0
        assert os.stat(mnt / "z").st_blocks == 0


def test_a_mapping_outlives_a_killed_mount_and_can_be_unmapped(store, tmp_path):
    mnt = tmp_path / "mnt"
    ecfs(store, "rbd", "create", "m", "--size", "8")
    with mounted(store, mnt) as pid:
        dev = ecfs(store, "rbd", "map", "m").stdout.decode().strip()
        try:
            os.kill(pid, signal.SIGKILL)
            wait_for(lambda: not mounts.pid_alive(pid), what="killed")
            with mounted(store, mnt):            # clears the stale mount point
                shown = ecfs_json(store, "rbd", "showmapped")
                assert [(x["name"], x["device"]) for x in shown] == [("m", dev)]
                ecfs(store, "rbd", "unmap", dev)
                assert ecfs_json(store, "rbd", "showmapped") == []
                dev = None
        finally:
            if dev:
                subprocess.run(["losetup", "-d", dev], capture_output=True)
    # a device that is not ours is refused, and left alone
    assert_user_error(ecfs(store, "rbd", "unmap", "/dev/loop7", check=False), "not an image")


def test_a_mount_point_at_or_around_the_store_is_refused(store, tmp_path):
    """Mounting over (or inside) the store, an OSD directory or the journal
    would make the mount reach its own store through itself and hang every
    access there: refused, one line, nothing mounted. So is an empty path."""
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    for mnt, what in ((tmp_path, "holds the store"), (store, "is the store"),
                      (store / "osd.3", "is osd.3"), (store / "rbd", "lies inside the store"),
                      ("", "empty")):
        p = ecfs(store, "mount", str(mnt), check=False, env={"PWD": str(tmp_path)})
        assert_user_error(p, what)
        if mnt:
            assert mounts.fstype(str(mnt)) is None
    p = subprocess.run(["python3", "-c", "import os; os.stat('/')"], timeout=10)  # nothing hung
    assert p.returncode == 0
    with mounted(store, outside):
        pass


def test_mtime_and_atime_follow_writes_and_reads(store, tmp_path):
    """ls -l and backup tools see an image's mtime move when it is written
    (and rbd info its modify_timestamp); the interval is 0 here, 60 s by
    default (librbd's rbd_mtime_update_interval)."""
    import time
    mnt = tmp_path / "mnt"
    ecfs(store, "rbd", "create", "t", "--size", "8")
    with mounted(store, mnt, env={"ECFS_TIMESTAMP_INTERVAL": "0"}):
        before = os.stat(mnt / "t").st_mtime_ns
        t0 = time.time_ns()
        fd = os.open(mnt / "t", os.O_WRONLY)
        try:
            os.pwrite(fd, b"w" * 4096, 0)
            os.fsync(fd)
        finally:
            os.close(fd)
        wait_for(lambda: os.stat(mnt / "t").st_mtime_ns >= t0 > before, what="mtime moved")
        t1 = time.time_ns()
        fd = os.open(mnt / "t", os.O_RDONLY | os.O_DIRECT)
        try:
            import mmap
            buf = mmap.mmap(-1, 4096)
            os.preadv(fd, [buf], 0)
        finally:
            os.close(fd)
        wait_for(lambda: os.stat(mnt / "t").st_atime_ns >= t1, what="atime moved")
    info = ecfs(store, "rbd", "info", "t").stdout.decode()
    assert "modify_timestamp:" in info and "access_timestamp:" in info


def test_file_created_in_the_mount_takes_the_pool_object_size(tmp_path):
    need_root()
    st, mnt = tmp_path / "s", tmp_path / "mnt"
    ecfs(st, "init", "--object-size", "1M")
    with mounted(st, mnt):
        (mnt / "new").write_bytes(os.urandom(3 * MiB))
    info = ecfs_json(st, "rbd", "info", "new")
    assert info["object_size"] == MiB and info["objects"] == 3


def test_a_change_elsewhere_invalidates_the_kernels_cache_of_an_open_file(store, tmp_path):
    """A mount reading an image sees another writer's bytes and a resize at
    once, though its open file had the old page and size cached (the
    kernel keeps pages of an open file with no timeout)."""
    m1, m2 = tmp_path / "m1", tmp_path / "m2"
    ecfs(store, "rbd", "create", "c", "--size", "4")
    with mounted(store, m1), mounted(store, m2):
        with open(m2 / "c", "rb") as r:
            assert r.read(4096) == bytes(4096)           # cached by m2's kernel inode
            with open(m1 / "c", "r+b") as w:             # m1 takes the lock
                w.write(b"new" * 1000)
                w.flush()
                os.fsync(w.fileno())
            r.seek(0)
            assert r.read(3000) == b"new" * 1000
            assert os.fstat(r.fileno()).st_size == 4 * MiB
            ecfs(store, "rbd", "resize", "c", "--size", "8")
            assert os.fstat(r.fileno()).st_size == 8 * MiB
