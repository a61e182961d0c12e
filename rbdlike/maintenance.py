"""Maintenance operations of an image: resize, snapshots (create, remove,
protect, rollback), sparsify, flatten, object-map rebuild (librbd's
``Operations``).

``Image`` inherits them (rbdlike.image): the public calls keep
python-rbd's names and run through the lock owner (rbdlike.lock_owner),
which runs each here when this process holds the image's exclusive lock
and otherwise has the holder run it. ``_maint_op`` names what a request
runs; an op's last header write is marked ``done`` (``_save_header``),
which records a peer's request id with it so a retry never runs it twice.
Each op may be killed at any point: a rerun finishes it, and a half-taken
snapshot is finished by the next writer.
"""
from __future__ import annotations

import time

import numpy as np

from backend.errors import Busy, Exists, InvalidArgument, NotFound, ReadOnly

from . import directory, layering, snapshot
from .header import (MAX_IMAGE_SIZE, ImageHeader, Parent, Snapshot, data_object,
                     load_header, save_header, validate_image_name)
from .objectmap import EXISTS, EXISTS_CLEAN, NONEXISTENT, ObjectMap


class MaintenanceOps:
    """Mixed into ``Image``; uses its I/O helpers (``_prepare``,
    ``_remove_object``, ``_head_exists``...) and its header and map."""

    def _maint_op(self, op: str, msg: dict, progress):
        """(callable, whether it takes the I/O gate exclusive) for request
        ``op``; flatten and sparsify let writes go on beside them."""
        name = msg.get("name", "")
        size = msg.get("size", 0)
        # a request comes from any local process that can reach the socket:
        # check it as the public calls check their arguments
        if op in ("snap_create", "snap_rm", "snap_rollback"):
            if not isinstance(name, str):
                raise InvalidArgument(f"request {op!r}: bad snapshot name")
            if op == "snap_create":
                validate_image_name(name, "snapshot")
        if op == "resize" and (not isinstance(size, int) or isinstance(size, bool)
                               or not 0 <= size <= MAX_IMAGE_SIZE):
            raise InvalidArgument(f"image size must be within 0..{MAX_IMAGE_SIZE}")
        if op == "object_map_rebuild" and not self.header.has("object-map"):
            raise InvalidArgument(f"image {self.name!r} has no object-map feature")
        table = {
            "snap_create": (lambda: self._create_snap(name), True),
            "snap_rm": (lambda: self._remove_snap(name, progress), True),
            "snap_rollback": (lambda: self._rollback(name, progress), True),
            "resize": (lambda: self._resize(size, bool(msg.get("allow_shrink")), progress),
                       True),
            "flatten": (lambda: self._flatten(progress), False),
            "sparsify": (lambda: self._sparsify(progress), False),
            "object_map_rebuild": (
                lambda: int(np.count_nonzero(self._rebuild_head_map().states)), True),
        }
        if op not in table:
            raise InvalidArgument(f"unknown request {op!r}")
        return table[op]

    def _save_header(self, hdr: ImageHeader, done: bool = False, result=None) -> None:
        """Write the header (under the caller's header lock). ``done``: this
        write completes the op, so a peer's request id goes with it."""
        if done:
            hdr.requests = self._owner.record(hdr.requests, result)
        save_header(self.store, hdr)
        self.header = hdr

    def resize(self, size: int, allow_shrink: bool = True, progress=None) -> None:
        self._check_writable()
        if not isinstance(size, int) or size < 0 or size > MAX_IMAGE_SIZE:
            raise InvalidArgument(f"image size must be within 0..{MAX_IMAGE_SIZE}")
        self._owner.run("resize", {"size": size, "allow_shrink": allow_shrink}, progress)

    def _resize(self, size: int, allow_shrink: bool, progress=None, done: bool = True) -> None:
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
        self._save_size(size, allow_shrink, done)

    def _save_size(self, size: int, allow_shrink: bool, done: bool = True,
                   expect: int | None = None) -> bool:
        """The header's size becomes ``size``, and the head map follows: a
        resize's last step (also Image._settle_size's). Under the header
        lock with our lock checked (Fenced if broken: a break takes the
        header lock too), so a fenced owner's size, from its stale header,
        never lands over the next owner's. ``expect``: only if the stored
        size is that (False, nothing written, when it is not)."""
        with directory.header_lock(self.store, self.id):
            self._owner.guard()
            hdr = load_header(self.store, self.id, self.name)
            if expect is not None and hdr.size != expect:
                return False
            if size < hdr.size and not allow_shrink:
                # the stored header is larger than ours: someone resized it
                # meanwhile (we were fenced, say); never cut it
                raise InvalidArgument("shrinking an image needs --allow-shrink")
            hdr.size = size
            if hdr.parent is not None and hdr.parent.overlap > size:
                hdr.parent.overlap = size     # shrinking cuts the parent off for good
            self._save_header(hdr, done=done)
        with self._mutex:
            if self._map is not None and self._map.valid:
                self._map.resize(self.header.num_objects)
        return True

    # --------------------------------------------------------- snapshots
    def create_snap(self, name: str) -> int:
        """Take snapshot ``name`` of the head; returns its id. Every write
        that returned before this call is in it."""
        self._check_writable()
        validate_image_name(name, "snapshot")
        return self._owner.run("snap_create", {"name": name})

    def _create_snap(self, name: str) -> int:
        # the lock owner flushed before it ran this (``_before_op``)
        with self._mutex:
            if self.header.has("object-map") and self._valid_map() is None:
                # a snapshot needs a map it can trust; rebuilt before the
                # header lock below, which the rebuild takes too (a second
                # flock of it in this process would wait for ever)
                self._rebuild_head_map()
            with directory.header_lock(self.store, self.id):
                hdr = load_header(self.store, self.id, self.name)
                if any(s.name == name for s in hdr.snapshots):
                    raise Exists(f"snapshot {self.name}@{name} already exists")
                snap_id = hdr.snap_seq + 1
                m = self._valid_map()
                if hdr.has("object-map"):
                    if m is None:
                        raise InvalidArgument(f"image {self.name!r}: the object map could "
                                              f"not be rebuilt for the snapshot")
                    sm = ObjectMap(self.store, self.id, snap_id)
                    sm.states = m.states.copy()
                    sm.save()
                hdr.snap_seq = snap_id
                hdr.snap_pending = {"id": snap_id, "name": name, "timestamp": time.time()}
                # done once pending: a writer that finds it finishes it
                self._save_header(hdr, done=True, result=snap_id)
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
            self._save_header(hdr)
        self._prepared.clear()

    def remove_snap(self, name: str, progress=None) -> None:
        self._check_writable()
        self._owner.run("snap_rm", {"name": name}, progress)

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
                self._save_header(hdr, done=True)

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
            self._save_header(hdr)

    def protect_snap(self, name: str) -> None:
        self._set_protected(name, True)
        self._owner.notify_header()

    def unprotect_snap(self, name: str) -> None:
        self._set_protected(name, False)
        self._owner.notify_header()

    def is_protected_snap(self, name: str) -> bool:
        return load_header(self.store, self.id, self.name).snap(name).protected

    def rollback_to_snap(self, name: str, progress=None) -> None:
        """Make the head what it was at snapshot ``name`` (the head's changes
        since are lost; the snapshots stay)."""
        self._check_writable()
        self._owner.run("snap_rollback", {"name": name}, progress)

    def _rollback(self, name: str, progress=None) -> None:
        s = self.header.snap(name)
        view = type(self)(self.store, image_id=self.id, snap_id=s.id)
        osz = self.header.object_size
        if self.header.size != s.size:
            self._resize(s.size, True, done=False)
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
            self._save_header(hdr, done=True)
        view.close()

    def sparsify(self, progress=None) -> None:
        """Deallocate all-zero objects (deleted, or in a clone emptied) and
        all-zero 4 KiB pages of the others (``rbd sparsify``). Objects
        unchanged since the newest snapshot are left alone: the snapshot
        shares them, and changing them would only add a copy."""
        self._check_writable()
        self._owner.run("sparsify", {}, progress)

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
        self._owner.run("flatten", {}, progress)

    def _flatten(self, progress=None) -> None:
        p = self.header.parent
        if p is None:
            raise InvalidArgument(f"image {self.name!r} has no parent")
        osz = self.header.object_size
        n = -(-min(p.overlap, self.header.size) // osz)
        for objno in range(n):
            if not self._head_exists(objno):
                with self._obj_lock(objno):
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
            self._save_header(hdr, done=True)
        self._parent_img = None

    def rebuild_object_map(self) -> int:
        """``object-map rebuild``: regenerate the head map from the objects;
        returns how many objects are present."""
        self._check_writable()
        if not self.header.has("object-map"):
            raise InvalidArgument(f"image {self.name!r} has no object-map feature")
        return self._owner.run("object_map_rebuild", {})

    def _rebuild_head_map(self) -> ObjectMap:
        """A trustworthy head map, from the objects (taking a snapshot needs one)."""
        from .rbd import rebuilt_states
        m = ObjectMap(self.store, self.id)
        m.states = rebuilt_states(self.store, self.header)
        m.save()
        with directory.header_lock(self.store, self.id):
            hdr = load_header(self.store, self.id, self.name)
            hdr.object_map_invalid = False
            self._save_header(hdr)
        self._map = m
        return m

    def _flag_map_invalid(self) -> None:
        with directory.header_lock(self.store, self.id):
            hdr = load_header(self.store, self.id, self.name)
            hdr.object_map_invalid = True
            self._save_header(hdr)


def _zero_runs(a: np.ndarray, page: int = 4096):
    """(offset, length) of the runs of whole all-zero pages in ``a``."""
    n = len(a) // page
    if n == 0:
        return []
    z = ~a[:n * page].reshape(n, page).any(axis=1)
    edges = np.flatnonzero(np.diff(z.astype(np.int8))) + 1
    bounds = [0, *edges.tolist(), n]
    return [(b0 * page, (b1 - b0) * page) for b0, b1 in zip(bounds, bounds[1:]) if z[b0]]
