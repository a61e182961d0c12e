"""The run-time fault injection layer (backend/faults.py): rules in
STORE/faults.json reach a live store without a restart and fail, delay,
corrupt or kill exactly where they say."""
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from backend import faults
from backend.recovery import recover_osd

from .util import check_parity, osd_of

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
KiB = 1 << 10


def _wait_armed(s, deadline=5.0):
    """Rules are looked at every faults.POLL seconds: wait for them."""
    end = time.monotonic() + deadline
    while not s.faults.armed():
        assert time.monotonic() < end, "the rules never took effect"
        time.sleep(0.01)


def test_an_injected_write_error_takes_the_osd_down_and_records_what_it_missed(make_store):
    d, s = make_store(min_size=5)
    data = os.urandom(256 * KiB)
    s.write_full("a", data)
    bad = osd_of(d, "a", 4)                       # a parity shard: every write reaches it
    faults.write_rules(d, [{"at": "write", "osd": bad, "action": "EIO", "times": 1}])
    _wait_armed(s)
    s.write("a", 4096, b"\x07" * 4096)           # 5 of 6 shards written: acknowledged
    want = data[:4096] + b"\x07" * 4096 + data[8192:]
    assert not s.osdmap.is_up(bad)
    assert "injected" in s.osdmap.states[bad].reason
    faults.write_rules(d, [])
    s.osdmap.mark_up(bad)
    recover_osd(s, bad)                            # from the missed log
    check_parity(d)
    others = [o for o in range(6) if o != bad][:2]
    for o in others:                               # M others gone: the shard must be right
        s.osdmap.mark_down(o, "test")
    assert s.read("a", 0, len(want)) == want


def test_a_flipped_bit_on_read_is_caught_and_never_returned(make_store):
    d, s = make_store()
    data = os.urandom(128 * KiB)
    s.write_full("f", data)
    faults.write_rules(d, [{"at": "read", "osd": osd_of(d, "f", 0), "action": "flip",
                            "times": 3}])
    _wait_armed(s)
    before = s.counters.snapshot().get("checksum_errors", 0)
    for _ in range(3):
        assert s.read("f", 0, len(data)) == data
    assert s.counters.snapshot().get("checksum_errors", 0) > before
    faults.write_rules(d, [])


def test_rules_come_and_go_in_a_live_store(make_store):
    d, s = make_store()
    s.write_full("g", b"x" * 4096)
    faults.write_rules(d, [{"at": "commit_before", "action": "ENOSPC", "path": "g"}])
    _wait_armed(s)
    with pytest.raises(Exception) as e:
        s.write("g", 0, b"y" * 4096)
    assert "No space" in str(e.value) or "ENOSPC" in str(e.value) or "space" in str(e.value)
    assert s.read("g", 0, 4096) == b"x" * 4096     # refused before the journal: unchanged
    faults.write_rules(d, [])
    end = time.monotonic() + 5
    while s.faults.armed():
        assert time.monotonic() < end
        time.sleep(0.01)
    s.write("g", 0, b"y" * 4096)
    assert s.read("g", 0, 4096) == b"y" * 4096


def test_a_file_that_does_not_parse_applies_nothing(make_store, caplog):
    d, s = make_store()
    with open(os.path.join(d, faults.FILE), "w") as f:
        f.write('{"version": 1, "rules": [{"at": "write", "action": "explode"}]}')
    s.faults._next = 0                             # look at the file now
    assert not s.faults.armed()
    assert any("explode" in r.getMessage() or "action" in r.getMessage()
               for r in caplog.records)
    with pytest.raises(ValueError):
        faults.write_rules(d, [{"at": "write", "action": "flip"}])


@pytest.mark.parametrize("at", ["commit_before", "commit_after"])
def test_kill_before_or_after_a_journal_commit(make_store, at):
    """Killed before the record: the write never happened. Killed after it
    was durable: replay makes it whole."""
    d, s = make_store()
    s.write_full("k", b"o" * 8192)
    s.close()
    faults.write_rules(d, [{"at": at, "action": "kill", "path": "k"}])
    code = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {ROOT!r})
        from backend.objectstore import ObjectStore
        s = ObjectStore({d!r})
        s.write("k", 0, b"n" * 8192)
        print("survived", flush=True)
    """)
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60)
    assert p.returncode == -signal.SIGKILL, p.stderr.decode()
    faults.write_rules(d, [])
    from backend.objectstore import ObjectStore
    s2 = ObjectStore(d)
    try:
        got = s2.read("k", 0, 8192)
        assert got == (b"o" if at == "commit_before" else b"n") * 8192
    finally:
        s2.close()
    check_parity(d)
