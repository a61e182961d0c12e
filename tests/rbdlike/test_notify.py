"""Watch/notify: maintenance ops proxied to the lock holder, snapshots
taken while the holder writes, header updates, timeouts."""
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

from backend.errors import Busy, Exists
from rbdlike import notify
from rbdlike.diff import diff_extents
from rbdlike.exclusive_lock import owner
from rbdlike.image import Image
from rbdlike.rbd import RBD

KiB, MiB = 1 << 10, 1 << 20
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SLOT = 64 * KiB
SLOTS = 256                       # 16 MiB: four 4 MiB objects


def _slot_data(i: int) -> bytes:
    return np.random.default_rng(i).integers(1, 256, SLOT, dtype=np.uint8).tobytes()


def _slot_of(i: int) -> int:
    return (i * 37) % SLOTS


class Writer:
    """A child process holding the image's lock and writing slot after slot
    (``count`` writes, then it just holds the lock); it prints each write's
    index once the write returned. Closing its stdin stops it."""

    def __init__(self, store_dir, image, count=None):
        code = textwrap.dedent(f"""
            import os, sys, threading
            sys.path.insert(0, {ROOT!r})
            import numpy as np
            from backend.objectstore import ObjectStore
            from rbdlike.image import Image
            stop = threading.Event()
            threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
            s = ObjectStore({store_dir!r})
            img = Image(s, {image!r})
            img.acquire_lock()
            print("ready", flush=True)
            i, count = 0, {count!r}
            while not stop.is_set():
                if count is not None and i >= count:
                    stop.wait()              # keep holding the lock until told to stop
                    break
                data = np.random.default_rng(i).integers(1, 256, {SLOT}, dtype=np.uint8).tobytes()
                img.write(data, ((i * 37) % {SLOTS}) * {SLOT})
                print(i, flush=True)
                i += 1
            img.close()
            s.close()
            print("done", flush=True)
        """)
        self.p = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True)
        self.done: list[int] = []
        self.lines = threading.Condition()
        self.ready = False
        self.finished = False
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.p.stdout:
            with self.lines:
                line = line.strip()
                if line == "ready":
                    self.ready = True
                elif line == "done":
                    self.finished = True
                elif line:
                    self.done.append(int(line))
                self.lines.notify_all()

    def wait(self, pred, timeout=60):
        with self.lines:
            assert self.lines.wait_for(pred, timeout), "child made no progress"

    def stop(self):
        self.p.stdin.close()
        self.wait(lambda: self.finished or self.p.poll() is not None)
        self.p.wait(timeout=60)

    def kill(self):
        if self.p.poll() is None:
            self.p.kill()
        self.p.wait()


@pytest.fixture
def writer_factory(store):
    made = []

    def make(image, count=None):
        w = Writer(store.store, image, count)
        made.append(w)
        w.wait(lambda: w.ready)
        return w

    yield make
    for w in made:
        w.kill()


def test_proxied_snapshot_holds_every_completed_write(store, writer_factory):
    RBD().create(store, "v", SLOTS * SLOT)
    w = writer_factory("v")
    w.wait(lambda: len(w.done) >= 40)
    with w.lines:
        completed = list(w.done)
    with Image(store, "v") as img:
        img.create_snap("s1")                 # proxied: the child holds the lock
        assert owner(store, img.id).pid == w.p.pid
        w.wait(lambda: len(w.done) >= len(completed) + 20)
        img.create_snap("s2")
    w.stop()
    last_before = {}
    for i in completed:
        last_before[_slot_of(i)] = i
    with Image(store, "v", snapshot="s1") as s1:
        snap = s1.read(0, SLOTS * SLOT)
    for slot in range(SLOTS):
        got = snap[slot * SLOT:(slot + 1) * SLOT]
        if slot in last_before:
            # the last completed write, or a later one to the same slot
            cands = [i for i in w.done if _slot_of(i) == slot and i >= last_before[slot]]
            assert any(got == _slot_data(i) for i in cands), f"slot {slot}"
        elif got != bytes(SLOT):
            assert any(got == _slot_data(i) for i in w.done if _slot_of(i) == slot)
    # the maps are right: diffs from the snapshots replay to the later points
    with Image(store, "v", read_only=True) as head:
        want_head = head.read(0, SLOTS * SLOT)
        for frm, to in (("s1", "s2"), ("s2", None), ("s1", None)):
            view = Image(store, "v", snapshot=to) if to else head
            base = Image(store, "v", snapshot=frm)
            replay = bytearray(base.read(0, SLOTS * SLOT))
            for off, n, exists, data in diff_extents(view, frm, 0, SLOTS * SLOT,
                                                     whole_object=False, want_data=True):
                replay[off:off + n] = data if exists else bytes(n)
            assert bytes(replay) == view.read(0, SLOTS * SLOT), (frm, to)
            # and from the maps alone: every changed slot lies in a reported object
            objs = set()
            for off, n, exists, _ in diff_extents(view, frm, 0, SLOTS * SLOT,
                                                  whole_object=True):
                objs.update(range(off // (4 * MiB), (off + n - 1) // (4 * MiB) + 1))
            changed = np.flatnonzero(np.frombuffer(bytes(replay), np.uint8) !=
                                     np.frombuffer(base.read(0, SLOTS * SLOT), np.uint8))
            assert {int(x) // (4 * MiB) for x in changed} <= objs
            base.close()
            if to:
                view.close()
        assert want_head == head.read(0, SLOTS * SLOT)


def test_proxied_maintenance_with_progress_and_header_updates(store, writer_factory):
    RBD().create(store, "p", 16 * MiB)
    with Image(store, "p") as img:
        img.write(b"P" * MiB, 0)
        img.create_snap("s")
        img.protect_snap("s")
    RBD().clone(store, "p", "s", "c")
    w = writer_factory("c", count=5)
    w.wait(lambda: len(w.done) >= 5)
    watcher = Image(store, "c", read_only=True, watch=True)
    try:
        assert watcher.size() == 16 * MiB
        seen = []
        with Image(store, "c") as img:
            img.flatten(progress=lambda d, t: seen.append((d, t)))
            assert seen and seen[-1] == (4, 4)
            assert img.header.parent is None          # reloaded after the proxied op
            img.resize(20 * MiB)
            assert img.size() == 20 * MiB
            assert img.create_snap("x") == 1
            with pytest.raises(Exists):
                img.create_snap("x")                  # the owner's error comes back
            assert owner(store, img.id).pid == w.p.pid
        # the watcher heard of every change before the requests returned
        assert watcher.header.size == 20 * MiB
        assert [s.name for s in watcher.header.snapshots] == ["x"]
        assert {x["pid"] for x in notify.watchers(store, watcher.id)} == {os.getpid(), w.p.pid}
    finally:
        watcher.close()
    w.stop()
    with Image(store, "c", read_only=True) as c:
        assert c.read(SLOT, MiB - SLOT) == b"P" * (MiB - SLOT)   # slot 0 is the child's


def test_silent_owner_times_out_and_nothing_happens(store, writer_factory, monkeypatch):
    RBD().create(store, "t", 8 * MiB)
    w = writer_factory("t", count=1)
    w.wait(lambda: len(w.done) >= 1)
    monkeypatch.setenv("ECFS_NOTIFY_TIMEOUT", "1")
    os.kill(w.p.pid, signal.SIGSTOP)
    try:
        with Image(store, "t") as img:
            t0 = time.monotonic()
            with pytest.raises(notify.TimedOut):
                img.create_snap("late")
            assert time.monotonic() - t0 < 30
    finally:
        os.kill(w.p.pid, signal.SIGCONT)
    monkeypatch.setenv("ECFS_NOTIFY_TIMEOUT", "30")
    with Image(store, "t") as img:
        img.create_snap("late")                 # the late request was refused, not run
        assert [s["name"] for s in img.list_snaps()] == ["late"]
    w.stop()


def test_exclusive_holder_still_runs_maintenance_but_keeps_the_lock(store, tmp_path):
    from .test_image import _holder
    from ..waiting import wait_for
    RBD().create(store, "x", 4 * MiB)
    ready = str(tmp_path / "ready")
    p = _holder(store.store, "x", ready, exclusive=True)
    try:
        wait_for(lambda: os.path.exists(ready))
        with Image(store, "x") as img:
            img.create_snap("s")
            with pytest.raises(Busy):
                img.write(b"no", 0)
        with Image(store, "x", snapshot="s") as v:
            assert v.read(0, 5) == b"child"
    finally:
        p.kill()
        p.wait()


def _lose_first_reply(monkeypatch, op):
    """The first ``op`` request reaches its peer and runs there, but its
    answer never comes back (the peer handed the lock over or went away
    before replying): the requester sees Unreachable and retries."""
    real = notify.request
    lost = []

    def request(address, msg, *args, **kwargs):
        result = real(address, msg, *args, **kwargs)
        if msg.get("op") == op and not lost:
            lost.append(op)
            raise notify.Unreachable(f"the lock owner went away during {op!r}")
        return result

    monkeypatch.setattr(notify, "request", request)
    return lost


def test_a_proxied_op_whose_answer_was_lost_runs_once(store, monkeypatch):
    """The retry of a snapshot the owner created before its reply was lost
    answers the snapshot's id: never "already exists", never a second one."""
    RBD().create(store, "x", 4 * MiB)
    with Image(store, "x") as owner_img, Image(store, "x") as other:
        owner_img.acquire_lock(exclusive=True)      # so `other` proxies
        owner_img.write(b"a" * 4096, 0)
        lost = _lose_first_reply(monkeypatch, "snap_create")
        snap_id = other.create_snap("s1")
        assert lost, "the request was not proxied"
        snaps = other.list_snaps()
        assert [(s["id"], s["name"]) for s in snaps] == [(snap_id, "s1")]
        lost = _lose_first_reply(monkeypatch, "snap_rm")
        other.remove_snap("s1")                     # not "has no snapshot"
        assert lost and other.list_snaps() == []


def test_a_proxied_op_is_not_run_again_by_the_next_holder(store, monkeypatch):
    """The owner runs the op, then closes before answering: the requester
    takes the lock itself and finds the op done (its record in the header)."""
    RBD().create(store, "y", 4 * MiB)
    owner_img = Image(store, "y")
    owner_img.write(b"a" * 4096, 0)
    other = Image(store, "y")
    real = notify.request

    def request(address, msg, *args, **kwargs):
        result = real(address, msg, *args, **kwargs)
        if msg.get("op") == "snap_create":
            owner_img.close()                        # lock handed back, no answer
            raise notify.Unreachable("the lock owner went away during 'snap_create'")
        return result

    monkeypatch.setattr(notify, "request", request)
    try:
        snap_id = other.create_snap("s1")
        assert other.lock_owner() is not None and other.lock_owner().pid == os.getpid()
        assert [(s["id"], s["name"]) for s in other.list_snaps()] == [(snap_id, "s1")]
    finally:
        other.close()
        owner_img.close()


def test_a_closing_owner_sends_requests_to_the_next_holder(store):
    """A request that reaches an image being closed is answered NotOwner
    (the requester asks whoever holds the lock next), never "is closed"."""
    RBD().create(store, "z", 4 * MiB)
    img = Image(store, "z")
    img.write(b"a", 0)
    msg = {"op": "snap_create", "name": "s", "request_id": "r1",
           "deadline": time.time() + 30}
    img._owner.closing()             # where Image.close starts: the lock still held
    assert img.lock_owner() is not None
    with pytest.raises(notify.NotOwner):
        img._owner.handle(msg, lambda *a: None)
    img.close()
    with pytest.raises(notify.NotOwner):
        img._owner.handle(msg, lambda *a: None)
    with Image(store, "z") as again:
        assert again.list_snaps() == []
