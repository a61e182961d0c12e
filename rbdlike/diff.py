"""What changed between two points of an image (``rbd diff``,
``export-diff``, ``du``), from the object maps where they can be trusted.

Objects first. With fast-diff and valid maps the changed objects come
from the maps alone, no data I/O: between snapshot A (or nothing) and the
end point B (a later snapshot or the head), with M_A the map of A and
M_1 .. M_B the maps of every snapshot after A up to B (and the head map
when B is the head)::

    data  = exists(M_B) and (not exists(M_A) or any(M_i == EXISTS))
    zero  = exists(M_A) and not exists(M_B)

since a map's EXISTS means "written since the snapshot before" (taking a
snapshot turns EXISTS into EXISTS_CLEAN). Without usable maps every
object is a candidate.

Then extents. ``whole_object`` reports each candidate object's range as
it is (``rbd diff --whole-object``). Otherwise the candidates' bytes at A
and at B are compared page by page (4 KiB), so only the pages that differ
are reported: as data, or as zero where B reads zeros. A clone's view
includes its parent's bytes (``include_parent``); diffs from a snapshot
of the clone see only what the clone changed.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np

from backend.errors import InvalidArgument

from .objectmap import EXISTS, NONEXISTENT, PENDING, ObjectMap

PAGE = 4096


def _pad(states: np.ndarray, n: int) -> np.ndarray:
    if len(states) >= n:
        return states[:n]
    out = np.zeros(n, dtype=np.uint8)
    out[:len(states)] = states
    return out


def _map_states(img, snap_id: int | None, n: int) -> np.ndarray | None:
    held = img.head_map_states() if snap_id is None else None
    if held is not None:
        return _pad(held, n)
    hdr = img.header
    if snap_id is None:
        m = ObjectMap(img.store, img.id)
        count = hdr.num_objects
    else:
        m = ObjectMap(img.store, img.id, snap_id)
        count = -(-hdr.snap_by_id(snap_id).size // hdr.object_size)
    if not m.load(count):
        return None
    return _pad(m.states, n)


def changed_objects(img, from_view, include_parent: bool = True
                    ) -> tuple[np.ndarray, np.ndarray] | None:
    """(data, zero) boolean masks over the objects of ``img``'s view, from
    the maps; None when the maps cannot say (no fast-diff, invalid map)."""
    hdr = img.header
    if not hdr.has("fast-diff") or hdr.object_map_invalid:
        return None
    if img.snap is None and hdr.snap_pending:
        # a snapshot half taken (its taker killed, or still at it): the head
        # map's EXISTS may already be EXISTS_CLEAN with no snapshot record
        # yet to say since when, so the head's marks cannot be read until
        # the next writer finishes it
        return None
    osz = hdr.object_size
    n = -(-img.size() // osz)
    to_id = None if img.snap is None else img.snap.id
    from_id = 0 if from_view is None else from_view.snap.id
    chain = []
    for s in sorted(hdr.snapshots, key=lambda s: s.id):
        if from_id < s.id and (to_id is None or s.id <= to_id):
            st = _map_states(img, s.id, n)
            if st is None:
                return None
            chain.append(st)
    if to_id is None:
        st = _map_states(img, None, n)
        if st is None:
            return None
        chain.append(st)
    if from_view is not None:
        before = _map_states(img, from_id, n)
        if before is None:
            return None
    else:
        before = np.zeros(n, dtype=np.uint8)
    if not chain:             # from and to are the same snapshot
        empty = np.zeros(n, dtype=bool)
        return empty, empty.copy()
    to_exists = chain[-1] != NONEXISTENT
    from_exists = before != NONEXISTENT
    dirty = np.zeros(n, dtype=bool)
    for st in chain:
        dirty |= (st == EXISTS) | (st == PENDING)
    data = to_exists & (~from_exists | dirty)
    zero = from_exists & ~to_exists
    p = img.parent_info()
    if p is not None:
        covered = np.arange(n) * osz < p.overlap
        # an object the child lacks reads from the parent, not as zeros
        zero &= ~covered
        if from_view is None and include_parent:
            pm = changed_objects(img.parent_view(), None)
            pdata = np.ones(n, dtype=bool) if pm is None else _pad(pm[0], n).astype(bool)
            data |= covered & ~to_exists & pdata
    return data, zero


def diff_extents(img, from_snapshot: str | None, offset: int, length: int, *,
                 whole_object: bool = False, include_parent: bool = True,
                 want_data: bool = False) -> Iterator[tuple[int, int, bool, bytes | None]]:
    """Yield (offset, length, exists, data) for each changed extent of
    [offset, offset+length) in ascending order; ``data`` only with
    ``want_data`` (and exists True)."""
    from .image import Image
    if offset < 0 or length < 0:
        raise InvalidArgument("offset and length must not be negative")
    size = img.size()
    end = min(offset + length, size)
    if end <= offset:
        return
    from_view = None
    if from_snapshot is not None:
        s = img.header.snap(from_snapshot)
        if img.snap is not None and s.id >= img.snap.id:
            raise InvalidArgument(f"snapshot {from_snapshot!r} is not older than "
                                  f"{img.snap.name!r}")
        from_view = Image(img.store, image_id=img.id, snap_id=s.id)
    try:
        osz = img.header.object_size
        masks = changed_objects(img, from_view, include_parent)
        first, last = offset // osz, (end - 1) // osz
        if masks is None:
            cand = range(first, last + 1)
            data_mask = zero_mask = None
        else:
            data_mask, zero_mask = masks
            cand = [int(o) for o in np.flatnonzero(data_mask | zero_mask) if first <= o <= last]
        if whole_object:
            for objno in cand:
                lo, hi = max(offset, objno * osz), min(end, (objno + 1) * osz)
                if data_mask is not None:
                    yield lo, hi - lo, bool(data_mask[objno]), None
                    continue
                # no maps: an object present now is data, one only present before is zero
                now = _present(img, objno, include_parent)
                if now:
                    yield lo, hi - lo, True, None
                elif from_view is not None and _present(from_view, objno, include_parent):
                    yield lo, hi - lo, False, None
            return
        run: list = []             # [offset, length, exists, [chunks]]
        for objno in cand:
            lo, hi = max(offset, objno * osz), min(end, (objno + 1) * osz)
            for ext in _page_diff(img, from_view, lo, hi, want_data):
                if run and run[0] + run[1] == ext[0] and run[2] == ext[2] and \
                        (not want_data or run[1] + ext[1] <= osz):
                    run[1] += ext[1]
                    if want_data and ext[3] is not None:
                        run[3].append(ext[3])
                    continue
                if run:
                    yield _emit(run)
                run = [ext[0], ext[1], ext[2], [ext[3]] if ext[3] is not None else []]
        if run:
            yield _emit(run)
    finally:
        if from_view is not None:
            from_view.close()


def _emit(run):
    data = b"".join(run[3]) if run[3] else None
    return run[0], run[1], run[2], data


def _present(view, objno: int, include_parent: bool) -> bool:
    if view.has_object(objno):
        return True
    p = view.parent_info()
    return include_parent and p is not None and objno * view.header.object_size < p.overlap


def _page_diff(img, from_view, lo: int, hi: int, want_data: bool):
    """Extents of [lo, hi) (inside one object) whose pages differ."""
    now = np.frombuffer(img.read(lo, hi - lo), dtype=np.uint8)
    if from_view is not None:
        b = from_view.read(lo, hi - lo)
        before = np.zeros(hi - lo, dtype=np.uint8)
        before[:len(b)] = np.frombuffer(b, dtype=np.uint8)
    else:
        before = None
    # pages relative to the image (lo may sit inside a page)
    p0 = lo // PAGE
    np_ = -(-hi // PAGE) - p0
    pad_lo = lo - p0 * PAGE
    total = np_ * PAGE
    a = np.zeros(total, dtype=np.uint8)
    a[pad_lo:pad_lo + len(now)] = now
    nz = a.reshape(np_, PAGE).any(axis=1)
    if before is None:
        diff = nz
    else:
        b = np.zeros(total, dtype=np.uint8)
        b[pad_lo:pad_lo + len(before)] = before
        diff = (a.reshape(np_, PAGE) != b.reshape(np_, PAGE)).any(axis=1)
    if not diff.any():
        return
    # runs of equal (diff, nonzero) state
    kind = np.where(diff, np.where(nz, 2, 1), 0).astype(np.int8)
    edges = np.flatnonzero(np.diff(kind)) + 1
    bounds = [0, *edges.tolist(), np_]
    for b0, b1 in zip(bounds, bounds[1:]):
        k = kind[b0]
        if k == 0:
            continue
        x0 = max(lo, (p0 + b0) * PAGE)
        x1 = min(hi, (p0 + b1) * PAGE)
        data = now[x0 - lo:x1 - lo].tobytes() if (want_data and k == 2) else None
        yield x0, x1 - x0, bool(k == 2), data
