"""Shard files stay sparse: zeros the client never wrote are never written."""
import os

from .util import osd_paths


def _allocated(store_dir: str) -> int:
    total = 0
    for p in osd_paths(store_dir).values():
        for dirpath, _, files in os.walk(os.path.join(p, "objects")):
            for f in files:
                if not f.endswith(".meta"):
                    total += os.lstat(os.path.join(dirpath, f)).st_blocks * 512
    return total


def test_growing_across_the_restripe_threshold_stays_sparse(make_store):
    """A small object (4 KiB chunks) written near 127 MiB is restriped to
    64 KiB chunks; the hole between must not be written as zeros."""
    d, s = make_store(k=4, m=2, chunk_size="auto")
    head = os.urandom(5000)
    s.write("g", 0, head)
    far = 127 << 20
    s.write("g", far, b"tail")
    assert s.stat("g").chunk_size == 64 * 1024
    assert _allocated(d) < 2 << 20, "the restripe wrote the hole"
    assert s.read("g", 0, 5000) == head
    assert s.read("g", far - 3, 7) == bytes(3) + b"tail"
    assert s.read("g", 1 << 20, 4096) == bytes(4096)


def test_put_of_mostly_zeros_writes_only_the_data(make_store):
    d, s = make_store(k=4, m=2, chunk_size="auto")
    blob = bytearray(4 << 20)
    blob[:4096] = os.urandom(4096)
    blob[3 << 20:(3 << 20) + 10] = b"0123456789"
    s.write_full("p", bytes(blob))
    assert _allocated(d) < 512 * 1024
    assert s.read("p", 0, 4 << 20) == bytes(blob)


def test_zero_deallocates_and_keeps_parity(make_store):
    from .util import check_parity
    for mode in ("delta", "full"):
        d, s = make_store(k=4, m=2, chunk_size="auto", write_mode=mode, name=f"z{mode}")
        data = bytearray(os.urandom(1 << 20))
        s.write_full("z", bytes(data))
        before = _allocated(d)
        s.zero("z", 4096 + 17, 700_000)
        data[4096 + 17:4096 + 17 + 700_000] = bytes(700_000)
        assert s.read("z", 0, 1 << 20) == bytes(data)
        assert s.stat("z").size == 1 << 20
        assert _allocated(d) < before - 600_000, "zeroed pages were not deallocated"
        s.zero("z", (1 << 20) - 10, 1 << 20)          # past the end: no growth
        data[-10:] = bytes(10)
        assert s.stat("z").size == 1 << 20
        assert s.read("z", 0, 1 << 20) == bytes(data)
        s.zero("nosuch", 0, 100)
        assert not s.exists("nosuch")
        check_parity(d)
