"""An open image: byte I/O over its data objects, gated by the object map
and the exclusive lock (the shape of python-rbd's ``rbd.Image``).

``Image(store, name, read_only=False)``: ``read``, ``write``, ``discard``,
``flush``, ``size``, ``resize``, ``stat``, ``close`` (or use it as a context
manager). The first write takes the image's exclusive lock (images with the
exclusive-lock feature); read-only opens never do. With the object-map
feature, the owner keeps the head map in memory: a read of a NONEXISTENT
object returns zeros without touching the store, a write marks its object
EXISTS once, before its data.
"""
from __future__ import annotations

import numpy as np

from backend.errors import InvalidArgument, NotFound, ReadOnly

from . import directory
from .exclusive_lock import ExclusiveLock
from .header import ImageHeader, MAX_IMAGE_SIZE, data_object, header_object
from .objectmap import EXISTS, NONEXISTENT, PENDING, ObjectMap


def load_header(store, image_id: str, name: str = "") -> ImageHeader:
    try:
        raw = store.read(header_object(image_id), 0, 1 << 26)
    except NotFound:
        raise NotFound(f"image {name or image_id!r}: header object is missing")
    return ImageHeader.decode(raw, f"image {name or image_id!r}")


def save_header(store, hdr: ImageHeader) -> None:
    store.write_full(header_object(hdr.id), hdr.encode())


class Image:
    def __init__(self, store, name: str, snapshot: str | None = None, read_only: bool = False):
        self.store = store
        self.name = name
        self.id = directory.lookup(store, name)
        self.header = load_header(store, self.id, name)
        self.snapshot = None
        if snapshot is not None:
            self.header.snap(snapshot)
            raise InvalidArgument("snapshots are not available yet")
        self.read_only = read_only
        self._lock: ExclusiveLock | None = None
        self._map: ObjectMap | None = None
        self._closed = False

    # ------------------------------------------------------------ queries
    def size(self) -> int:
        return self.header.size

    def stat(self) -> dict:
        h = self.header
        return {"size": h.size, "obj_size": h.object_size, "num_objs": h.num_objects,
                "order": h.object_size.bit_length() - 1, "features": list(h.features),
                "id": h.id}

    def _objects(self, offset: int, length: int):
        """(objno, offset in object, length, offset in the caller's buffer)."""
        osz = self.header.object_size
        pos, end = offset, offset + length
        while pos < end:
            objno, off = divmod(pos, osz)
            n = min(osz - off, end - pos)
            yield objno, off, n, pos - offset
            pos += n

    # ------------------------------------------------------------- I/O
    def read(self, offset: int, length: int) -> bytes:
        self._check_open()
        if offset < 0 or length < 0:
            raise InvalidArgument("offset and length must not be negative")
        size = self.header.size
        if offset >= size:
            return b""
        length = min(length, size - offset)
        out = np.zeros(length, dtype=np.uint8)
        omap = self._map if (self._map is not None and self._map.valid) else None
        for objno, off, n, at in self._objects(offset, length):
            if omap is not None and omap.states[objno] == NONEXISTENT:
                continue            # known absent: zeros, no I/O
            try:
                got = self.store.read(data_object(self.id, objno), off, n)
            except NotFound:
                continue
            out[at:at + len(got)] = np.frombuffer(got, dtype=np.uint8)
        return out.tobytes()

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
            if self._map is not None and self._map.valid:
                self._map.set(objno, EXISTS)
            self.store.write(data_object(self.id, objno), off, data[at:at + n],
                             size_hint=self.header.object_size)
        return len(data)

    def discard(self, offset: int, length: int) -> None:
        """Deallocate [offset, offset+length): whole objects are deleted, partial
        ones zeroed (their all-zero pages deallocated)."""
        self._check_writable()
        if offset < 0 or length < 0:
            raise InvalidArgument("offset and length must not be negative")
        length = max(0, min(length, self.header.size - offset))
        self._writer()
        osz = self.header.object_size
        for objno, off, n, _ in self._objects(offset, length):
            obj = data_object(self.id, objno)
            omap = self._map if (self._map is not None and self._map.valid) else None
            if omap is not None and omap.states[objno] == NONEXISTENT:
                continue
            whole = off == 0 and (n == osz or objno * osz + n >= self.header.size)
            if whole:
                if omap is not None:
                    omap.set(objno, PENDING)
                try:
                    self.store.remove(obj)
                except NotFound:
                    pass
                if omap is not None:
                    omap.set(objno, NONEXISTENT)
            else:
                self.store.zero(obj, off, n)

    def flush(self) -> None:
        self._check_open()
        self.store.flush()

    def resize(self, size: int, allow_shrink: bool = True) -> None:
        self._check_writable()
        if size < 0 or size > MAX_IMAGE_SIZE:
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
            for objno in range(first_gone, self.header.num_objects):
                if self._map is not None and self._map.valid and \
                        self._map.states[objno] == NONEXISTENT:
                    continue
                try:
                    self.store.remove(data_object(self.id, objno))
                except NotFound:
                    pass
            if size % osz:
                try:
                    self.store.truncate(data_object(self.id, size // osz), size % osz)
                except NotFound:
                    pass
        with directory.header_lock(self.store, self.id):
            hdr = load_header(self.store, self.id, self.name)
            hdr.size = size
            save_header(self.store, hdr)
            self.header = hdr
        if self._map is not None and self._map.valid:
            self._map.resize(self.header.num_objects)

    # ------------------------------------------------------------ locking
    def _check_open(self) -> None:
        if self._closed:
            raise InvalidArgument(f"image {self.name!r} is closed")

    def _check_writable(self) -> None:
        self._check_open()
        if self.read_only:
            raise ReadOnly(f"image {self.name!r} is open read-only")

    def _writer(self) -> None:
        """Become the image's writer: take the lock, load the head map."""
        if self._lock is not None and self._lock.held:
            return
        if not self.header.has("exclusive-lock"):
            return
        lock = ExclusiveLock(self.store, self.id, self.name)
        lock.acquire()
        self._lock = lock
        for prefix in (f"rbd_data.{self.id}.", f"rbd_object_map.{self.id}"):
            self.store.add_guard(prefix, lock.guard)
        # what another writer did before us is in the store: reload
        self.header = load_header(self.store, self.id, self.name)
        if self.header.has("object-map"):
            m = ObjectMap(self.store, self.id)
            m.load(self.header.num_objects)
            if self.header.object_map_invalid:
                m.valid, m.why = False, "flagged invalid (run 'ecfs rbd object-map rebuild')"
            self._map = m
            if not m.valid and not self.header.object_map_invalid:
                self._flag_map_invalid()

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
            if self._lock is not None:
                for prefix in (f"rbd_data.{self.id}.", f"rbd_object_map.{self.id}"):
                    self.store.remove_guard(prefix)
                self._lock.release()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
