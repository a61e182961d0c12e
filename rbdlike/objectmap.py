"""The object map: two bits per data object of an image (librbd's design).

States (as librbd): NONEXISTENT, EXISTS (written since the last snapshot),
PENDING (a delete in flight: may or may not exist), EXISTS_CLEAN (exists,
unchanged since the last snapshot; fast-diff). The head map lives in the
object ``rbd_object_map.ID``, each snapshot's in ``rbd_object_map.ID.SNAPID``
(16 hex digits). Format (docs/format-object-map.md): a 16-byte header
(magic ``ECFSOMAP``, u8 format, u8 flags, 2 pad, u32 object count), then the
states packed four to a byte, object n in byte n // 4 at bits 2 * (n % 4).

Rules that keep the map safe to trust: a write marks its object EXISTS
*before* the data is written (a crash leaves the map claiming too much,
never too little); a whole-object discard goes PENDING, deletes, then
NONEXISTENT; each state change persists only the byte holding it, and only
when the state actually changes (one map update per object per snapshot
interval, not per write). A map that cannot be read or does not match the
image is reported invalid and ignored (every object may exist) until
rebuilt.
"""
from __future__ import annotations

import struct
import threading

import numpy as np

from backend.errors import NotFound

NONEXISTENT, EXISTS, PENDING, EXISTS_CLEAN = 0, 1, 2, 3
STATE_NAMES = {NONEXISTENT: "nonexistent", EXISTS: "exists", PENDING: "pending",
               EXISTS_CLEAN: "exists_clean"}
MAGIC = b"ECFSOMAP"
FORMAT = 1
_HDR = struct.Struct("<8sBB2xI")
HDR_SIZE = _HDR.size
_SHIFT = np.array([0, 2, 4, 6], dtype=np.uint8)


def map_object(image_id: str, snap_id: int | None = None) -> str:
    if snap_id is None:
        return f"rbd_object_map.{image_id}"
    return f"rbd_object_map.{image_id}.{snap_id:016x}"


def pack(states: np.ndarray) -> bytes:
    n = len(states)
    padded = np.zeros(-(-n // 4) * 4, dtype=np.uint8)
    padded[:n] = states
    return (padded.reshape(-1, 4) << _SHIFT).sum(axis=1, dtype=np.uint8).tobytes()


def unpack(raw: bytes, n: int) -> np.ndarray:
    b = np.frombuffer(raw, dtype=np.uint8)
    return ((b[:, None] >> _SHIFT) & 3).reshape(-1)[:n].copy()


class ObjectMap:
    """One map (head or a snapshot) of one image, held in memory."""

    def __init__(self, store, image_id: str, snap_id: int | None = None):
        self.store = store
        self.name = map_object(image_id, snap_id)
        self.states = np.zeros(0, dtype=np.uint8)
        self._lock = threading.Lock()
        self.valid = False
        self.why = "not loaded"

    def load(self, num_objects: int) -> bool:
        """Read the map; False (and ``valid`` False) when it cannot be trusted."""
        try:
            raw = self.store.read(self.name, 0, HDR_SIZE + -(-num_objects // 4))
        except NotFound:
            return self._invalid("missing")
        if len(raw) < HDR_SIZE:
            return self._invalid("truncated header")
        magic, fmt, flags, n = _HDR.unpack_from(raw)
        if magic != MAGIC or fmt != FORMAT:
            return self._invalid("bad magic or format")
        if n != num_objects or len(raw) < HDR_SIZE + -(-n // 4):
            return self._invalid(f"holds {n} objects, the image has {num_objects}")
        self.states = unpack(raw[HDR_SIZE:], n)
        self.valid, self.why = True, ""
        return True

    def _invalid(self, why: str) -> bool:
        self.valid, self.why = False, why
        return False

    def save(self, guard=None) -> None:
        """Write the whole map (creation, resize, rebuild, snapshot)."""
        body = _HDR.pack(MAGIC, FORMAT, 0, len(self.states)) + pack(self.states)
        self.store.write_full(self.name, body)
        self.valid, self.why = True, ""

    def set(self, objno: int, state: int) -> None:
        """Set one object's state, persisting the byte that holds it (under
        the map's lock: four objects share that byte)."""
        with self._lock:
            if self.states[objno] == state:
                return
            self.states[objno] = state
            b = objno // 4
            self.store.write(self.name, HDR_SIZE + b, pack(self.states[b * 4:b * 4 + 4]))

    def resize(self, num_objects: int) -> None:
        n = len(self.states)
        if num_objects == n:
            return          # (a growth within the last object: nothing to write)
        if num_objects > n:
            self.states = np.concatenate([self.states, np.zeros(num_objects - n, np.uint8)])
        else:
            self.states = self.states[:num_objects].copy()
        self.save()

    def remove(self) -> None:
        try:
            self.store.remove(self.name)
        except NotFound:
            pass

    def count(self) -> int:
        """Objects that exist (or may)."""
        return int(np.count_nonzero(self.states))
