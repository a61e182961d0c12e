"""ecfs scrub / repair as an operator uses them, on stores damaged by hand:
what they name, their exit status, and the bytes read back after repair."""
import glob
import os
import threading

from backend import shardfile as sf

from .mountutil import mounted, need_root
from .util import assert_user_error, ecfs, ecfs_json, store_with_images

MiB = 1 << 20


def _store(tmp_path):
    return store_with_images(tmp_path, 16 * MiB, "a", "b")


def _shard_file(st, image_id, shard, objno=1):
    got = sorted(glob.glob(str(st / "osd.*" / "objects" / "*" /
                               f"rbd_data.{image_id}.{objno:016x}.s{shard}")))
    assert got, (image_id, shard)
    return got[0]


def _image_id(st, name):
    return ecfs_json(st, "rbd", "info", name)["id"]


def test_scrub_names_the_damage_and_repair_makes_it_clean(tmp_path):
    st, img = _store(tmp_path)
    assert ecfs(st, "scrub").returncode == 0
    assert ecfs(st, "scrub", "--deep").returncode == 0
    a = _image_id(st, "a")
    # one object each: a flipped byte, a silently rewritten page (its
    # checksum made to match), a deleted shard file, a damaged sidecar header
    flip = _shard_file(st, a, 0, objno=0)
    with open(flip, "r+b") as f:
        f.seek(70000)
        c = f.read(1)
        f.seek(70000)
        f.write(bytes([c[0] ^ 1]))
    silent = _shard_file(st, a, 5)
    osd = int(silent.split("/osd.")[1].split("/")[0])
    page = os.urandom(4096)
    with open(silent, "r+b") as f:
        f.seek(4096 * 20)
        f.write(page)
    with open(silent + ".meta", "r+b") as f:
        f.seek(sf.crc_offset(20))
        f.write(sf.page_crcs(page).astype("<u4").tobytes())
    gone = _shard_file(st, a, 2, objno=2)
    os.unlink(gone)
    hdr = _shard_file(st, a, 3, objno=3) + ".meta"
    with open(hdr, "r+b") as f:
        f.seek(30)
        f.write(b"\x00\xff")
    p = ecfs(st, "scrub", check=False)
    assert p.returncode == 4
    out = p.stdout.decode()
    assert "shard 2" in out and "shard 3 on osd." in out and "damaged sidecar header" in out
    assert "shard 5" not in out          # light reads no data
    assert_user_error(p, "inconsistenc")
    p = ecfs(st, "scrub", "--deep", check=False)
    assert p.returncode == 4
    out = p.stdout.decode()
    assert f"stripe 1: shard 5 on osd.{osd}: bytes disagree with the other 5 " \
           f"(dropped or torn write)" in out, out
    assert "fails its checksum" in out and "shard 0 on osd." in out
    import json
    p = ecfs(st, "scrub", "--full", "--json", check=False)
    assert p.returncode == 4
    rep = json.loads(p.stdout)
    assert not rep["clean"] and {x["shard"] for x in rep["inconsistencies"]} >= {0, 2, 3, 5}
    assert ecfs(st, "scrub", "--deep", "b").returncode == 0, "image b is not damaged"
    p = ecfs(st, "repair", "a")
    assert "after repair (deep)" in p.stdout.decode() and ": clean" in p.stdout.decode()
    for level in ((), ("--deep",), ("--full",)):
        assert ecfs(st, "scrub", *level).returncode == 0, level
    ecfs(st, "rbd", "export", "a", str(tmp_path / "out.raw"))
    assert (tmp_path / "out.raw").read_bytes() == img


def test_scrub_of_a_mounted_image_does_not_race_its_writer(tmp_path):
    need_root()
    st, img = _store(tmp_path)
    mnt = tmp_path / "mnt"
    stop = threading.Event()
    errors = []

    def writer():
        try:
            fd = os.open(mnt / "a", os.O_WRONLY | os.O_DIRECT)
            import mmap
            buf = mmap.mmap(-1, 65536)
            n = 0
            try:
                while not stop.is_set():
                    buf[:8] = n.to_bytes(8, "little")
                    os.pwritev(fd, [buf], (n * 65536 * 7) % (16 * MiB - 65536) // 4096 * 4096)
                    n += 1
            finally:
                os.close(fd)
        except Exception as e:      # reported by the test
            errors.append(e)

    with mounted(st, mnt):
        t = threading.Thread(target=writer)
        t.start()
        try:
            for _ in range(3):
                p = ecfs(st, "scrub", "--deep", "a", check=False)
                assert p.returncode == 0, p.stdout.decode() + p.stderr.decode()
        finally:
            stop.set()
            t.join(60)
    assert not errors, errors
    assert ecfs(st, "scrub", "--full").returncode == 0


def test_scrub_of_an_unknown_image_is_one_error_line(tmp_path):
    st, _ = _store(tmp_path)
    assert_user_error(ecfs(st, "scrub", "nope", check=False), "nope")
    assert_user_error(ecfs(st, "repair", "nope", check=False), "nope")
