"""Image management (the shape of python-rbd's ``rbd.RBD``): create, list,
remove, rename, and the object-map check and rebuild."""
from __future__ import annotations

import time
import uuid

import numpy as np

from backend.errors import Busy, Exists, InvalidArgument, NotFound

from . import directory
from .exclusive_lock import ExclusiveLock, owner
from .header import (DEFAULT_FEATURES, MAX_IMAGE_SIZE, ImageHeader, data_object, header_object,
                     validate_features, validate_image_name, validate_object_size)
from .image import load_header, save_header
from .objectmap import EXISTS, NONEXISTENT, ObjectMap

DEFAULT_OBJECT_SIZE = 4 << 20


class RBD:
    def create(self, store, name: str, size: int, object_size: int = DEFAULT_OBJECT_SIZE,
               features=None, shared: bool = False) -> str:
        """Create an image; returns its id."""
        validate_image_name(name)
        if not isinstance(size, int) or size < 0 or size > MAX_IMAGE_SIZE:
            raise InvalidArgument(f"image size must be within 0..{MAX_IMAGE_SIZE} bytes")
        validate_object_size(object_size)
        if shared:
            features = ["layering", "shared"] if features is None else list(features) + ["shared"]
        feats = validate_features(DEFAULT_FEATURES if features is None else features)
        image_id = uuid.uuid4().hex[:12]
        hdr = ImageHeader(name=name, id=image_id, size=size, object_size=object_size,
                          features=list(feats), created=time.time())
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

    def list(self, store) -> list[str]:
        return sorted(directory.load(store))

    def remove(self, store, name: str, progress=None) -> None:
        with directory.directory_lock(store):
            image_id = directory.lookup(store, name)
            hdr = load_header(store, image_id, name)
            if hdr.snapshots:
                raise Busy(f"image {name!r} has snapshots; remove them first "
                           f"('ecfs rbd snap ls {name}')")
            lock = ExclusiveLock(store, image_id, name)
            if not lock.try_acquire():
                o = owner(store, image_id)
                who = f"pid {o.pid}" if o else "another process"
                raise Busy(f"image {name!r} is in use by {who}")
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
    present = _present_objects(store, image_id, hdr.num_objects)
    for objno in range(hdr.num_objects):
        st = int(m.states[objno])
        if objno in present and st == NONEXISTENT:
            problems.append(f"object {objno:#x} ({data_object(image_id, objno)}) exists but the "
                            f"map says nonexistent")
    return problems


def object_map_rebuild(store, name: str) -> int:
    """Regenerate the head map from the objects; returns objects found."""
    image_id = directory.lookup(store, name)
    hdr = load_header(store, image_id, name)
    if not hdr.has("object-map"):
        raise InvalidArgument(f"image {name!r} has no object-map feature")
    lock = ExclusiveLock(store, image_id, name)
    lock.acquire()
    try:
        present = _present_objects(store, image_id, hdr.num_objects)
        m = ObjectMap(store, image_id)
        m.states = np.zeros(hdr.num_objects, dtype=np.uint8)
        for objno in present:
            m.states[objno] = EXISTS
        m.save()
        with directory.header_lock(store, image_id):
            h = load_header(store, image_id, name)
            h.object_map_invalid = False
            save_header(store, h)
        return len(present)
    finally:
        lock.release()


def _present_objects(store, image_id: str, num_objects: int) -> set[int]:
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
