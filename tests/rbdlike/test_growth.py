"""Growth by writes (rbdlike/image.py, "Growth by writes"): a stream of
writes past the end, as a file copied into the mount makes, writes the
header once per doubling, never shows more than was written, and leaves
the header's size exact at a flush, a close, a snapshot, a peer's flush
request and before a resize."""
import linecache
import os
import subprocess
import sys
import threading

import pytest

import rbdlike.maintenance as maintenance
from backend.errors import EcfsError, Fenced
from backend.objectstore import ObjectStore
from backend.stripecache import StripeCache
from rbdlike.exclusive_lock import break_lock
from rbdlike.header import load_header
from rbdlike.image import Image, merge_attrs
from rbdlike.rbd import RBD

from ..waiting import wait_for

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


_OTHER_WRITER = """
import sys
from backend.objectstore import ObjectStore
from rbdlike.image import Image
s = ObjectStore(sys.argv[1])
b = Image(s, "g")
if int(sys.argv[2]) > b.size():
    b.resize(int(sys.argv[2]))
b.write(b"B" * (1 << 20), int(sys.argv[3]))
b.close()
s.close()
"""


def _grown_ahead(cached):
    """An image written to 5 MiB by growing writes (its header says 8),
    the bytes flushed: (the image, the piece written)."""
    RBD().create(cached, "g", 0)
    img = Image(cached, "g", watch=True)
    data = os.urandom(PIECE)
    try:
        for _ in range(40):
            _grow_write(img, data)
        cached.flush(img._data_prefix)
    except BaseException:
        img.close()
        raise
    return img, data


def _fenced_then_other_writes(cached, img, size: int, at: int) -> None:
    """`lock rm` on ``img``'s lock, then another process grows the image
    to ``size`` (if larger) and writes 1 MiB of b"B" at ``at``."""
    break_lock(cached, img.id)
    subprocess.run([sys.executable, "-c", _OTHER_WRITER, cached.lower.store, str(size),
                    str(at)], cwd=ROOT, check=True, timeout=60)


def test_an_owner_fenced_while_grown_ahead_never_cuts_the_next_owners_writes(cached):
    """`lock rm` takes the lock from a mount grown ahead; the next owner
    writes past what the old one wrote; the old one's fsync and close must
    leave the header's size alone."""
    img, data = _grown_ahead(cached)
    try:
        _fenced_then_other_writes(cached, img, 0, 6 * MiB)
        try:
            img.flush()                        # (nothing cached was dropped: no error owed)
        except EcfsError:
            pass
    finally:
        img.close()
    assert load_header(cached, img.id).size == 8 * MiB
    with Image(cached, "g", read_only=True) as reader:
        assert reader.read(6 * MiB, MiB) == b"B" * MiB


def test_an_owner_fenced_while_grown_ahead_never_grows_over_the_next_owners_size(
        cached, monkeypatch):
    """The next owner made the image larger and wrote past the old one's
    header; the old one, still growing from its own view of the header
    (the next owner's header update not handled yet), is refused (fenced),
    and the header keeps the next owner's size."""
    img, data = _grown_ahead(cached)
    try:
        monkeypatch.setattr(img._owner, "_on_header_update", lambda notify=True: None)
        _fenced_then_other_writes(cached, img, 32 * MiB, 30 * MiB)
        with pytest.raises(Fenced):
            for _ in range(40):                # past 8 MiB: a grow from the stale 8
                _grow_write(img, data)
        # header writes that need no lock still work in the fenced process
        merge_attrs(cached, img.id, {"mode": 0o600})
        assert load_header(cached, img.id).attrs["mode"] == 0o600
    finally:
        try:
            img.close()
        except EcfsError:
            pass                                # (its dropped bytes: the fencing says so)
    assert load_header(cached, img.id).size == 32 * MiB
    with Image(cached, "g", read_only=True) as reader:
        assert reader.read(30 * MiB, MiB) == b"B" * MiB


def test_a_writer_whose_header_shows_the_size_grown_ahead_grows_after_taking_the_lock(cached):
    """Another writable open (a second mount) read the header while the
    owner was grown ahead: its write past what was written, within that
    size, takes the lock (the owner settles at the hand-over) and then
    grows the image, not EINVAL."""
    RBD().create(cached, "g", 0)
    first = Image(cached, "g", watch=True)
    data = os.urandom(PIECE)
    second = None
    other = ObjectStore(cached.lower.store)
    try:
        for _ in range(40):                    # 5 MiB written, the header 8
            _grow_write(first, data)
        second = Image(other, "g", watch=True)
        assert second.size() == 8 * MiB        # what its stat would show
        assert second.write_growing(b"P" * 4096, 6 * MiB) == 4096
        assert second.size() == 6 * MiB + 4096
        assert second.read(5 * MiB - PIECE, PIECE) == data
    finally:
        if second is not None:
            second.close()
        first.close()
        other.close()


def test_while_the_header_grows_writes_past_the_old_size_wait_for_it(cached, monkeypatch):
    """A write between the old size and the new end, while another
    growing write's header write is under way: the fast path says "not
    now" (no error), and the worker path waits, then writes."""
    RBD().create(cached, "g", 0)
    img = Image(cached, "g", watch=True)
    data = os.urandom(PIECE)
    try:
        for _ in range(33):                    # 4 MiB and a piece: the header 8
            _grow_write(img, data)
        old = img.size()
        held, go = threading.Event(), threading.Event()
        real = maintenance.save_header

        def slow(store, hdr):
            if hdr.size > 8 * MiB:
                held.set()
                assert go.wait(30)
            return real(store, hdr)
        monkeypatch.setattr(maintenance, "save_header", slow)
        first = threading.Thread(target=_grow_write, args=(img, os.urandom(4 * MiB)))
        first.start()
        try:
            assert held.wait(30)
            assert img.size() == old           # not the new end before the header says it
            assert img.try_write(data[:4096], old) is None
        finally:
            go.set()
            first.join(30)
        assert img.size() == old + 4 * MiB
        img.write(data[:4096], old)            # now it goes
        assert img.read(old, 4096) == data[:4096]
    finally:
        img.close()


def test_two_plain_growths_at_once_the_smaller_one_is_done_by_the_larger(store, monkeypatch):
    """Write-through (each growing write resizes): a write ending below
    another's end, racing its resize, finds the image grown past it."""
    RBD().create(store, "g", MiB)
    img = Image(store, "g", watch=True)
    img.write(b"x", 0)                         # the lock is ours
    held, go = threading.Event(), threading.Event()
    real = maintenance.save_header

    def slow(st, hdr):
        if hdr.size == 3 * MiB:
            held.set()
            assert go.wait(30)
        return real(st, hdr)
    monkeypatch.setattr(maintenance, "save_header", slow)
    errors = []

    def second():
        try:
            img.grow_for_write(2 * MiB)
        except Exception as e:
            errors.append(e)
    first = threading.Thread(target=img.grow_for_write, args=(3 * MiB,))
    first.start()
    try:
        assert held.wait(30)
        t = threading.Thread(target=second)
        t.start()
        # the second waits for the first's growth (past its own size check)
        wait_for(lambda: _waits_at(t, "grow_for_write", "_grow_lock"),
                 what="second growth waiting")
    finally:
        go.set()
        first.join(30)
    t.join(30)
    try:
        assert errors == [] and img.size() == 3 * MiB
    finally:
        img.close()


def _waits_at(thread, fn: str, text: str) -> bool:
    """Whether ``thread`` is in ``fn`` at a line holding ``text``."""
    frame = sys._current_frames().get(thread.ident)
    while frame is not None:
        if frame.f_code.co_name == fn:
            return text in linecache.getline(frame.f_code.co_filename, frame.f_lineno)
        frame = frame.f_back
    return False
