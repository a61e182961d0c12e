"""Growth by writes (rbdlike/image.py, "Growth by writes"): a stream of
writes past the end, as a file copied into the mount makes, writes the
header once per doubling, never shows more than was written, and leaves
the header's size exact at a flush, a close, a snapshot, a peer's flush
request and before a resize."""
import os
import subprocess
import sys

import pytest

import rbdlike.maintenance as maintenance
from backend.stripecache import StripeCache
from rbdlike.header import load_header
from rbdlike.image import Image
from rbdlike.rbd import RBD

KiB, MiB = 1 << 10, 1 << 20
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PIECE = 128 * KiB                      # what cp writes at a time through FUSE


@pytest.fixture
def cached(store):
    c = StripeCache(store, 8 * MiB, max_age=3600)
    try:
        yield c
    finally:
        c.close()


@pytest.fixture
def sizes_saved(monkeypatch):
    """The size of every header written (watched, not changed)."""
    seen = []
    real = maintenance.save_header

    def save(store, hdr):
        seen.append(hdr.size)
        return real(store, hdr)
    monkeypatch.setattr(maintenance, "save_header", save)
    return seen


def _size_elsewhere(store_dir: str) -> int:
    """The image's size as a read-only open in another process sees it."""
    code = ("import sys; from backend.objectstore import ObjectStore; "
            "from rbdlike.image import Image; s = ObjectStore(sys.argv[1]); "
            "print(Image(s, 'g', read_only=True).size()); s.close()")
    out = subprocess.run([sys.executable, "-c", code, store_dir], cwd=ROOT, check=True,
                         capture_output=True, text=True, timeout=60)
    return int(out.stdout)


def _grow_write(img, data):
    off = img.size()
    img.grow_for_write(off + len(data))
    img.write(data, off)


def test_a_stream_of_growing_writes_writes_the_header_once_per_doubling(cached, sizes_saved):
    RBD().create(cached, "g", 0)
    img = Image(cached, "g", watch=True)
    try:
        data = os.urandom(PIECE)
        total = 2048 * PIECE + 5000            # 256 MiB and a bit: cp of an odd-sized file
        while img.size() < total - 5000:
            _grow_write(img, data)
            assert img.size() <= img.header.size
            assert img.read(img.size(), 4096) == b""       # nothing shown past the written end
        _grow_write(img, data[:5000])
        assert img.size() == total
        # the first write takes the lock (a plain resize), then doublings
        # of whole 4 MiB objects ahead of the writes
        assert sizes_saved == [PIECE] + [(4 << i) * MiB for i in range(8)]
        img.flush()
        assert sizes_saved[-1] == total == img.header.size
        assert load_header(cached, img.id).size == total
        assert img.read(total - 5000, 8192) == data[:5000]
        img.flush()
        assert sizes_saved[-1] == total and len(sizes_saved) == 10   # settled once
    finally:
        img.close()


def test_close_a_snapshot_a_reader_elsewhere_and_a_resize_see_the_size_written(cached):
    RBD().create(cached, "g", 0)
    img = Image(cached, "g", watch=True)
    data = os.urandom(PIECE)
    try:
        for _ in range(40):                    # 5 MiB: the header says 8 MiB
            _grow_write(img, data)
        assert img.size() == 40 * PIECE and load_header(cached, img.id).size == 8 * MiB
        img.create_snap("s")
        assert load_header(cached, img.id).snap("s").size == 40 * PIECE
        for _ in range(40):
            _grow_write(img, data)             # 10 MiB: doubled from the 5 settled
        assert load_header(cached, img.id).size == 12 * MiB
        # a reader elsewhere (export, diff, du) asks the owner to flush first
        assert _size_elsewhere(cached.lower.store) == 80 * PIECE
        for _ in range(8):
            _grow_write(img, data)             # 11 MiB, the header 20
        assert load_header(cached, img.id).size == 20 * MiB
        img.resize(12 * MiB, allow_shrink=False)   # a grow by the user, past what was written
        assert img.size() == img.header.size == 12 * MiB
        assert img.read(88 * PIECE, MiB) == bytes(MiB)
        for _ in range(8):
            _grow_write(img, data)
    finally:
        img.close()
    assert load_header(cached, img.id).size == 12 * MiB + 8 * PIECE


def test_without_the_lock_ours_alone_each_growing_write_resizes(store, sizes_saved):
    """The store writes through (no stripe cache, so no write-back): the
    header says every write's end at once, as before."""
    RBD().create(store, "g", 0)
    with Image(store, "g", watch=True) as img:
        data = os.urandom(PIECE)
        for _ in range(6):
            _grow_write(img, data)
            assert load_header(store, img.id).size == img.size()
    assert sizes_saved == [PIECE * (i + 1) for i in range(6)]
