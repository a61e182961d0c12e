"""An open image: byte I/O over its data objects, gated by the object map
and the exclusive lock (the shape of python-rbd's ``rbd.Image``).

``Image(store, name, snapshot=None, read_only=False)``: ``read``, ``write``,
``discard``, ``flush``, ``size``, ``resize``, ``stat``, snapshots
(``create_snap``, ``remove_snap``, ``rollback_to_snap``, ``protect_snap``,
``unprotect_snap``, ``list_snaps``), ``flatten``, ``diff_iterate``,
``close`` (or use it as a context manager). Opened at a snapshot it is a
read-only view of the image as it was then.

The first write takes the image's exclusive lock (images with the
exclusive-lock feature); read-only opens never do. With the object-map
feature the owner keeps the head map in memory: a read of a NONEXISTENT
object returns zeros (or the parent's bytes) without touching the store,
and a write marks its object EXISTS once, before its data.

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
from contextlib import contextmanager

import numpy as np

from backend.errors import Busy, EcfsError, Exists, Fenced, InvalidArgument, NotFound, ReadOnly

from . import directory, layering, notify, snapshot
from .exclusive_lock import ExclusiveLock, owner
from .header import (MAX_IMAGE_SIZE, ImageHeader, Parent, Snapshot, data_object,
                     header_object, validate_image_name)
from .objectmap import EXISTS, EXISTS_CLEAN, NONEXISTENT, PENDING, ObjectMap

log = logging.getLogger("ecfs.image")

_OBJ_LOCKS = 64
# librbd's rbd_mtime_update_interval / rbd_atime_update_interval: the image's
# modify and access timestamps move at most this often (seconds), so
# writes and reads stay cheap
TIMESTAMP_INTERVAL = float(os.environ.get("ECFS_TIMESTAMP_INTERVAL", "60"))


def load_header(store, image_id: str, name: str = "") -> ImageHeader:
    try:
        raw = store.read(header_object(image_id), 0, 1 << 26)
    except NotFound:
        raise NotFound(f"image {name or image_id!r}: header object is missing")
    return ImageHeader.decode(raw, f"image {name or image_id!r}")


def merge_attrs(store, image_id: str, changes: dict[str, int]) -> ImageHeader:
    """Merge file attributes (mode, owner, timestamps) into the image's
    header under its header lock; returns the new header."""
    with directory.header_lock(store, image_id):
        hdr = load_header(store, image_id)
        hdr.attrs = {**hdr.attrs, **{k: int(v) for k, v in changes.items()}}
        save_header(store, hdr)
        return hdr


def flush_owner(store, image_id: str, strict: bool = True) -> None:
    """Have the image's lock owner, if another process (a mount), write its
    cached bytes out: a reader (export, diff, du, an open in another
    mount) then sees every write that completed before it started.
    Unreachable owner: it is closing, and a close flushes before the lock
    goes. An owner that fails or does not answer is an error if
    ``strict``, else logged."""
    o = owner(store, image_id)
    if o is None or not o.address or o.pid == os.getpid():
        return
    try:
        notify.request(o.address, {"op": "flush"})
    except (notify.Unreachable, notify.NotOwner):
        pass
    except EcfsError as e:
        if strict:
            raise
        log.warning("image %s: its lock owner (pid %d) did not flush: %s", image_id, o.pid, e)


def save_header(store, hdr: ImageHeader) -> None:
    store.write_full(header_object(hdr.id), hdr.encode())


class Image:
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
        self._lock: ExclusiveLock | None = None
        self._map: ObjectMap | None = None
        self._snap_map: ObjectMap | None = None
        self._parent_img: Image | None = None
        self._clones: dict[int, tuple[str, int]] = {}   # snapshot view: objno -> clone found
        self._prepared: set[int] = set()               # no-map images: objects prepared
        self._zero_spans: dict[int, list] = {}         # objno -> ranges written with zeros
        self._obj_locks = [threading.RLock() for _ in range(_OBJ_LOCKS)]
        self._in_flight: dict[int, int] = {}           # objno -> store writes under way
        self._mutex = threading.RLock()           # header, map and lock state
        self._acquiring = threading.Lock()        # one lock acquisition at a time
        self._gate = _Gate()                      # writes shared, maintenance exclusive
        self._watch: notify.Watch | None = None
        self._exclusive = False
        self._closed = False
        # the access timestamp is kept by the mount's own images only (a CLI
        # export reading an image does not write its header)
        self._keeps_atime = watch and not self.read_only
        self._stamped: dict[str, int] = {}        # attr -> value last written
        self._data_prefix = f"rbd_data.{self.id}."
        self._wb = False                          # the store writes our data back
        if watch:
            self._ensure_watch()
        elif self.read_only and self.snap is None:
            flush_owner(store, self.id)

    # ------------------------------------------------------------ queries
    def size(self) -> int:
        return self.snap.size if self.snap is not None else self.header.size

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
        if offset >= h.size or (self._keeps_atime and
                                self._stamp_due("atime_ns", time.time_ns()) is not None):
            return None
        length = min(length, h.size - offset)
        objno, off = divmod(offset, h.object_size)
        if off + length > h.object_size:
            return None
        m = self._valid_map()
        if m is not None and objno < len(m.states) and m.states[objno] == NONEXISTENT:
            return None if h.parent is not None else bytes(length)
        got = self.store.try_read(data_object(self.id, objno), off, length)
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
        with self._writing():
            if offset + len(data) > self.header.size:
                raise InvalidArgument(f"write of {len(data)} bytes at {offset} is past the end "
                                      f"of image {self.name!r} ({self.header.size} bytes)")
            osz = self.header.object_size
            for objno, off, n, at in self._objects(offset, len(data)):
                piece = data[at:at + n]
                zeros = not np.frombuffer(piece, dtype=np.uint8).any()
                # Zero detection is decided under the object's lock, against the
                # writes to it under way: a discard never races a store write.
                with self._obj_locks[objno % _OBJ_LOCKS]:
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
                    with self._obj_locks[objno % _OBJ_LOCKS]:
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
        if not n or offset < 0 or offset + n > self.header.size or \
                (offset + n - 1) // osz != objno or \
                self._stamp_due("mtime_ns", time.time_ns()) is not None:
            return None
        if not self._gate.try_acquire_shared():
            return None
        try:
            if not (self._lock_held() and self._wb):
                return None
            m = self._valid_map()
            if (m.states[objno] != EXISTS) if m is not None else objno not in self._prepared:
                return None         # a snapshot copy, a copy-up or a map update first
            lock = self._obj_locks[objno % _OBJ_LOCKS]
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
            self._gate.release_shared()
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
        with self._obj_locks[objno % _OBJ_LOCKS]:
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
        with self._writing():
            self._discard(offset, length)
            self._stamp("mtime_ns")

    def _discard(self, offset: int, length: int) -> None:
        length = max(0, min(length, self.header.size - offset))
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
                with self._obj_locks[objno % _OBJ_LOCKS]:
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
        with self._obj_locks[objno % _OBJ_LOCKS]:
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
        stripe cache writes this image's dirty bytes out)."""
        self._check_open()
        self.store.flush(self._data_prefix)

    def resize(self, size: int, allow_shrink: bool = True, progress=None) -> None:
        self._check_writable()
        if not isinstance(size, int) or size < 0 or size > MAX_IMAGE_SIZE:
            raise InvalidArgument(f"image size must be within 0..{MAX_IMAGE_SIZE}")
        self._run_maint("resize", lambda: self._resize(size, allow_shrink, progress), progress,
                        size=size, allow_shrink=allow_shrink)

    def _resize(self, size: int, allow_shrink: bool, progress=None) -> None:
        old = self.header.size
        if size < old and not allow_shrink:
            raise InvalidArgument("shrinking an image needs --allow-shrink")
        if size == old:
            return
        osz = self.header.object_size
        if size < old:
            # drop whole objects past the new end, cut the last one
            first_gone = -(-size // osz)
            m = self._valid_map()
            last = self.header.num_objects
            for objno in range(first_gone, last):
                if m is None or m.states[objno] != NONEXISTENT:
                    self._remove_object(objno)
                if progress:
                    progress(objno - first_gone + 1, last - first_gone)
            if size % osz:
                objno = size // osz
                if self._head_exists(objno):
                    self._prepare(objno, copy_up=False)
                    try:
                        self.store.truncate(data_object(self.id, objno), size % osz)
                    except NotFound:
                        pass
        with directory.header_lock(self.store, self.id):
            hdr = load_header(self.store, self.id, self.name)
            hdr.size = size
            if hdr.parent is not None and hdr.parent.overlap > size:
                hdr.parent.overlap = size     # shrinking cuts the parent off for good
            save_header(self.store, hdr)
            self.header = hdr
        if self._map is not None and self._map.valid:
            with self._mutex:
                self._map.resize(self.header.num_objects)

    # --------------------------------------------------------- snapshots
    def create_snap(self, name: str) -> int:
        """Take snapshot ``name`` of the head; returns its id. Every write
        that returned before this call is in it."""
        self._check_writable()
        validate_image_name(name, "snapshot")
        return self._run_maint("snap_create", lambda: self._create_snap(name), name=name)

    def _create_snap(self, name: str) -> int:
        self.flush()
        with self._mutex:
            with directory.header_lock(self.store, self.id):
                hdr = load_header(self.store, self.id, self.name)
                if any(s.name == name for s in hdr.snapshots):
                    raise Exists(f"snapshot {self.name}@{name} already exists")
                snap_id = hdr.snap_seq + 1
                m = self._valid_map()
                if hdr.has("object-map"):
                    if m is None:
                        m = self._rebuild_head_map()
                    sm = ObjectMap(self.store, self.id, snap_id)
                    sm.states = m.states.copy()
                    sm.save()
                hdr.snap_seq = snap_id
                hdr.snap_pending = {"id": snap_id, "name": name, "timestamp": time.time()}
                save_header(self.store, hdr)
                self.header = hdr
            self._finish_snap()
        return snap_id

    def _finish_snap(self) -> None:
        """Second half of create_snap, also run by the next writer when a
        process died between the halves: head map EXISTS -> EXISTS_CLEAN
        (before the snapshot is visible, so a write never skips its copy),
        then the snapshot record."""
        m = self._valid_map()
        if m is not None:
            m.states[m.states == EXISTS] = EXISTS_CLEAN
            m.save()
        with directory.header_lock(self.store, self.id):
            hdr = load_header(self.store, self.id, self.name)
            pend = hdr.snap_pending
            if pend is None:
                self.header = hdr
                return
            parent = None
            if hdr.parent is not None:
                parent = Parent(**vars(hdr.parent))
            hdr.snapshots.append(Snapshot(pend["id"], pend["name"], hdr.size,
                                          pend["timestamp"], parent=parent))
            hdr.snap_pending = None
            save_header(self.store, hdr)
            self.header = hdr
        self._prepared.clear()

    def remove_snap(self, name: str, progress=None) -> None:
        self._check_writable()
        self._run_maint("snap_rm", lambda: self._remove_snap(name, progress), progress, name=name)

    def _remove_snap(self, name: str, progress=None) -> None:
        with self._mutex:
            hdr = load_header(self.store, self.id, self.name)
            s = hdr.snap(name)
            if s.protected:
                raise Busy(f"snapshot {self.name}@{name} is protected "
                           f"('ecfs rbd snap unprotect {self.name}@{name}' first)")
            kids = layering.children(self.store, self.id, s.id)
            if kids:
                raise Busy(f"snapshot {self.name}@{name} has clones: {', '.join(kids)}")
            osz = hdr.object_size
            nobj = max([-(-x.size // osz) for x in hdr.snapshots] + [hdr.num_objects])
            self._merge_snap_map(hdr, s)
            kept = snapshot.prune_clones(self.store, hdr, s.id, nobj, progress)
            ObjectMap(self.store, self.id, s.id).remove()
            with directory.header_lock(self.store, self.id):
                hdr = load_header(self.store, self.id, self.name)
                hdr.snapshots = [x for x in hdr.snapshots if x.id != s.id]
                hdr.clone_ids = kept
                save_header(self.store, hdr)
                self.header = hdr

    def _merge_snap_map(self, hdr: ImageHeader, s: Snapshot) -> None:
        """Carry the removed snapshot's "written since the one before" marks
        into the next map, so diffs across the gap still see those writes."""
        if not hdr.has("object-map"):
            return
        osz = hdr.object_size
        gone = ObjectMap(self.store, self.id, s.id)
        if not gone.load(-(-s.size // osz)):
            return
        later = sorted((x for x in hdr.snapshots if x.id > s.id), key=lambda x: x.id)
        if later:
            nxt = ObjectMap(self.store, self.id, later[0].id)
            if not nxt.load(-(-later[0].size // osz)):
                return
        else:
            nxt = self._valid_map()
            if nxt is None:
                return
        n = min(len(gone.states), len(nxt.states))
        mark = (gone.states[:n] == EXISTS) & (nxt.states[:n] == EXISTS_CLEAN)
        if mark.any():
            nxt.states[:n][mark] = EXISTS
            nxt.save()

    def _set_protected(self, name: str, value: bool) -> None:
        self._check_open()
        if self.snap is not None:
            raise ReadOnly("a snapshot view cannot change snapshots")
        with directory.header_lock(self.store, self.id):
            hdr = load_header(self.store, self.id, self.name)
            s = hdr.snap(name)
            if s.protected == value:
                # rbd answers EBUSY for "already protected", EINVAL for "not protected"
                cls = Busy if value else InvalidArgument
                raise cls(f"snapshot {self.name}@{name} is "
                          f"{'already' if value else 'not'} protected")
            if not value:
                kids = layering.children(self.store, self.id, s.id)
                if kids:
                    raise Busy(f"snapshot {self.name}@{name} has clones: {', '.join(kids)} "
                               f"(flatten or remove them first)")
            if value and not hdr.has("layering"):
                raise InvalidArgument(f"image {self.name!r} has no layering feature")
            s.protected = value
            save_header(self.store, hdr)
            self.header = hdr

    def protect_snap(self, name: str) -> None:
        self._set_protected(name, True)
        self._notify_header()

    def unprotect_snap(self, name: str) -> None:
        self._set_protected(name, False)
        self._notify_header()

    def is_protected_snap(self, name: str) -> bool:
        return load_header(self.store, self.id, self.name).snap(name).protected

    def rollback_to_snap(self, name: str, progress=None) -> None:
        """Make the head what it was at snapshot ``name`` (the head's changes
        since are lost; the snapshots stay)."""
        self._check_writable()
        self._run_maint("snap_rollback", lambda: self._rollback(name, progress), progress,
                        name=name)

    def _rollback(self, name: str, progress=None) -> None:
        s = self.header.snap(name)
        view = Image(self.store, image_id=self.id, snap_id=s.id)
        osz = self.header.object_size
        if self.header.size != s.size:
            self._resize(s.size, True)
        n = -(-s.size // osz)
        m = self._valid_map()
        smap = view._snapshot_map()
        for objno in range(n):
            absent_then = smap is not None and smap.states[objno] == NONEXISTENT
            if absent_then and m is not None and objno < len(m.states) and \
                    m.states[objno] == NONEXISTENT:
                pass                               # absent then and now
            else:
                data = None if absent_then else view._read_object(objno, 0, osz)
                if data is None:
                    if objno < self.header.num_objects and self._head_exists(objno):
                        self._remove_object(objno)
                else:
                    self._prepare(objno, copy_up=False)
                    self.store.write_full(data_object(self.id, objno), data)
            if progress:
                progress(objno + 1, n)
        with directory.header_lock(self.store, self.id):
            hdr = load_header(self.store, self.id, self.name)
            hdr.parent = None if s.parent is None else Parent(**vars(s.parent))
            save_header(self.store, hdr)
            self.header = hdr
        view.close()

    def sparsify(self, progress=None) -> None:
        """Deallocate all-zero objects (deleted, or in a clone emptied) and
        all-zero 4 KiB pages of the others (``rbd sparsify``). Objects
        unchanged since the newest snapshot are left alone: the snapshot
        shares them, and changing them would only add a copy."""
        self._check_writable()
        self._run_maint("sparsify", lambda: self._sparsify(progress), progress, exclusive=False)

    def _sparsify(self, progress=None) -> None:
        osz = self.header.object_size
        n = self.header.num_objects
        for objno in range(n):
            if self._head_exists(objno) and not self._shared_with_snapshot(objno):
                start = objno * osz
                raw = self._read_stored(data_object(self.id, objno), 0, osz)
                if raw is not None:
                    a = np.frombuffer(raw, dtype=np.uint8)
                    if not a.any():
                        self._discard(start, min(osz, self.header.size - start))
                    else:
                        for off, ln in _zero_runs(a):
                            self._prepare(objno, copy_up=False)
                            self.store.zero(data_object(self.id, objno), off, ln)
            if progress:
                progress(objno + 1, n)

    # ---------------------------------------------------------- layering
    def flatten(self, progress=None) -> None:
        """Copy up everything still read from the parent, then drop the link."""
        self._check_writable()
        self._run_maint("flatten", lambda: self._flatten(progress), progress, exclusive=False)

    def _flatten(self, progress=None) -> None:
        p = self.header.parent
        if p is None:
            raise InvalidArgument(f"image {self.name!r} has no parent")
        osz = self.header.object_size
        n = -(-min(p.overlap, self.header.size) // osz)
        for objno in range(n):
            if not self._head_exists(objno):
                with self._obj_locks[objno % _OBJ_LOCKS]:
                    self._preserve(objno)
                    # the copy holds the parent's bytes: a crash before the map
                    # says EXISTS still reads the same bytes through the parent
                    if self._copy_up(objno):
                        m = self._valid_map()
                        if m is not None:
                            m.set(objno, EXISTS)
            if progress:
                progress(objno + 1, n)
        with directory.header_lock(self.store, self.id):
            hdr = load_header(self.store, self.id, self.name)
            hdr.parent = None
            save_header(self.store, hdr)
            self.header = hdr
        self._parent_img = None

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

    # The lock, as librbd does it: the first write takes it; a process that
    # holds it hands it over when a peer asks (unless it holds it
    # exclusively); maintenance ops from elsewhere are run by the holder.
    def acquire_lock(self, exclusive: bool = False) -> None:
        """Take the exclusive lock now. ``exclusive``: refuse to hand it
        over to peers that ask (they get Busy) until close or release."""
        self._check_writable()
        self._exclusive = exclusive
        self._writer()

    def release_lock(self) -> None:
        """Flush and give the lock up (the next write takes it again)."""
        # gate before mutex, always: a write holds the gate and may want the mutex
        with self._gate.exclusive(), self._mutex:
            if not isinstance(self._lock, ExclusiveLock):
                return
            try:
                self.store.flush(self._data_prefix)
            except Fenced:
                pass    # the bytes were dropped (the flush that found it said so)
            self.store.set_writeback(self._data_prefix, False)
            self._wb = False
            for prefix in (self._data_prefix, f"rbd_object_map.{self.id}"):
                self.store.remove_guard(prefix)
            self._lock.release()
            self._lock = None
            self._map = None
            self._prepared.clear()
            self._zero_spans.clear()
        self._broadcast({"op": "lock_released"})

    def _lock_held(self) -> bool:
        return self._lock is not None and self._lock.held

    @contextmanager
    def _writing(self):
        """Hold the I/O gate shared while holding the lock (a hand-over
        waits for the writes in flight, and no write starts without it)."""
        while True:
            self._writer()
            self._gate.acquire_shared()
            if self._lock_held():
                break
            self._gate.release_shared()
        try:
            yield
        finally:
            self._gate.release_shared()

    def _writer(self) -> None:
        """Become the image's writer: take the lock (asking its holder to
        hand it over), load the head map."""
        if self._lock_held():
            return
        with self._acquiring:
            deadline = time.monotonic() + notify.timeout()
            while not self._try_writer():
                o = owner(self.store, self.id)
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

    def _try_writer(self) -> bool:
        with self._mutex:
            if self._lock_held():
                return True
            if not self.header.has("exclusive-lock"):
                self.header = load_header(self.store, self.id, self.name)
                self._lock = _NoLock()
                if self.header.snap_pending:
                    self._finish_snap()
                return True
            lock = ExclusiveLock(self.store, self.id, self.name,
                                 address=self._ensure_watch().address, exclusive=self._exclusive)
            if not lock.try_acquire():
                return False
            # self._lock is set last: other threads take "held" to mean the
            # map is loaded and the header current (they check without the mutex)
            for prefix in (self._data_prefix, f"rbd_object_map.{self.id}"):
                self.store.add_guard(prefix, lock.guard)
            try:
                # what another writer did before us is in the store: reload
                self.header = load_header(self.store, self.id, self.name)
                self._prepared.clear()
                self._map = None
                if self.header.has("object-map"):
                    m = ObjectMap(self.store, self.id)
                    m.load(self.header.num_objects)
                    if self.header.object_map_invalid:
                        m.valid, m.why = False, ("flagged invalid "
                                                 "(run 'ecfs rbd object-map rebuild')")
                    self._map = m
                    if not m.valid and not self.header.object_map_invalid:
                        self._flag_map_invalid()
                if self.header.snap_pending:
                    self._finish_snap()
            except BaseException:
                for prefix in (self._data_prefix, f"rbd_object_map.{self.id}"):
                    self.store.remove_guard(prefix)
                self._map = None
                lock.release()
                raise
            # ours alone now: writes may wait in the stripe cache
            self._wb = self.store.set_writeback(self._data_prefix, True)
            self._lock = lock
        self._broadcast({"op": "lock_acquired"})
        return True

    def _run_maint(self, op: str, local, progress=None, exclusive: bool = True, **args):
        """Run a maintenance operation here if this process holds (or can
        take) the lock, else have the holder run it; then tell the watchers
        the header changed."""
        deadline = time.monotonic() + notify.timeout()
        while True:
            if not self._lock_held() and not self._try_writer():
                o = owner(self.store, self.id)
                if o is None:
                    if time.monotonic() > deadline:
                        raise Busy(f"image {self.name!r}: the lock cannot be taken")
                    time.sleep(0.005)       # released meanwhile: try again
                    continue
                if not o.address:
                    raise Busy(f"image {self.name!r} is locked by pid {o.pid} on {o.host}")
                msg = {"op": op, "deadline": time.time() + notify.timeout(), **args}
                try:
                    result = notify.request(o.address, msg, on_progress=progress)
                except (notify.NotOwner, notify.Unreachable):
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.005)
                    continue                # it handed the lock over, or is closing
                self._reload_header()
                return result
            with (self._gate.exclusive() if exclusive else self._gate.shared()):
                if self._lock_held():
                    with self._mutex:
                        self._zero_spans.clear()    # objects may change under it
                    if op != "resize":
                        # a snapshot, rollback, flatten... acts on what was
                        # written (a resize needs no flush: removals and
                        # truncations order themselves in the stripe cache)
                        self.store.flush(self._data_prefix)
                    result = local()
                    break
        self._notify_header()
        return result

    def _handle(self, msg: dict, progress):
        """A peer's request (rbdlike.notify), run in the watch's thread."""
        op = msg.get("op")
        if op == "request_lock":
            if self._exclusive and self._lock_held():
                raise Busy(f"image {self.name!r} is held exclusively by pid {os.getpid()}")
            self.release_lock()
            return None
        if op == "header_update":
            self._reload_header()
            return None
        if op in ("lock_acquired", "lock_released"):
            return None
        if op == "flush":
            # a reader elsewhere (export, diff, du) is to see our writes
            if not self._closed:
                self.store.flush(self._data_prefix)
            return None
        if time.time() > float(msg.get("deadline", 0) or 0):
            raise notify.TimedOut(f"request {op!r} arrived after its deadline")
        if not self._lock_held():
            raise notify.NotOwner(f"pid {os.getpid()} no longer holds the lock")
        if self.read_only:
            raise ReadOnly(f"image {self.name!r} is open read-only here")
        name = msg.get("name", "")
        ops = {
            "snap_create": lambda: self.create_snap(name),
            "snap_rm": lambda: self.remove_snap(name, progress),
            "snap_rollback": lambda: self.rollback_to_snap(name, progress),
            "resize": lambda: self.resize(int(msg["size"]), bool(msg.get("allow_shrink")),
                                          progress),
            "flatten": lambda: self.flatten(progress),
            "sparsify": lambda: self.sparsify(progress),
            "object_map_rebuild": lambda: self.rebuild_object_map(),
        }
        if op not in ops:
            raise InvalidArgument(f"unknown request {op!r}")
        return ops[op]()

    def _ensure_watch(self) -> notify.Watch:
        if self._watch is None:
            self._watch = notify.Watch(self.store, self.id, self._handle)
        return self._watch

    def _broadcast(self, msg: dict) -> None:
        if self._watch is not None:
            notify.broadcast(self.store, self.id, msg, skip_cookie=self._watch.cookie)

    def _notify_header(self) -> None:
        cookie = self._watch.cookie if self._watch is not None else ""
        notify.broadcast(self.store, self.id, {"op": "header_update"}, skip_cookie=cookie)

    def _reload_header(self) -> None:
        with self._mutex:
            old = self.header.newest_snap_id()
            self.header = load_header(self.store, self.id, self.name)
            if self.snap is not None:
                self._clones.clear()
            if self.header.newest_snap_id() != old:
                # a snapshot taken elsewhere (a shared image's other writer):
                # our next write to each object must preserve it for that one
                self._prepared.clear()

    def rebuild_object_map(self) -> int:
        """``object-map rebuild``: regenerate the head map from the objects;
        returns how many objects are present."""
        self._check_writable()
        if not self.header.has("object-map"):
            raise InvalidArgument(f"image {self.name!r} has no object-map feature")
        return self._run_maint("object_map_rebuild",
                               lambda: int(np.count_nonzero(self._rebuild_head_map().states)))

    def _rebuild_head_map(self) -> ObjectMap:
        """A trustworthy head map, from the objects (taking a snapshot needs one)."""
        from .rbd import rebuilt_states
        m = ObjectMap(self.store, self.id)
        m.states = rebuilt_states(self.store, self.header)
        m.save()
        with directory.header_lock(self.store, self.id):
            hdr = load_header(self.store, self.id, self.name)
            hdr.object_map_invalid = False
            save_header(self.store, hdr)
            self.header = hdr
        self._map = m
        return m

    def _flag_map_invalid(self) -> None:
        with directory.header_lock(self.store, self.id):
            hdr = load_header(self.store, self.id, self.name)
            hdr.object_map_invalid = True
            save_header(self.store, hdr)
            self.header = hdr

    def lock_owner(self):
        return owner(self.store, self.id)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self.store.flush(self._data_prefix)
        finally:
            if self._parent_img is not None:
                self._parent_img.close()
            # the lock goes first (the same way a peer's request takes it, so the
            # two never race), then the watch: a peer asking meanwhile is
            # answered, or finds the lock free
            self.release_lock()
            if self._watch is not None:
                self._watch.close()

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


def _zero_runs(a: np.ndarray, page: int = 4096):
    """(offset, length) of the runs of whole all-zero pages in ``a``."""
    n = len(a) // page
    if n == 0:
        return []
    z = ~a[:n * page].reshape(n, page).any(axis=1)
    edges = np.flatnonzero(np.diff(z.astype(np.int8))) + 1
    bounds = [0, *edges.tolist(), n]
    return [(b0 * page, (b1 - b0) * page) for b0, b1 in zip(bounds, bounds[1:]) if z[b0]]


class _Gate:
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

    def release(self) -> None:
        pass
