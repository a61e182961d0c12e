"""Kept pages live in a fixed pool (backend/pagepool.py): bounded, given
back when their state goes, and never misread by a lock-free reader when
a slot changes hands under it."""
import os

import numpy as np

from backend.objstate import CommitSeq, ObjState, StateCache
from backend.pagepool import MIN_PAGES
from backend.shardfile import PAGE

OBJ = "rbd_data.x.0"


def _cache(tmp_path, pool_pages=MIN_PAGES):
    states = StateCache(CommitSeq(str(tmp_path)), max_fds=64)
    states.keep_pages(lambda: 1 << 30, pool_pages * PAGE)
    return states


def _state(states, name):
    st = ObjState(name=name, slot=0, seq=states.seq.get(0), gen=0, loc=[0], hdrs={},
                  info=None, usable={}, bad_header=set(), absent=set())
    states.put(st)
    return st


def _set(states, st, i, p0, data):
    with states._lock:              # as follow() does
        states.set_pages(st, i, p0, data)
        states.trim_state(st)


def _get(states, st, i, p0, p1):
    out = np.empty((p1 - p0) * PAGE, dtype=np.uint8)
    return out.tobytes() if states.get_pages(st, i, p0, p1, out) else None


def test_a_slot_handed_to_another_page_under_a_lock_free_reader_is_not_taken(tmp_path):
    states = _cache(tmp_path)
    a, b = _state(states, "a"), _state(states, "b")
    mine, theirs = os.urandom(PAGE), os.urandom(PAGE)
    _set(states, a, 0, 0, mine)
    assert _get(states, a, 0, 0, 1) == mine

    class Racy(dict):
        """Between the reader's look-up of the slot and its copy, another
        thread drops the page and the pool gives its slot to b's page."""
        armed = True

        def get(self, key, default=None):
            got = super().get(key, default)
            if self.armed:
                self.armed = False
                with states._lock:
                    states.drop_pages(a, 0)
                    states.set_pages(b, 0, 0, theirs)
            return got

    slot = a.pages[0][0]
    a.pages[0] = Racy(a.pages[0])
    assert _get(states, a, 0, 0, 1) is None
    assert b.pages[0][0] == slot                  # the very slot: the race was real
    assert _get(states, b, 0, 0, 1) == theirs


def test_kept_pages_stay_within_the_pool_and_the_least_recently_used_go(tmp_path):
    states = _cache(tmp_path)
    pages = {}
    for n in range(3 * MIN_PAGES // 16):          # runs of 16 pages: 3 pools' worth
        st = _state(states, f"o{n}")
        pages[st.name] = os.urandom(16 * PAGE)
        _set(states, st, 0, 0, pages[st.name])
        assert states.page_bytes() <= MIN_PAGES * PAGE
        assert states.pool.free_count() == MIN_PAGES - states.page_bytes() // PAGE
    kept = {n: _get(states, states._d[n], 0, 0, 16) for n in pages}
    assert [n for n, got in kept.items() if got is not None] == list(pages)[-MIN_PAGES // 16:]
    assert all(kept[n] == pages[n] for n in kept if kept[n] is not None)


def test_a_dropped_state_gives_its_slots_back(tmp_path):
    states = _cache(tmp_path)
    for n in range(3):
        _set(states, _state(states, f"o{n}"), n, 8, os.urandom(4 * PAGE))
    assert states.pool.free_count() == MIN_PAGES - 12
    states.drop("o1")
    assert states.pool.free_count() == MIN_PAGES - 8
    states.clear()
    assert states.pool.free_count() == MIN_PAGES and states.page_bytes() == 0


def test_a_state_not_in_the_cache_keeps_no_pages(tmp_path):
    """(its slots could never be given back)"""
    states = _cache(tmp_path)
    st = _state(states, "a")
    states.drop("a")
    _set(states, st, 0, 0, os.urandom(PAGE))
    assert not st.pages.get(0) and states.pool.free_count() == MIN_PAGES


def test_a_page_set_again_under_a_lock_free_reader_is_not_taken(tmp_path):
    """The slot handed back to the same page (last freed, first reused):
    the map names the same slot, the generation moved."""
    states = _cache(tmp_path)
    a = _state(states, "a")
    old, new = os.urandom(PAGE), os.urandom(PAGE)
    _set(states, a, 0, 0, old)
    slot = a.pages[0][0]

    class Hooked(list):
        """Right after the reader took the generations, the page is set again."""
        armed = False

        def __getitem__(self, idx):
            got = super().__getitem__(idx)
            if Hooked.armed:
                Hooked.armed = False
                _set(states, a, 0, 0, new)
            return got

    states.pool.gen = Hooked(states.pool.gen)
    Hooked.armed = True
    assert _get(states, a, 0, 0, 1) is None
    assert a.pages[0][0] == slot                 # the same slot: only its generation tells
    assert _get(states, a, 0, 0, 1) == new


def test_no_slots_asked_none_given():
    from backend.pagepool import PagePool
    pool = PagePool(0)
    assert pool.alloc(0) == [] and pool.free_count() == MIN_PAGES
