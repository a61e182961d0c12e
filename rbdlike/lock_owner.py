"""Who writes an image: this process's side of its exclusive lock, as a
small state machine (the shape of librbd's ``exclusive_lock/`` requests:
acquire, release, hand-over on a peer's request, maintenance ops proxied
to the holder).

One ``LockOwner`` per open ``Image``. It knows nothing of maps or the
stripe cache: the image hands it callbacks for what changes hands with
the lock (``on_acquired`` loads the header and head map and turns
write-back on; ``on_releasing`` flushes, turns write-back off and drops
the map; ``ops`` names the maintenance operations it may run).

States (``LockOwner.state``) and transitions:

==========  =====================================  ==========================================
state       meaning                                leaves by
==========  =====================================  ==========================================
UNLOCKED    no lock: a write first acquires; a     ``acquire`` -> ACQUIRING; ``closing`` -> CLOSED
            maintenance op acquires or proxies
ACQUIRING   one thread (``_acquiring``) takes the  flock taken and ``on_acquired`` done ->
            flock, asking the holder to hand it    LOCKED; a holder that refuses (exclusive,
            over (``request_lock``) meanwhile      no address) or never lets go -> Busy, UNLOCKED
LOCKED      ours: writes hold the gate shared;     ``release``, a peer's ``request_lock`` (not
            maintenance ops run here, peers'       held exclusively) -> RELEASING; ``closing``
            proxied ops too; ``held`` is True      -> CLOSED (lock still held). ``lock rm``
                                                   elsewhere fences us: every commit fails
                                                   Fenced until we release
RELEASING   the gate held exclusive: writes in     lock file and guards gone -> UNLOCKED
            flight are done, ``on_releasing``      (CLOSED when closing). A flush that fails
            flushes (Fenced: bytes dropped)        -> back (LOCKED or CLOSED, the lock kept),
                                                   the error to the caller: nobody may
                                                   write under bytes still cached here
CLOSED      the image is closing or closed:        ``close`` releases a lock still held
            peers' ops are answered NotOwner       (RELEASING, back to CLOSED), then ends
            (they ask the next holder), no         the watch; nothing leaves CLOSED
            acquire succeeds
==========  =====================================  ==========================================

An image without the exclusive-lock feature goes UNLOCKED -> LOCKED on its
first write with a stand-in lock that is always held (any number of
writers: the shared flag).

Threads read ``held`` without the mutex: the lock attribute is set last on
acquire (after the map is loaded) and cleared under the gate on release.
Order: gate before mutex, always (a write holds the gate and may want the
mutex).

Maintenance ops, exactly once. ``run`` gives each call a request id that
every retry reuses. A holder that runs a peer's request records the id
and result in the image header, in the same header write that completes
the op (``record``; a bounded list). Whoever runs the request next (the
same holder after a lost reply, a new holder after a hand-over, or the
requester itself once it holds the lock) finds the record and answers the
recorded result instead of running the op again: a snapshot created
before the reply was lost is not "already exists" on the retry.
"""
from __future__ import annotations

import os
import threading
import time
import uuid
from contextlib import contextmanager

from backend.errors import Busy, Fenced, ReadOnly

from . import notify
from .exclusive_lock import ExclusiveLock, owner

UNLOCKED, ACQUIRING, LOCKED, RELEASING, CLOSED = (
    "unlocked", "acquiring", "locked", "releasing", "closed")

MAX_RECORDS = 32      # request records kept in a header (the newest)


class LockOwner:
    def __init__(self, store, image_id: str, name: str, mutex: threading.RLock, *,
                 has_lock_feature, on_acquired, on_releasing, on_header_update, ops,
                 before_op, load_requests, flush, on_peer_lock):
        self.store = store
        self.image_id = image_id
        self.name = name
        self.mutex = mutex                  # the image's: header, map and lock state
        self.state = UNLOCKED
        self.exclusive = False
        self.read_only = False
        self.gate = Gate()                  # writes shared, maintenance and hand-over exclusive
        self._has_lock_feature = has_lock_feature   # () -> bool, from the current header
        self._on_acquired = on_acquired     # (lock) under the mutex; raises to give up
        self._on_releasing = on_releasing   # () under gate and mutex
        self._on_header_update = on_header_update
        self._ops = ops                     # (op, msg, progress) -> (callable, exclusive)
        self._before_op = before_op         # (op) before an op runs here, gate held
        self._load_requests = load_requests  # () -> list of records in the stored header
        self._flush = flush                 # () for a peer's "flush" request
        self._on_peer_lock = on_peer_lock   # () a peer took or gave up the lock
        self._lock: ExclusiveLock | _NoLock | None = None
        self._acquiring = threading.Lock()  # one acquisition at a time
        self._watch: notify.Watch | None = None
        self._current = threading.local()   # the request a thread is running

    # ------------------------------------------------------------ queries
    @property
    def held(self) -> bool:
        return self._lock is not None and self._lock.held

    def guard(self) -> None:
        """Raise Fenced unless the lock is held and was not broken (a
        header write that only its holder may make checks this first)."""
        lock = self._lock
        if lock is None:
            raise Fenced(f"image {self.name!r}: exclusive lock not held")
        lock.guard()

    @property
    def closed(self) -> bool:
        return self.state == CLOSED

    def owner(self):
        return owner(self.store, self.image_id)

    # ---------------------------------------------------------- acquire
    def acquire(self) -> None:
        """Be the image's writer (UNLOCKED -> ACQUIRING -> LOCKED): take the
        lock, asking its holder to hand it over; Busy when it will not."""
        if self.held:
            return
        with self._acquiring:
            deadline = time.monotonic() + notify.timeout()
            while not self.try_acquire():
                o = owner(self.store, self.image_id)
                retry = o is None           # the holder is between records
                if o is not None:
                    if not o.address:
                        raise Busy(f"image {self.name!r} is locked by pid {o.pid} on {o.host} "
                                   f"(see 'ecfs rbd lock ls {self.name}')")
                    try:
                        notify.request(o.address, {"op": "request_lock", "pid": os.getpid()})
                    except (notify.Unreachable, notify.NotOwner):
                        retry = True        # it is closing: its lock is about to go
                if time.monotonic() > deadline:
                    who = f"pid {o.pid} on {o.host}" if o else "another process"
                    raise Busy(f"image {self.name!r} is locked by {who} "
                               f"(see 'ecfs rbd lock ls {self.name}')")
                if retry:
                    time.sleep(0.005)

    def try_acquire(self) -> bool:
        """One attempt, without asking anybody; True when held after it."""
        with self.mutex:
            if self.held:
                return True
            if self.state == CLOSED:
                return False
            self.state = ACQUIRING
            if not self._has_lock_feature():
                lock = _NoLock()
                try:
                    self._on_acquired(lock)
                except BaseException:
                    self.state = UNLOCKED
                    raise
                self._lock, self.state = lock, LOCKED
                return True
            lock = ExclusiveLock(self.store, self.image_id, self.name,
                                 address=self.ensure_watch().address, exclusive=self.exclusive)
            if not lock.try_acquire():
                self.state = UNLOCKED
                return False
            try:
                self._on_acquired(lock)
            except BaseException:
                lock.release()
                self.state = UNLOCKED
                raise
            self._lock, self.state = lock, LOCKED     # last: "held" means ready
        self.broadcast({"op": "lock_acquired"})
        return True

    # ---------------------------------------------------------- release
    def release(self) -> None:
        """LOCKED -> RELEASING -> UNLOCKED: wait for writes in flight,
        flush, give the lock up (the next write takes it again)."""
        with self.gate.exclusive(), self.mutex:
            if not isinstance(self._lock, ExclusiveLock):
                return
            closing = self.state == CLOSED
            self.state = RELEASING
            try:
                self._on_releasing()
            except BaseException:
                self.state = CLOSED if closing else LOCKED
                raise
            self._lock.release()
            self._lock = None
            self.state = CLOSED if closing else UNLOCKED
        self.broadcast({"op": "lock_released"})

    # ------------------------------------------------------------ writes
    @contextmanager
    def writing(self):
        """Hold the gate shared while holding the lock: a hand-over waits
        for the writes in flight, and no write starts without the lock."""
        while True:
            self.acquire()
            self.gate.acquire_shared()
            if self.held:
                break
            self.gate.release_shared()
        try:
            yield
        finally:
            self.gate.release_shared()

    def try_writing(self) -> bool:
        """``writing`` if it needs no wait (the FUSE loop's fast path);
        then the caller calls ``end_writing``."""
        if not self.gate.try_acquire_shared():
            return False
        if not self.held:
            self.gate.release_shared()
            return False
        return True

    def end_writing(self) -> None:
        self.gate.release_shared()

    # ------------------------------------------------- maintenance ops
    def run(self, op: str, args: dict, progress=None):
        """Run maintenance op ``op`` here if this process holds (or can
        take) the lock, else have the holder run it; then tell the
        watchers the header changed. Retries (a holder that hands the lock
        over or goes away) reuse one request id: the op happens once."""
        msg = {"op": op, "request_id": uuid.uuid4().hex, **args}
        deadline = time.monotonic() + notify.timeout()
        asked = False               # a holder may have run it: look for its record
        while True:
            if not self.held and not self.try_acquire():
                o = owner(self.store, self.image_id)
                if o is None:
                    if time.monotonic() > deadline:
                        raise Busy(f"image {self.name!r}: the lock cannot be taken")
                    time.sleep(0.005)       # released meanwhile: try again
                    continue
                if not o.address:
                    raise Busy(f"image {self.name!r} is locked by pid {o.pid} on {o.host}")
                asked = True
                try:
                    result = notify.request(o.address, {**msg, "deadline": time.time() +
                                                        notify.timeout()},
                                            on_progress=progress)
                except (notify.NotOwner, notify.Unreachable):
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.005)
                    continue                # it handed the lock over, or is closing
                self._on_header_update(notify=False)    # we asked: nothing to tell
                return result
            fn, exclusive = self._ops(op, msg, progress)
            with (self.gate.exclusive() if exclusive else self.gate.shared()):
                if self.held:
                    result = self._execute(msg, fn, peer=False, asked=asked)
                    break
        self.notify_header()
        return result

    def _execute(self, msg: dict, fn, peer: bool, asked: bool = True):
        """Run a request under the gate, holding the lock. A request seen
        before (its record in the header) answers what it answered then;
        one never sent to a peer (``asked`` False) cannot have been."""
        rid = msg.get("request_id")
        if rid and asked:
            for r in self._load_requests():
                if r.get("id") == rid:
                    return r.get("result")
        self._before_op(msg["op"])
        outer = getattr(self._current, "request", None)
        self._current.request = (rid, msg["op"]) if peer and rid else None
        try:
            return fn()
        finally:
            self._current.request = outer

    def record(self, requests: list, result) -> list:
        """The header's request records with the running request's added
        (call in the header write that completes the op)."""
        req = getattr(self._current, "request", None)
        if req is None:
            return requests
        rid, op = req
        return [*requests, {"id": rid, "op": op, "result": result}][-MAX_RECORDS:]

    # ------------------------------------------------- peers' requests
    def handle(self, msg: dict, progress):
        """A peer's request (rbdlike.notify), run in the watch's thread."""
        op = msg.get("op")
        if op == "request_lock":
            if self.exclusive and self.held:
                raise Busy(f"image {self.name!r} is held exclusively by pid {os.getpid()}")
            self.release()
            return None
        if op == "header_update":
            self._on_header_update()
            return None
        if op in ("lock_acquired", "lock_released"):
            # a peer writes, or wrote: what the kernel cached may be stale
            self._on_peer_lock()
            return None
        if op == "flush":
            # a reader elsewhere (export, diff, du) is to see our writes
            if not self.closed:
                self._flush()
            return None
        if time.time() > float(msg.get("deadline", 0) or 0):
            raise notify.TimedOut(f"request {op!r} arrived after its deadline")
        if self.read_only:
            raise ReadOnly(f"image {self.name!r} is open read-only here")
        fn, exclusive = self._ops(op, msg, progress)
        with (self.gate.exclusive() if exclusive else self.gate.shared()):
            if not self.held or self.closed:
                # handed over or closing: the requester asks the next holder
                raise notify.NotOwner(f"pid {os.getpid()} no longer holds the lock")
            result = self._execute(msg, fn, peer=True)
        self.notify_header()
        self._on_header_update()       # ours too: the mount's view of it moves
        return result

    # ------------------------------------------------------ the watch
    def ensure_watch(self) -> notify.Watch:
        if self._watch is None:
            self._watch = notify.Watch(self.store, self.image_id, self.handle)
        return self._watch

    def broadcast(self, msg: dict) -> None:
        if self._watch is not None:
            notify.broadcast(self.store, self.image_id, msg, skip_cookie=self._watch.cookie)

    def notify_header(self) -> None:
        cookie = self._watch.cookie if self._watch is not None else ""
        notify.broadcast(self.store, self.image_id, {"op": "header_update"},
                         skip_cookie=cookie)

    def closing(self) -> None:
        """-> CLOSED, the lock still held: the image is closing, and peers'
        requests from now on are answered NotOwner (their requesters ask
        the next holder) rather than run on a closing image."""
        with self.mutex:
            self.state = CLOSED

    def close(self) -> None:
        """-> CLOSED: the lock goes first (the way a peer's request takes
        it, so the two never race), then the watch: a peer asking
        meanwhile is answered NotOwner, or finds the lock free."""
        self.closing()
        try:
            self.release()
        finally:
            if self._watch is not None:
                self._watch.close()


class Gate:
    """A readers-writer gate for an image's I/O: writes hold it shared,
    maintenance and lock hand-over exclusive. Waiting exclusive holders
    go first (a hand-over is never starved by a stream of writes); a
    thread may re-enter what it holds, and may take it shared inside
    exclusive."""

    def __init__(self):
        self._c = threading.Condition()
        self._shared: dict[int, int] = {}     # thread -> depth
        self._owner: int | None = None
        self._depth = 0
        self._waiting = 0

    def acquire_shared(self) -> None:
        me = threading.get_ident()
        with self._c:
            if self._owner == me or me in self._shared:
                self._shared[me] = self._shared.get(me, 0) + 1
                return
            while self._owner is not None or self._waiting:
                self._c.wait()
            self._shared[me] = 1

    def try_acquire_shared(self) -> bool:
        """acquire_shared if nobody holds or waits for the gate exclusive."""
        me = threading.get_ident()
        with self._c:
            if self._owner == me or me in self._shared:
                self._shared[me] = self._shared.get(me, 0) + 1
                return True
            if self._owner is not None or self._waiting:
                return False
            self._shared[me] = 1
            return True

    def release_shared(self) -> None:
        me = threading.get_ident()
        with self._c:
            self._shared[me] -= 1
            if not self._shared[me]:
                del self._shared[me]
                self._c.notify_all()

    @contextmanager
    def shared(self):
        self.acquire_shared()
        try:
            yield
        finally:
            self.release_shared()

    @contextmanager
    def exclusive(self):
        me = threading.get_ident()
        with self._c:
            if self._owner == me:
                self._depth += 1
            else:
                self._waiting += 1
                try:
                    while self._owner is not None or any(t != me for t in self._shared):
                        self._c.wait()
                finally:
                    self._waiting -= 1
                self._owner, self._depth = me, 1
        try:
            yield
        finally:
            with self._c:
                self._depth -= 1
                if not self._depth:
                    self._owner = None
                    self._c.notify_all()


class _NoLock:
    """The lock of an image without the exclusive-lock feature: always held."""

    held = True

    def guard(self) -> None:
        pass                # nobody can break it

    def release(self) -> None:
        pass
