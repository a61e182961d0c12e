"""OsdMap.maybe_refresh: another process's 'osd down/up' and missed logs
are seen by the next call, through the quick check of the directories'
mtimes as well as the stat calls it stands in for."""
import os
import time

from backend import osdmap
from backend.missed import MissedLog
from backend.osdmap import QUICK_TRUST_NS, OsdMap
from backend.pool import load_pool


def _age(path: str) -> None:
    """Set the directory's mtime a second back: the quick check trusts it."""
    old = time.time_ns() - 10 * QUICK_TRUST_NS
    os.utime(path, ns=(old, old))


def _trusted(m: OsdMap) -> None:
    """Two calls: the first opens the fds, the second takes the baseline."""
    m.maybe_refresh()
    m.maybe_refresh()
    m.maybe_refresh()
    assert m._quick_seen is not None


def test_another_maps_osd_down_and_up_are_seen_by_the_next_call(make_store):
    d, s = make_store()
    other = OsdMap(d, load_pool(d))            # another process's view, as `ecfs osd down`
    mine = OsdMap(d, load_pool(d))
    _age(d)
    _trusted(mine)
    other.mark_down(3, "test")
    mine.maybe_refresh()
    assert not mine.states[3].up
    _age(d)
    _trusted(mine)
    other.mark_up(3)
    mine.maybe_refresh()
    assert mine.states[3].up


def test_a_second_change_within_the_directorys_mtime_tick_is_seen(make_store, monkeypatch):
    """The coarse clock gives two renames in one tick the same mtime: a
    baseline whose mtime is recent is not trusted, so the change after it
    is found by the stat calls though the mtime did not move. ("Recent"
    made an hour here: the test's own pauses never make it old.)"""
    monkeypatch.setattr(osdmap, "QUICK_TRUST_NS", 3600 * 10**9)
    d, s = make_store()
    other = OsdMap(d, load_pool(d))
    mine = OsdMap(d, load_pool(d))
    other.mark_down(2, "test")
    mine.maybe_refresh()
    mine.maybe_refresh()
    assert not mine.states[2].up
    tick = os.stat(d).st_mtime_ns
    other.mark_down(4, "test")
    os.utime(d, ns=(tick, tick))               # the same tick as the first change
    mine.maybe_refresh()
    assert not mine.states[4].up


def test_missed_logs_appearing_are_seen_before_and_after_the_directory_exists(make_store):
    d, s = make_store()
    mine = OsdMap(d, load_pool(d))
    assert not os.path.exists(os.path.join(d, "missed"))
    _age(d)
    _trusted(mine)
    log = MissedLog(d)
    try:
        log.record(1, "obj")                   # makes missed/ (the store dir's mtime moves)
        mine.maybe_refresh()
        assert not mine.states[1].up and "behind" in mine.states[1].reason
        _age(d)
        _age(os.path.join(d, "missed"))
        _trusted(mine)
        assert len(mine._dir_fds) == 2
        log.record(5, "obj")                   # a file in missed/ only
        mine.maybe_refresh()
        assert not mine.states[5].up and "behind" in mine.states[5].reason
    finally:
        log.close()


def test_whole_second_mtimes_are_never_trusted(make_store):
    """A file system that keeps whole seconds would show two changes in
    one second as one: the stat calls run every time."""
    d, s = make_store()
    mine = OsdMap(d, load_pool(d))
    old = (time.time_ns() // 10**9 - 10) * 10**9
    os.utime(d, ns=(old, old))
    for _ in range(3):
        mine.maybe_refresh()
    assert mine._quick_seen is None


def test_the_quick_check_skips_the_stat_calls_when_nothing_changed(make_store, monkeypatch):
    d, s = make_store()
    mine = OsdMap(d, load_pool(d))
    _age(d)
    _trusted(mine)
    stats = []
    real = os.stat
    monkeypatch.setattr(os, "stat", lambda *a, **k: stats.append(a) or real(*a, **k))
    for _ in range(10):
        mine.maybe_refresh()
    assert stats == []
