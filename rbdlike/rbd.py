"""Image management (the shape of python-rbd's ``rbd.RBD``): create, list,
remove, rename, clone, and the image-wide maintenance that needs no open
image: object-map check and rebuild, feature enable and disable."""
from __future__ import annotations

import time
import uuid

import numpy as np

from backend.errors import Busy, Exists, InvalidArgument, NotFound

from . import directory, layering
from .exclusive_lock import forget as forget_lock, lock_or_busy
from .notify import forget as forget_watch
from .header import (DEFAULT_FEATURES, FEATURES, MAX_IMAGE_SIZE, ImageHeader, Parent, clone_object,
                     data_object, header_object,
                     validate_features, validate_image_name, validate_object_size)
from .image import load_header, merge_attrs, save_header
from .objectmap import EXISTS, EXISTS_CLEAN, NONEXISTENT, ObjectMap


def default_object_size(store) -> int:
    """The pool's image default (``ecfs init --object-size``), as Ceph's
    rbd_default_order: what an image gets when its creator names none."""
    osz = store.pool.object_size
    try:
        validate_object_size(osz)
    except InvalidArgument:
        # a store made before init checked this: say where the size comes from
        raise InvalidArgument(f"the pool's default object size ({osz}) is not an image object "
                              f"size (a power of two in 4K..32M); give --object-size")
    return osz


class RBD:
    def create(self, store, name: str, size: int, object_size: int | None = None,
               features=None, shared: bool = False, parent: Parent | None = None) -> str:
        """Create an image; returns its id. ``object_size`` None: the pool's
        default."""
        validate_image_name(name)
        if not isinstance(size, int) or size < 0 or size > MAX_IMAGE_SIZE:
            raise InvalidArgument(f"image size must be within 0..{MAX_IMAGE_SIZE} bytes")
        if object_size is None:
            object_size = default_object_size(store)
        validate_object_size(object_size)
        if shared:
            features = ["layering", "shared"] if features is None else list(features) + ["shared"]
        feats = validate_features(DEFAULT_FEATURES if features is None else features)
        image_id = uuid.uuid4().hex[:12]
        if parent is not None and "layering" not in feats:
            raise InvalidArgument("a clone needs the layering feature")
        hdr = ImageHeader(name=name, id=image_id, size=size, object_size=object_size,
                          features=list(feats), created=time.time(), parent=parent)
        with directory.directory_lock(store):
            images = directory.load(store)
            if name in images:
                raise Exists(f"image {name!r} already exists")
            save_header(store, hdr)
            if hdr.has("object-map"):
                m = ObjectMap(store, image_id)
                m.states = np.zeros(hdr.num_objects, dtype=np.uint8)
                m.save()
            images[name] = image_id
            directory.save(store, images)
        return image_id

    def clone(self, store, parent_name: str, snap_name: str, child_name: str,
              features=None, object_size: int | None = None) -> str:
        """Create ``child_name`` as a copy-on-write clone of the protected
        snapshot ``parent_name@snap_name``; returns the child's id."""
        validate_image_name(child_name)
        pid = directory.lookup(store, parent_name)
        ph = load_header(store, pid, parent_name)
        snap = ph.snap(snap_name)
        if not ph.has("layering"):
            raise InvalidArgument(f"image {parent_name!r} has no layering feature")
        if not snap.protected:
            raise InvalidArgument(f"snapshot {parent_name}@{snap_name} is not protected "
                                  f"('ecfs rbd snap protect {parent_name}@{snap_name}' first)")
        osz = ph.object_size if object_size is None else object_size
        if osz != ph.object_size:
            raise InvalidArgument(f"a clone has its parent's object size ({ph.object_size})")
        link = Parent(image_id=pid, image_name=parent_name, snap_id=snap.id,
                      snap_name=snap_name, overlap=snap.size)
        return self.create(store, child_name, snap.size, object_size=osz, features=features,
                           parent=link)

    def children(self, store, parent_name: str, snap_name: str) -> list[str]:
        pid = directory.lookup(store, parent_name)
        snap = load_header(store, pid, parent_name).snap(snap_name)
        return layering.children(store, pid, snap.id)

    def list(self, store) -> list[str]:
        return sorted(directory.load(store))

    def remove(self, store, name: str, progress=None) -> None:
        with directory.directory_lock(store):
            image_id = directory.lookup(store, name)
            hdr = load_header(store, image_id, name)
            if hdr.snapshots:
                raise Busy(f"image {name!r} has snapshots; remove them first "
                           f"('ecfs rbd snap ls {name}')")
            lock = lock_or_busy(store, image_id, name)
            try:
                m = ObjectMap(store, image_id)
                known = m.load(hdr.num_objects) and not hdr.object_map_invalid
                n = hdr.num_objects
                for objno in range(n):
                    if known and m.states[objno] == NONEXISTENT:
                        continue
                    try:
                        store.remove(data_object(image_id, objno))
                    except NotFound:
                        pass
                    if progress:
                        progress(objno + 1, n)
                m.remove()
                images = directory.load(store)
                images.pop(name, None)
                directory.save(store, images)
                store.remove(header_object(image_id))
            finally:
                lock.release()
            forget_lock(store, image_id)
            forget_watch(store, image_id)

    def rename(self, store, old: str, new: str) -> None:
        validate_image_name(new)
        with directory.directory_lock(store):
            images = directory.load(store)
            if old not in images:
                raise NotFound(f"image {old!r} does not exist")
            if new in images:
                raise Exists(f"image {new!r} already exists")
            image_id = images[old]
            with directory.header_lock(store, image_id):
                hdr = load_header(store, image_id, old)
                hdr.name = new
                save_header(store, hdr)
            images[new] = images.pop(old)
            directory.save(store, images)


def object_map_check(store, name: str) -> list[str]:
    """Differences between the head object map and the objects (empty = OK)."""
    image_id = directory.lookup(store, name)
    hdr = load_header(store, image_id, name)
    if not hdr.has("object-map"):
        raise InvalidArgument(f"image {name!r} has no object-map feature")
    m = ObjectMap(store, image_id)
    if not m.load(hdr.num_objects):
        return [f"object map is invalid: {m.why}"]
    problems = []
    if hdr.object_map_invalid:
        problems.append("object map is flagged invalid")
    present = present_objects(store, image_id, hdr.num_objects)
    for objno in range(hdr.num_objects):
        st = int(m.states[objno])
        if objno in present and st == NONEXISTENT:
            problems.append(f"object {objno:#x} ({data_object(image_id, objno)}) exists but the "
                            f"map says nonexistent")
    return problems


def object_map_rebuild(store, name: str) -> int:
    """Regenerate the head map from the objects (through the lock holder,
    if a process has the image open); returns objects found."""
    from .image import Image
    with Image(store, name) as img:
        return img.rebuild_object_map()


def rebuilt_states(store, hdr) -> np.ndarray:
    """Head object-map states regenerated from the objects present. With
    snapshots, an object counts as written since the newest one (EXISTS)
    only if that snapshot already reads a clone of it; otherwise
    EXISTS_CLEAN, so the next write still preserves it first."""
    states = np.zeros(hdr.num_objects, dtype=np.uint8)
    newest = hdr.newest_snap_id()
    from .snapshot import find_clone
    for objno in present_objects(store, hdr.id, hdr.num_objects):
        if newest is None or find_clone(store, hdr, objno, newest) is not None:
            states[objno] = EXISTS
        else:
            states[objno] = EXISTS_CLEAN
    return states


def present_objects(store, image_id: str, num_objects: int) -> set[int]:
    prefix = f"rbd_data.{image_id}."
    out = set()
    for n in store.list(prefix):
        tail = n[len(prefix):]
        if len(tail) == 16:
            try:
                objno = int(tail, 16)
            except ValueError:
                continue
            if objno < num_objects:
                out.add(objno)
    return out


def update_features(store, name: str, features: list[str], enable: bool) -> list[str]:
    """``rbd feature enable|disable``: on an image nobody has open for
    writing. Enabling object-map builds the head map and each snapshot's map
    from the objects; the dependencies are the rbd tool's (object-map needs
    exclusive-lock, fast-diff needs object-map). Returns the new features."""
    image_id = directory.lookup(store, name)
    lock = lock_or_busy(store, image_id, name, "; close it first")
    try:
        with directory.header_lock(store, image_id):
            hdr = load_header(store, image_id, name)
            for f in features:
                if f not in FEATURES:
                    raise InvalidArgument(f"unknown image feature {f!r} "
                                          f"(known: {', '.join(FEATURES)})")
            cur = list(hdr.features)
            if enable:
                bad = [f for f in features if f in ("layering", "shared")]
                if bad:
                    raise InvalidArgument(f"feature {bad[0]!r} can only be set at creation")
                new = cur + [f for f in features if f not in cur]
            else:
                bad = [f for f in features if f == "layering"]
                if bad:
                    raise InvalidArgument("feature 'layering' cannot be disabled")
                missing = [f for f in features if f not in cur]
                if missing:
                    raise InvalidArgument(f"feature {missing[0]!r} is not enabled on {name!r}")
                new = [f for f in cur if f not in features]
            # the rbd tool's dependency rules, checked as it checks them
            validate_features(new)
            if "object-map" in new and "object-map" not in cur:
                m = ObjectMap(store, image_id)
                m.states = rebuilt_states(store, hdr)
                m.save()
                hdr.object_map_invalid = False
                for sn in hdr.snapshots:
                    _build_snap_map(store, hdr, sn)
            if "object-map" in cur and "object-map" not in new:
                for sn in hdr.snapshots:
                    _whiteouts_from_snap_map(store, hdr, sn)
                ObjectMap(store, image_id).remove()
                for sn in hdr.snapshots:
                    ObjectMap(store, image_id, sn.id).remove()
            hdr.features = new
            save_header(store, hdr)
            return new
    finally:
        lock.release()


def _build_snap_map(store, hdr, sn) -> None:
    """A snapshot's map from its clones (made while the image had no map:
    a whiteout says absent) and, for objects unchanged since, the head."""
    from .snapshot import find_clone
    n = -(-sn.size // hdr.object_size)
    m = ObjectMap(store, hdr.id, sn.id)
    m.states = np.zeros(n, dtype=np.uint8)
    for objno in range(n):
        found = find_clone(store, hdr, objno, sn.id)
        if found is not None:
            exists = found[1] > 0
        else:
            exists = store.exists(data_object(hdr.id, objno))
        m.states[objno] = EXISTS if exists else NONEXISTENT
    m.save()


def _whiteouts_from_snap_map(store, hdr, sn) -> None:
    """Before a snapshot's map goes: without it, an object absent at the
    snapshot would be read from a later clone or the head. Record each such
    object as a whiteout (a size-0 clone named for the snapshot), which is
    how images without a map say "absent" (rbdlike/snapshot.py)."""
    from .snapshot import find_clone
    m = ObjectMap(store, hdr.id, sn.id)
    if not m.load(-(-sn.size // hdr.object_size)):
        return
    for objno in np.flatnonzero(m.states == NONEXISTENT).tolist():
        found = find_clone(store, hdr, objno, sn.id)
        if found is None:
            if not store.exists(data_object(hdr.id, objno)):
                continue              # absent everywhere: reads as absent anyway
        elif found[1] == 0:
            continue                  # a whiteout already says so
        store.write_full(clone_object(hdr.id, objno, sn.id), b"")


FILE_ATTRS = ("mode", "uid", "gid", "mtime_ns", "atime_ns")


def update_attrs(store, image_id: str, changes: dict) -> ImageHeader:
    """Record file attributes of an image (its mode, owner and mtime as a
    mount shows them); returns the new header."""
    bad = [k for k in changes if k not in FILE_ATTRS]
    if bad:
        raise InvalidArgument(f"unknown file attribute {bad[0]!r}")
    return merge_attrs(store, image_id, changes)
