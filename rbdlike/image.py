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

import threading
import time

import numpy as np

from backend.errors import Busy, Exists, InvalidArgument, NotFound, ReadOnly

from . import directory, layering, snapshot
from .exclusive_lock import ExclusiveLock
from .header import (MAX_IMAGE_SIZE, ImageHeader, Parent, Snapshot, clone_object, data_object,
                     header_object,
                     validate_image_name)
from .objectmap import EXISTS, EXISTS_CLEAN, NONEXISTENT, PENDING, ObjectMap

_OBJ_LOCKS = 64


def load_header(store, image_id: str, name: str = "") -> ImageHeader:
    try:
        raw = store.read(header_object(image_id), 0, 1 << 26)
    except NotFound:
        raise NotFound(f"image {name or image_id!r}: header object is missing")
    return ImageHeader.decode(raw, f"image {name or image_id!r}")


def save_header(store, hdr: ImageHeader) -> None:
    store.write_full(header_object(hdr.id), hdr.encode())


class Image:
    def __init__(self, store, name: str | None = None, snapshot: str | None = None,
                 read_only: bool = False, *, image_id: str | None = None,
                 snap_id: int | None = None):
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
        self._obj_locks = [threading.Lock() for _ in range(_OBJ_LOCKS)]
        self._mutex = threading.RLock()
        self._closed = False

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
        return out.tobytes()

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
        if offset + len(data) > self.header.size:
            raise InvalidArgument(f"write of {len(data)} bytes at {offset} is past the end of "
                                  f"image {self.name!r} ({self.header.size} bytes)")
        self._writer()
        for objno, off, n, at in self._objects(offset, len(data)):
            self._prepare(objno)
            self.store.write(data_object(self.id, objno), off, data[at:at + n],
                             size_hint=self.header.object_size)
        return len(data)

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
        return not self.store.exists(clone_object(self.id, objno, newest))

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
        length = max(0, min(length, self.header.size - offset))
        self._writer()
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
        self._check_open()
        self.store.flush()

    def resize(self, size: int, allow_shrink: bool = True) -> None:
        self._check_writable()
        if not isinstance(size, int) or size < 0 or size > MAX_IMAGE_SIZE:
            raise InvalidArgument(f"image size must be within 0..{MAX_IMAGE_SIZE}")
        old = self.header.size
        if size < old and not allow_shrink:
            raise InvalidArgument("shrinking an image needs --allow-shrink")
        if size == old:
            return
        self._writer()
        osz = self.header.object_size
        if size < old:
            # drop whole objects past the new end, cut the last one
            first_gone = -(-size // osz)
            m = self._valid_map()
            for objno in range(first_gone, self.header.num_objects):
                if m is not None and m.states[objno] == NONEXISTENT:
                    continue
                self._remove_object(objno)
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
        self._writer()
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
        self._writer()
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
                raise InvalidArgument(f"snapshot {self.name}@{name} is "
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

    def unprotect_snap(self, name: str) -> None:
        self._set_protected(name, False)

    def is_protected_snap(self, name: str) -> bool:
        return load_header(self.store, self.id, self.name).snap(name).protected

    def rollback_to_snap(self, name: str, progress=None) -> None:
        """Make the head what it was at snapshot ``name`` (the head's changes
        since are lost; the snapshots stay)."""
        self._check_writable()
        self._writer()
        s = self.header.snap(name)
        view = Image(self.store, image_id=self.id, snap_id=s.id)
        osz = self.header.object_size
        if self.header.size != s.size:
            self.resize(s.size)
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

    def sparsify(self, progress=None) -> None:
        """Deallocate all-zero objects (deleted, or in a clone emptied) and
        all-zero 4 KiB pages of the others (``rbd sparsify``). Objects
        unchanged since the newest snapshot are left alone: the snapshot
        shares them, and changing them would only add a copy."""
        self._check_writable()
        self._writer()
        osz = self.header.object_size
        n = self.header.num_objects
        for objno in range(n):
            if self._head_exists(objno) and not self._shared_with_snapshot(objno):
                start = objno * osz
                raw = self._read_stored(data_object(self.id, objno), 0, osz)
                if raw is not None:
                    a = np.frombuffer(raw, dtype=np.uint8)
                    if not a.any():
                        self.discard(start, min(osz, self.header.size - start))
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
        self._writer()
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

    def _writer(self) -> None:
        """Become the image's writer: take the lock, load the head map."""
        with self._mutex:
            if self._lock is not None and self._lock.held:
                return
            if not self.header.has("exclusive-lock"):
                if self._lock is None:
                    self.header = load_header(self.store, self.id, self.name)
                    self._lock = _NoLock()
                    if self.header.snap_pending:
                        self._finish_snap()
                return
            lock = ExclusiveLock(self.store, self.id, self.name)
            lock.acquire()
            self._lock = lock
            for prefix in (f"rbd_data.{self.id}.", f"rbd_object_map.{self.id}"):
                self.store.add_guard(prefix, lock.guard)
            # what another writer did before us is in the store: reload
            self.header = load_header(self.store, self.id, self.name)
            self._prepared.clear()
            if self.header.has("object-map"):
                m = ObjectMap(self.store, self.id)
                m.load(self.header.num_objects)
                if self.header.object_map_invalid:
                    m.valid, m.why = False, "flagged invalid (run 'ecfs rbd object-map rebuild')"
                self._map = m
                if not m.valid and not self.header.object_map_invalid:
                    self._flag_map_invalid()
            if self.header.snap_pending:
                self._finish_snap()

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
        from .exclusive_lock import owner
        return owner(self.store, self.id)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self.store.flush()
        finally:
            if self._parent_img is not None:
                self._parent_img.close()
            if isinstance(self._lock, ExclusiveLock):
                for prefix in (f"rbd_data.{self.id}.", f"rbd_object_map.{self.id}"):
                    self.store.remove_guard(prefix)
                self._lock.release()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _zero_runs(a: np.ndarray, page: int = 4096):
    """(offset, length) of the runs of whole all-zero pages in ``a``."""
    n = len(a) // page
    if n == 0:
        return []
    z = ~a[:n * page].reshape(n, page).any(axis=1)
    edges = np.flatnonzero(np.diff(z.astype(np.int8))) + 1
    bounds = [0, *edges.tolist(), n]
    return [(b0 * page, (b1 - b0) * page) for b0, b1 in zip(bounds, bounds[1:]) if z[b0]]


class _NoLock:
    """The lock of an image without the exclusive-lock feature: always held."""

    held = True

    def release(self) -> None:
        pass
