"""An open image: byte I/O over its data objects, gated by the object map
and the exclusive lock (the shape of python-rbd's ``rbd.Image``).

``Image(store, name, snapshot=None, read_only=False)``: ``read``, ``write``,
``discard``, ``flush``, ``size``, ``resize``, ``stat``, snapshots
(``create_snap``, ``remove_snap``, ``rollback_to_snap``, ``protect_snap``,
``unprotect_snap``, ``list_snaps``), ``flatten``, ``diff_iterate``,
``close`` (or use it as a context manager). Opened at a snapshot it is a
read-only view of the image as it was then. For the mount and diffs:
``head_map_states``, ``allocated_bytes``, ``has_object``, ``parent_view``,
``reload_header`` and the ``on_peer_change`` callback.

This module is the image's I/O. Its maintenance operations are
rbdlike.maintenance (inherited), and who may write, the exclusive lock's
life, is rbdlike.lock_owner (``self._owner``, with the states table).

The first write takes the image's exclusive lock (images with the
exclusive-lock feature); read-only opens never do. With the object-map
feature the owner keeps the head map in memory: a read of a NONEXISTENT
object returns zeros (or the parent's bytes) without touching the store,
and a write marks its object EXISTS once, before its data.

Growth by writes (``grow_for_write``, a file copied into the mount): the
header grows ahead of the writes, doubling up to GROW_AHEAD_MAX at a time,
so a stream of writes past the end pays one header write per doubling, not
one per write. ``size()`` is what was written (``_written_end``); the
header's size comes back to it (``_settle_size``) at the next flush, close,
lock hand-over or maintenance op, and a peer's flush request (export, diff,
du) settles it too. Until then the header says more: after a crash the
image keeps that size (its tail reads as zeros); nothing is ever written
past ``_written_end``, so settling writes only the header, and only if
the lock is still ours (checked under the header lock, which ``lock rm``
takes too) and the stored header still says the size we grew it to (a
fenced owner never cuts the next one's writes off). Only with the
lock ours alone (write-back): a shared image resizes per write as before.
Locks: the gate, then ``_size_lock`` (whose holders never wait for the
gate), then the mutex.

Every change to a head object goes through ``_prepare``: first the copy
for the newest snapshot (rbdlike.snapshot), then the copy-up from the
parent (rbdlike.layering), then the map update, each at most once per
object per snapshot interval.
"""
from __future__ import annotations

import logging
import os
import threading
import time

import numpy as np

from backend.errors import EcfsError, Fenced, InvalidArgument, NotFound, ReadOnly

from . import directory, notify, snapshot
from .exclusive_lock import ExclusiveLock, owner
from .header import (MAX_IMAGE_SIZE, ImageHeader, Parent, Snapshot, data_object, load_header,
                     save_header)
from .lock_owner import LockOwner
from .maintenance import MaintenanceOps
from .objectmap import EXISTS, EXISTS_CLEAN, NONEXISTENT, PENDING, ObjectMap

log = logging.getLogger("ecfs.image")

_OBJ_LOCKS = 64
# grow_for_write doubles the header's size ahead of growing writes, by at
# most this much at a time (and at least to the write's end)
GROW_AHEAD_MAX = 1 << 30
# librbd's rbd_mtime_update_interval / rbd_atime_update_interval: the image's
# modify and access timestamps move at most this often (seconds), so
# writes and reads stay cheap
TIMESTAMP_INTERVAL = float(os.environ.get("ECFS_TIMESTAMP_INTERVAL", "60"))


def merge_attrs(store, image_id: str, changes: dict[str, int]) -> ImageHeader:
    """Merge file attributes (mode, owner, timestamps) into the image's
    header under its header lock; returns the new header."""
    with directory.header_lock(store, image_id):
        hdr = load_header(store, image_id)
        hdr.attrs = {**hdr.attrs, **{k: int(v) for k, v in changes.items()}}
        save_header(store, hdr)
        return hdr


def flush_owner(store, image_id: str, strict: bool = True) -> bool:
    """Have the image's lock owner, if another process (a mount), write its
    cached bytes out: a reader (export, diff, du, an open in another
    mount) then sees every write that completed before it started.
    Unreachable owner: it is closing, and a close flushes before the lock
    goes. An owner that fails or does not answer is an error if
    ``strict``, else logged. True when an owner flushed (it may have
    written the header: its size grown ahead settled)."""
    o = owner(store, image_id)
    if o is None or not o.address or o.pid == os.getpid():
        return False
    try:
        notify.request(o.address, {"op": "flush"})
        return True
    except (notify.Unreachable, notify.NotOwner):
        return False
    except EcfsError as e:
        if strict:
            raise
        log.warning("image %s: its lock owner (pid %d) did not flush: %s", image_id, o.pid, e)
        return False


class Image(MaintenanceOps):
    def __init__(self, store, name: str | None = None, snapshot: str | None = None,
                 read_only: bool = False, *, image_id: str | None = None,
                 snap_id: int | None = None, watch: bool = False):
        self.store = store
        self.id = directory.lookup(store, name) if image_id is None else image_id
        self.header = load_header(store, self.id, name or "")
        self.name = self.header.name if name is None else name
        self.snap: Snapshot | None = None
        if snapshot is not None:
            self.snap = self.header.snap(snapshot)
        elif snap_id is not None:
            self.snap = self.header.snap_by_id(snap_id)
            if self.snap is None:
                raise NotFound(f"image {self.name!r} has no snapshot with id {snap_id}")
        self.read_only = read_only or self.snap is not None
        self._map: ObjectMap | None = None
        self._snap_map: ObjectMap | None = None
        self._parent_img: Image | None = None
        self._clones: dict[int, tuple[str, int]] = {}   # snapshot view: objno -> clone found
        self._prepared: set[int] = set()               # no-map images: objects prepared
        self._zero_spans: dict[int, list] = {}         # objno -> ranges written with zeros
        self._obj_locks = [threading.RLock() for _ in range(_OBJ_LOCKS)]
        self._in_flight: dict[int, int] = {}           # objno -> store writes under way
        self._mutex = threading.RLock()           # header, map and lock state
        # called (in a watch thread, no lock held) when the image changed
        # elsewhere: a header update, a peer's op run here, a peer taking or
        # giving up the lock. The mount invalidates the kernel's caches.
        self.on_peer_change = None
        self._owner = LockOwner(
            store, self.id, self.name, self._mutex,
            has_lock_feature=lambda: self.header.has("exclusive-lock"),
            on_acquired=self._lock_acquired, on_releasing=self._lock_releasing,
            on_header_update=self.reload_header, ops=self._maint_op,
            before_op=self._before_op, load_requests=self._stored_requests,
            flush=self._peer_flush, on_peer_lock=self._peer_changed)
        self._owner.read_only = self.read_only
        self._closed = False
        # the access timestamp is kept by the mount's own images only (a CLI
        # export reading an image does not write its header)
        self._keeps_atime = watch and not self.read_only
        self._stamped: dict[str, int] = {}        # attr -> value last written
        self._data_prefix = f"rbd_data.{self.id}."
        self._wb = False                          # the store writes our data back
        # the end of what growing writes wrote while the header's size is
        # ahead of it (None: the header's size is the image's size)
        self._written_end: int | None = None
        self._grown_to = 0                        # the header's size as the last growth wrote it
        self._size_lock = threading.Lock()
        self._grow_lock = threading.Lock()        # growth the plain way: one at a time
        if watch:
            self._owner.ensure_watch()
        elif self.read_only and self.snap is None and flush_owner(store, self.id):
            # the owner's flush may have settled a size grown ahead
            self.header = load_header(store, self.id, self.name)

    def _obj_lock(self, objno: int) -> threading.RLock:
        return self._obj_locks[objno % _OBJ_LOCKS]

    # ------------------------------------------------------------ queries
    def size(self) -> int:
        if self.snap is not None:
            return self.snap.size
        end = self._written_end
        return self.header.size if end is None else end

    def stat(self) -> dict:
        h = self.header
        n = -(-self.size() // h.object_size)
        return {"size": self.size(), "obj_size": h.object_size, "num_objs": n,
                "order": h.object_size.bit_length() - 1, "features": list(h.features),
                "id": h.id}

    def parent_info(self) -> Parent | None:
        return self.snap.parent if self.snap is not None else self.header.parent

    def list_snaps(self) -> list[dict]:
        self.header = load_header(self.store, self.id, self.name)
        return [{"id": s.id, "name": s.name, "size": s.size, "timestamp": s.timestamp,
                 "protected": s.protected} for s in sorted(self.header.snapshots,
                                                            key=lambda s: s.id)]

    def _objects(self, offset: int, length: int):
        """(objno, offset in object, length, offset in the caller's buffer)."""
        osz = self.header.object_size
        pos, end = offset, offset + length
        while pos < end:
            objno, off = divmod(pos, osz)
            n = min(osz - off, end - pos)
            yield objno, off, n, pos - offset
            pos += n

    def _valid_map(self) -> ObjectMap | None:
        m = self._map
        return m if (m is not None and m.valid) else None

    def head_map_states(self):
        """The head object map's states (a read-only view) when this process
        holds the lock and a map it trusts, else None (then load the stored
        map, or do without)."""
        m = self._valid_map()
        if m is None or self.snap is not None:
            return None
        states = m.states.view()
        states.flags.writeable = False
        return states

    def allocated_bytes(self) -> int | None:
        """Bytes of the head objects the held map says exist (``du``), or
        None (see ``head_map_states``)."""
        states = self.head_map_states()
        if states is None:
            return None
        n = self.header.num_objects
        return min(int((states[:n] != NONEXISTENT).sum()) * self.header.object_size,
                   self.header.size)

    def has_object(self, objno: int) -> bool:
        """Whether this view holds object ``objno`` itself (not read
        through from the parent, not absent)."""
        return self._read_object(objno, 0, 1) is not None

    def parent_view(self) -> "Image":
        """The parent snapshot this clone reads through (parent_info())."""
        return self._parent()

    # ------------------------------------------------------------- reads
    def read(self, offset: int, length: int) -> bytes:
        self._check_open()
        if offset < 0 or length < 0:
            raise InvalidArgument("offset and length must not be negative")
        size = self.size()
        if offset >= size:
            return b""
        length = min(length, size - offset)
        out = np.zeros(length, dtype=np.uint8)
        for objno, off, n, at in self._objects(offset, length):
            got = self._read_object(objno, off, n)
            if got is None:
                self._read_parent(objno * self.header.object_size + off, out[at:at + n])
            else:
                out[at:at + len(got)] = np.frombuffer(got, dtype=np.uint8)
        if self._keeps_atime:
            self._stamp("atime_ns")
        return out.tobytes()

    def try_read(self, offset: int, length: int) -> bytes | None:
        """``read``, if it can be done now without blocking: a range of one
        object of the head that the object map knows absent, or that the
        store has in memory (backend/objstate.py, the stripe cache). None:
        call ``read`` from a thread that may block. Run on the FUSE loop."""
        if self._closed or self.snap is not None or offset < 0 or length <= 0:
            return None
        h = self.header
        size = self.size()
        if offset >= size or (self._keeps_atime and
                              self._stamp_due("atime_ns", time.time_ns()) is not None):
            return None
        length = min(length, size - offset)
        objno, off = divmod(offset, h.object_size)
        if off + length > h.object_size:
            return None
        m = self._valid_map()
        absent = m is not None and objno < len(m.states) and m.states[objno] == NONEXISTENT
        if not absent:
            try:
                got = self.store.try_read(data_object(self.id, objno), off, length)
            except NotFound:
                absent = True
        if absent:
            # never written (or removed): zeros, unless a parent shows through
            return None if h.parent is not None else bytes(length)
        if got is not None and len(got) < length:
            got += bytes(length - len(got))     # past the object's end: zeros, as read
        return got

    def _stamp_due(self, attr: str, now: int) -> int | None:
        """When the timestamp was last moved, if it is due to move now."""
        last = self._stamped.get(attr)
        if last is None:
            last = self.header.attrs.get(attr, self.header.attrs.get(
                "mtime_ns", int(self.header.created * 1e9)))
        return last if now - last >= TIMESTAMP_INTERVAL * 1e9 else None

    def _stamp(self, attr: str) -> None:
        """Move the image's modify ("mtime_ns") or access ("atime_ns")
        timestamp to now, if it is TIMESTAMP_INTERVAL old or older. Best
        effort: a header that cannot be written now is tried again later,
        never an error for the write or read that asked."""
        now = time.time_ns()
        last = self._stamp_due(attr, now)
        if last is None:
            return
        self._stamped[attr] = now            # first: concurrent writers do not all write
        try:
            merge_attrs(self.store, self.id, {attr: now})
            self.header.attrs = {**self.header.attrs, attr: now}
        except EcfsError:
            self._stamped[attr] = last

    def _read_object(self, objno: int, off: int, n: int) -> bytes | None:
        """The object's bytes (short at its end), or None when this view has
        no such object (read the parent, or zeros)."""
        if self.snap is None:
            m = self._valid_map()
            if m is not None and objno < len(m.states) and m.states[objno] == NONEXISTENT:
                return None             # known absent: no I/O
            return self._read_stored(data_object(self.id, objno), off, n)
        smap = self._snapshot_map()
        if smap is not None and (objno >= len(smap.states) or smap.states[objno] == NONEXISTENT):
            return None
        found = self._clone_of(objno, refresh=False)
        if found is None:
            got = self._read_stored(data_object(self.id, objno), off, n)
            # a writer copies the object to its clone before changing the head:
            # if one appeared meanwhile, the head bytes may be newer than the snapshot
            found = self._clone_of(objno, refresh=True)
            if found is None:
                return got
        name, csize = found
        if csize == 0:
            return None               # whiteout: absent at the snapshot
        return self._read_stored(name, off, n)

    def _read_stored(self, name: str, off: int, n: int) -> bytes | None:
        try:
            return self.store.read(name, off, n)
        except NotFound:
            return None

    def _clone_of(self, objno: int, refresh: bool):
        if objno in self._clones:
            return self._clones[objno]
        if refresh:
            self.header = load_header(self.store, self.id, self.name)
        found = snapshot.find_clone(self.store, self.header, objno, self.snap.id)
        if found is not None:
            self._clones[objno] = found       # clones never change
        return found

    def _snapshot_map(self) -> ObjectMap | None:
        if not self.header.has("object-map"):
            return None
        if self._snap_map is None:
            m = ObjectMap(self.store, self.id, self.snap.id)
            m.load(-(-self.snap.size // self.header.object_size))
            self._snap_map = m
        return self._snap_map if self._snap_map.valid else None

    def _read_parent(self, pos: int, out: np.ndarray) -> None:
        """Fill ``out`` (image bytes from ``pos``) from the parent within the
        overlap; the rest stays zero."""
        p = self.parent_info()
        if p is None or pos >= p.overlap:
            return
        n = min(len(out), p.overlap - pos)
        got = self._parent().read(pos, n)
        out[:len(got)] = np.frombuffer(got, dtype=np.uint8)

    def _parent(self) -> "Image":
        p = self.parent_info()
        if self._parent_img is None or self._parent_img.snap.id != p.snap_id:
            self._parent_img = Image(self.store, image_id=p.image_id, snap_id=p.snap_id)
        return self._parent_img

    # ------------------------------------------------------------ writes
    def write(self, data, offset: int) -> int:
        self._check_writable()
        data = memoryview(data).cast("B")
        if offset < 0:
            raise InvalidArgument("offset must not be negative")
        with self._owner.writing():
            if offset + len(data) > self.header.size:
                raise InvalidArgument(f"write of {len(data)} bytes at {offset} is past the end "
                                      f"of image {self.name!r} ({self.header.size} bytes)")
            osz = self.header.object_size
            for objno, off, n, at in self._objects(offset, len(data)):
                piece = data[at:at + n]
                zeros = not np.frombuffer(piece, dtype=np.uint8).any()
                # Zero detection is decided under the object's lock, against the
                # writes to it under way: a discard never races a store write.
                with self._obj_lock(objno):
                    if zeros:
                        if self._zeros_cover(objno, off, n) and not self._in_flight.get(objno):
                            # zeros over a whole object (perhaps in several writes,
                            # as FUSE cuts them): deleted, never stored as zeros
                            self._discard(objno * osz,
                                          min(osz, self.header.size - objno * osz))
                            continue
                        if not self._head_exists(objno) and not self._parent_covers(objno):
                            continue        # zeros into an absent object: nothing to store
                    else:
                        self._zero_spans.pop(objno, None)
                    self._in_flight[objno] = self._in_flight.get(objno, 0) + 1
                try:
                    self._prepare(objno)
                    self.store.write(data_object(self.id, objno), off, piece, size_hint=osz)
                finally:
                    with self._obj_lock(objno):
                        left = self._in_flight[objno] - 1
                        if left:
                            self._in_flight[objno] = left
                        else:
                            del self._in_flight[objno]
            self._stamp("mtime_ns")
        return len(data)

    def try_write(self, data, offset: int) -> int | None:
        """The write, if it can be done now without blocking: the stripe
        cache takes it (the lock is held, the object prepared, the cache
        has room). None: call ``write`` from a thread that may block. Run
        on the FUSE loop, so it never waits on a lock another thread holds."""
        if not self._wb or self._closed:
            return None
        data = memoryview(data).cast("B")
        n = len(data)
        osz = self.header.object_size
        objno = offset // osz
        if not n or offset < 0 or offset + n > self.size() or \
                (offset + n - 1) // osz != objno or \
                self._stamp_due("mtime_ns", time.time_ns()) is not None:
            return None
        if not self._owner.try_writing():
            return None
        try:
            if not self._wb:
                return None
            m = self._valid_map()
            if (m.states[objno] != EXISTS) if m is not None else objno not in self._prepared:
                return None         # a snapshot copy, a copy-up or a map update first
            lock = self._obj_lock(objno)
            if not lock.acquire(blocking=False):
                return None
            try:
                if _all_zero(data):
                    return None     # zeros may free the object: the worker decides
                self._zero_spans.pop(objno, None)
                if not self.store.try_write(data_object(self.id, objno), offset - objno * osz,
                                            data, size_hint=osz):
                    return None
            finally:
                lock.release()
        finally:
            self._owner.end_writing()
        return n

    def _zeros_cover(self, objno: int, off: int, n: int) -> bool:
        """Record that [off, off+n) of the object was written with zeros;
        True when zeros written since its last non-zero write cover it all.
        (A non-zero write forgets the object, and so does any maintenance
        operation; the record is bounded.) Called under the object's lock."""
        osz = self.header.object_size
        length = min(osz, self.header.size - objno * osz)
        with self._mutex:
            spans = self._zero_spans.pop(objno, [])
            spans.append((off, off + n))
            spans.sort()
            merged: list = []
            for a, b in spans:
                if merged and a <= merged[-1][1]:
                    merged[-1] = (merged[-1][0], max(merged[-1][1], b))
                else:
                    merged.append((a, b))
            covered = merged[0][0] <= 0 and merged[0][1] >= length
            if len(self._zero_spans) >= 4096:
                self._zero_spans.pop(next(iter(self._zero_spans)))
            # kept when covered too: an image growing by zero writes extends it
            self._zero_spans[objno] = merged
            return covered

    def _prepare(self, objno: int, copy_up: bool = True) -> None:
        """Make head object ``objno`` ready to change: preserve it for the
        newest snapshot, copy it up from the parent, mark it EXISTS."""
        m = self._valid_map()
        if m is not None:
            if m.states[objno] == EXISTS:
                return
        elif objno in self._prepared:
            return
        with self._obj_lock(objno):
            m = self._valid_map()
            if m is not None and m.states[objno] == EXISTS:
                return
            if objno in self._prepared:
                return
            self._preserve(objno)
            if copy_up:
                self._copy_up(objno)
            if m is not None:
                with self._mutex:
                    m.set(objno, EXISTS)
            else:
                self._prepared.add(objno)

    def _preserve(self, objno: int) -> None:
        if not self.header.snapshots:
            return
        m = self._valid_map()
        if m is not None and m.states[objno] in (NONEXISTENT, EXISTS):
            return       # absent at the newest snapshot, or already preserved
        snapshot.preserve(self.store, self.header, objno, data_object(self.id, objno),
                          self.header.object_size, whiteout=m is None)

    def _shared_with_snapshot(self, objno: int) -> bool:
        newest = self.header.newest_snap_id()
        if newest is None:
            return False
        m = self._valid_map()
        if m is not None:
            return m.states[objno] == EXISTS_CLEAN
        return snapshot.find_clone(self.store, self.header, objno, newest) is None

    def _parent_covers(self, objno: int) -> bool:
        p = self.header.parent
        return p is not None and objno * self.header.object_size < p.overlap

    def _head_exists(self, objno: int) -> bool:
        m = self._valid_map()
        if m is not None and m.states[objno] in (NONEXISTENT, EXISTS, EXISTS_CLEAN):
            return m.states[objno] != NONEXISTENT
        return self.store.exists(data_object(self.id, objno))

    def _copy_up(self, objno: int) -> bool:
        """Copy the parent's bytes of an object the child lacks; True if copied."""
        p = self.header.parent
        osz = self.header.object_size
        start = objno * osz
        if p is None or start >= p.overlap or self._head_exists(objno):
            return False
        n = min(osz, p.overlap - start, max(0, self.header.size - start))
        if n <= 0:
            return False
        data = self._parent().read(start, n)
        if not np.frombuffer(data, dtype=np.uint8).any():
            return False           # the parent has zeros here: nothing to keep
        m = self._valid_map()
        if m is not None and m.states[objno] == NONEXISTENT:
            # "may exist" before the copy: killed after it, the map must not
            # say absent of an object that is there (check, rm, diff would
            # miss it); EXISTS would tell the next writer the copy was done.
            # PENDING sends readers to the store (absent: the parent) and the
            # next writer to copy again if it finds nothing.
            with self._mutex:
                m.set(objno, PENDING)
        self.store.write_full(data_object(self.id, objno), data)
        return True

    def discard(self, offset: int, length: int) -> None:
        """Deallocate [offset, offset+length): whole objects are deleted, partial
        ones zeroed (their all-zero pages deallocated). Within a parent's
        overlap an object is zeroed, never deleted (that would show the
        parent's bytes again)."""
        self._check_writable()
        if offset < 0 or length < 0:
            raise InvalidArgument("offset and length must not be negative")
        with self._owner.writing():
            self._discard(offset, length)
            self._stamp("mtime_ns")

    def _discard(self, offset: int, length: int) -> None:
        # (size(): while the header grows ahead, the map may not have yet)
        length = max(0, min(length, self.size() - offset))
        osz = self.header.object_size
        p = self.header.parent
        for objno, off, n, _ in self._objects(offset, length):
            obj = data_object(self.id, objno)
            covered = p is not None and objno * osz < p.overlap
            m = self._valid_map()
            if m is not None and m.states[objno] == NONEXISTENT and not covered:
                continue
            whole = off == 0 and (n == osz or objno * osz + n >= self.header.size)
            if whole and not covered:
                self._remove_object(objno)
            elif whole:
                with self._obj_lock(objno):
                    self._preserve(objno)
                    if m is not None:
                        m.set(objno, EXISTS)
                    # an all-hole object of the full length: reads as zeros, not as the parent
                    self.store.write_full(obj, bytes(min(osz, self.header.size - objno * osz)))
            else:
                if covered:
                    self._prepare(objno)
                elif not self._head_exists(objno):
                    continue
                else:
                    self._prepare(objno, copy_up=False)
                self.store.zero(obj, off, n)

    def _remove_object(self, objno: int) -> None:
        """Delete a head object (preserving it for the newest snapshot first)."""
        with self._obj_lock(objno):
            self._preserve(objno)
            m = self._valid_map()
            if m is not None:
                m.set(objno, PENDING)
            try:
                self.store.remove(data_object(self.id, objno))
            except NotFound:
                pass
            if m is not None:
                m.set(objno, NONEXISTENT)
            self._prepared.discard(objno)

    def flush(self) -> None:
        """Every write that returned before this call is durable (the
        stripe cache writes this image's dirty bytes out), and the header
        says the size they made."""
        self._check_open()
        self.settle_size()
        self.store.flush(self._data_prefix)

    # ------------------------------------------------------------ growth
    def write_growing(self, data, offset: int) -> int:
        """``write``, growing the image first when the write ends past it
        (a file written past its end: the mount's writes)."""
        end = offset + len(memoryview(data).cast("B"))
        self.grow_for_write(end)
        try:
            return self.write(data, offset)
        except InvalidArgument:
            if end <= self.size():
                raise
            # the write took the lock from a writer whose header was ahead
            # of what it wrote (it settled at the hand-over): grow now
            self.grow_for_write(end)
            return self.write(data, offset)

    def grow_for_write(self, end: int) -> None:
        """Make the image at least ``end`` bytes for a write past its end
        (the module docstring: "Growth by writes")."""
        if end <= self.size():
            return
        if end > MAX_IMAGE_SIZE:
            raise InvalidArgument(f"image size must be within 0..{MAX_IMAGE_SIZE}")
        with self._size_lock:
            ours = self._wb and self._owner.try_writing()
            if ours:
                try:
                    grew = self._grow_ahead(end)
                finally:
                    self._owner.end_writing()
        if ours:
            if grew:
                self._owner.notify_header()
            return
        # the plain way (waits for the gate): one at a time, and a write
        # that finds the image grown past it meanwhile is done
        with self._grow_lock:
            if end <= self.size():
                return
            try:
                self.resize(end, allow_shrink=False)
            except InvalidArgument:
                self.reload_header(notify=False)    # the stored size, not ours of before
                if end > self.size():
                    raise           # (else another write grew it past ``end``)

    def _grow_ahead(self, end: int) -> bool:
        """(gate shared, _size_lock held) True when the header grew."""
        if end <= self.size():
            return False
        if end <= self.header.size:
            self._written_end = end         # within what the header already says
            return False
        cur = self.header.size
        osz = self.header.object_size
        ahead = max(end, min(2 * cur, cur + GROW_AHEAD_MAX))
        ahead = min(MAX_IMAGE_SIZE, -(-ahead // osz) * osz)     # (>= end: end <= the max)
        before = self._written_end
        # size() stays where it is until the header and the map are grown
        # (a write it let through meanwhile would find neither)
        self._written_end = self.size()
        try:
            self._resize(ahead, allow_shrink=False, done=False)
        except BaseException:
            self._written_end = before
            raise
        self._grown_to = ahead
        self._written_end = end
        return True

    def settle_size(self) -> None:
        """The header's size back to what growing writes wrote (a header
        write), if it is ahead and the lock is still ours. Never an error:
        a header left ahead loses nothing (its tail reads as zeros), and the
        next flush, hand-over or op tries again."""
        if self._written_end is None:
            return
        with self._owner.gate.shared(), self._size_lock:
            settled = self._settle_logged()
        if settled:
            self._owner.notify_header()

    def _settle_logged(self) -> bool | None:
        """_settle_size, a failure logged (None): the header stays ahead,
        its tail reads as zeros, nothing is lost."""
        try:
            return self._settle_size()
        except (EcfsError, OSError) as e:
            log.warning("image %r: its size stays %d for now (%d written): %s",
                        self.name, self.header.size, self._written_end or 0, e)
            return None

    def _settle_size(self) -> bool:
        """(the gate held: exclusive, or shared with _size_lock) True when
        the header was written. Nothing lies past ``_written_end`` (no
        write went there), so this is the header alone. Only while the
        lock is ours and the stored header still says the size grown to:
        an owner fenced meanwhile (``lock rm``) must not cut the size under
        what the next owner wrote. (The lock is checked under the header
        lock, which a break takes too.)"""
        end = self._written_end
        if end is None:
            return False
        wrote = False
        if end < self.header.size:
            try:
                wrote = self._save_size(end, allow_shrink=True, done=False,
                                        expect=self._grown_to)
            except Fenced:
                pass                    # not ours to settle any more
        self._written_end = None
        return wrote

    # -------------------------------------------------------------- diff
    def diff_iterate(self, offset: int, length: int, from_snapshot: str | None,
                     iterate_cb, include_parent: bool = True, whole_object: bool = False) -> None:
        """Call ``iterate_cb(offset, length, exists)`` for every extent of
        [offset, offset+length) that differs between ``from_snapshot`` (None:
        an empty image) and this view, in ascending order (python-rbd's
        signature). ``exists`` False: the extent now reads as zeros."""
        from .diff import diff_extents
        for off, n, exists, _ in diff_extents(self, from_snapshot, offset, length,
                                              whole_object=whole_object,
                                              include_parent=include_parent):
            iterate_cb(off, n, exists)

    # ------------------------------------------------------------ locking
    def _check_open(self) -> None:
        if self._closed:
            raise InvalidArgument(f"image {self.name!r} is closed")

    def _check_writable(self) -> None:
        self._check_open()
        if self.read_only:
            what = "a snapshot view" if self.snap is not None else "open read-only"
            raise ReadOnly(f"image {self.name!r} is {what}")

    # The lock, as librbd does it (rbdlike.lock_owner): the first write
    # takes it; a process that holds it hands it over when a peer asks
    # (unless it holds it exclusively); maintenance ops from elsewhere are
    # run by the holder.
    def acquire_lock(self, exclusive: bool = False) -> None:
        """Take the exclusive lock now. ``exclusive``: refuse to hand it
        over to peers that ask (they get Busy) until close or release."""
        self._check_writable()
        self._owner.exclusive = exclusive
        self._owner.acquire()

    def release_lock(self) -> None:
        """Flush and give the lock up (the next write takes it again)."""
        self._owner.release()

    def lock_owner(self):
        """Who holds the image's lock (exclusive_lock.Owner), or None."""
        return self._owner.owner()

    def _lock_acquired(self, lock) -> None:
        """The lock is ours (under the mutex): what another writer did
        before us is in the store, so reload the header and the head map,
        finish a half-taken snapshot, then let writes wait in the cache."""
        locked = isinstance(lock, ExclusiveLock)
        guarded = (self._data_prefix, f"rbd_object_map.{self.id}")
        if locked:
            for prefix in guarded:
                self.store.add_guard(prefix, lock.guard)
        try:
            self.header = load_header(self.store, self.id, self.name)
            self._prepared.clear()
            self._map = None
            if locked and self.header.has("object-map"):
                m = ObjectMap(self.store, self.id)
                m.load(self.header.num_objects)
                if self.header.object_map_invalid:
                    m.valid, m.why = False, "flagged invalid (run 'ecfs rbd object-map rebuild')"
                self._map = m
                if not m.valid and not self.header.object_map_invalid:
                    self._flag_map_invalid()
            if self.header.snap_pending:
                self._finish_snap()
        except BaseException:
            if locked:
                for prefix in guarded:
                    self.store.remove_guard(prefix)
            self._map = None
            raise
        if locked:
            # ours alone now: writes may wait in the stripe cache
            self._wb = self.store.set_writeback(self._data_prefix, True)

    def _lock_releasing(self) -> None:
        """The lock is about to go (gate exclusive, mutex held): write the
        cached bytes out (a failure keeps the lock: nobody may write under
        bytes still waiting here), then forget what the lock vouched for."""
        if self._settle_logged() is None:   # (the gate exclusive: no growing write under way)
            self._written_end = None        # the header stays ahead: nothing lost
        try:
            self.store.flush(self._data_prefix)
        except Fenced:
            pass    # the bytes were dropped (the flush that found it said so)
        self.store.set_writeback(self._data_prefix, False)
        self._wb = False
        for prefix in (self._data_prefix, f"rbd_object_map.{self.id}"):
            self.store.remove_guard(prefix)
        self._map = None
        self._prepared.clear()
        self._zero_spans.clear()

    def _before_op(self, op: str) -> None:
        """Before a maintenance op runs here (gate held): objects may change
        under it, and a snapshot, rollback, flatten... acts on what was
        written. A resize needs no flush: removals and truncations order
        themselves in the stripe cache."""
        with self._mutex:
            self._zero_spans.clear()
        with self._size_lock:
            self._settle_size()     # the op (a resize too) acts on the size written
        if op != "resize":
            self.store.flush(self._data_prefix)

    def _peer_flush(self) -> None:
        """A reader elsewhere (export, diff, du) is to see our writes, and
        the size they made."""
        if not self._closed:
            self.settle_size()
            self.store.flush(self._data_prefix)

    def _stored_requests(self) -> list:
        return load_header(self.store, self.id, self.name).requests

    def reload_header(self, notify: bool = True) -> None:
        """Read the header again (a peer changed it: size, snapshots,
        attributes); ``notify``: then call ``on_peer_change``."""
        with self._mutex:
            old = self.header.newest_snap_id()
            self.header = load_header(self.store, self.id, self.name)
            if self.snap is not None:
                self._clones.clear()
            if self.header.newest_snap_id() != old:
                # a snapshot taken elsewhere (a shared image's other writer):
                # our next write to each object must preserve it for that one
                self._prepared.clear()
        if notify:
            self._peer_changed()

    def _peer_changed(self) -> None:
        cb = self.on_peer_change
        if cb is not None:
            try:
                cb()
            except Exception:
                log.exception("image %r: on_peer_change failed", self.name)

    def close(self) -> None:
        if self._closed:
            return
        self.settle_size()          # (an image without the exclusive-lock feature has no hand-over)
        self._closed = True
        self._owner.closing()       # peers' requests go to the next holder from now
        try:
            self.store.flush(self._data_prefix)
        finally:
            if self._parent_img is not None:
                self._parent_img.close()
            self._owner.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


_ZEROS = bytes(1 << 20)


def _all_zero(buf: memoryview) -> bool:
    """Whether every byte is 0: one memcmp against zeros, which stops at the
    first non-zero byte (numpy's any() costs more for a 4 KiB write)."""
    n = len(buf)
    if isinstance(buf.obj, bytes) and len(buf.obj) == n and n <= len(_ZEROS):
        return buf.obj[:1] == b"\0" and buf.obj == _ZEROS[:n]
    return not np.frombuffer(buf, dtype=np.uint8).any()
