"""The FUSE operations class driven in-process (no kernel): lifecycle rules
that a mount cannot show reliably from outside."""
import os
import threading

import pytest

import ecfs.fuse as fuse
from backend.errors import StoreError
from backend.objectstore import ObjectStore
from backend.pool import create_store
from rbdlike import directory
from rbdlike.rbd import RBD


@pytest.fixture
def fs(tmp_path):
    d = str(tmp_path / "s")
    create_store(d)
    store = ObjectStore(d)
    RBD().create(store, "a", 8 << 20)
    RBD().create(store, "b", 8 << 20)
    ops = fuse.EcfsFS(store)
    try:
        yield ops, store
    finally:
        for img, _ in list(ops._images.values()):
            img.close()
        store.close()


def test_release_closes_the_image_even_when_its_flush_fails(fs):
    ops, store = fs
    key = ("img", directory.lookup(store, "a"))
    fi = ops._open(ops._ino(key), os.O_RDWR)
    h = ops._handles.pop(fi.fh)

    def failing():
        raise StoreError("injected flush failure")

    h.image.flush = failing
    with pytest.raises(StoreError):
        ops._release(h)
    assert key not in ops._images, "the image stayed open (its lock never handed back)"


def test_a_slow_open_does_not_stall_lookups(fs, monkeypatch):
    """Building an Image (store reads, a socket, a thread) happens outside
    the lock that inode numbers need."""
    ops, store = fs
    entered, go = threading.Event(), threading.Event()
    real = fuse.Image

    class Slow(real):
        def __init__(self, *a, **k):
            entered.set()
            go.wait(30)
            super().__init__(*a, **k)

    monkeypatch.setattr(fuse, "Image", Slow)
    key = ("img", directory.lookup(store, "a"))
    ino = ops._ino(key)
    opener = threading.Thread(target=lambda: ops._open(ino, os.O_RDONLY))
    opener.start()
    try:
        assert entered.wait(30)
        done = threading.Event()
        looker = threading.Thread(target=lambda: (ops._ino(("img", "other")), done.set()))
        looker.start()
        assert done.wait(5), "a lookup waited behind a slow open"
        looker.join(5)
    finally:
        go.set()
        opener.join(30)
    assert ops._images[key][1] == 1


def test_readdir_lists_dot_and_dotdot(fs):
    ops, _ = fs
    names = [n for n, _ in ops._entries(fuse.ROOT)]
    assert names[:2] == [".", ".."] and "a" in names and fuse.SNAPDIR in names
    assert [n for n, _ in ops._entries(fuse.SNAPROOT)][:2] == [".", ".."]
