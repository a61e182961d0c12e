r"""Snapshots: copy-on-write at object granularity (RADOS's clones, done by
the image layer).

A snapshot is a record in the image header (id, name, size, parent) plus,
with the object-map feature, a frozen copy of the head object map
(``rbd_object_map.ID.SNAPID``). Data is not copied when the snapshot is
taken. The first time an object is modified afterwards (write, discard,
truncate, removal), its current content is first copied to a *clone*
object named for the newest snapshot S::

    rbd_data.ID.<objno 16 hex>            head
    rbd_data.ID.<objno 16 hex>.<S 8 hex>  the object as of snapshot S

A clone serves every snapshot taken since the object's previous clone,
so snapshot s reads object n from the clone with the smallest id >= s,
or from the head when no such clone exists (nothing changed since s)::

    snapshots:   1     2           3        head
    object n:    --- write -> clone .2 --- write -> clone .3 --- ...
    read @1 -> clone .2     read @2 -> clone .2     read @3 -> clone .3

Whether an object still needs its copy is known without I/O from the head
object map: taking a snapshot turns EXISTS into EXISTS_CLEAN, and the copy
is made before the state goes back to EXISTS, so EXISTS means "already
preserved" and NONEXISTENT means "nothing to preserve" (the snapshot's own
map says the object was absent). Otherwise (EXISTS_CLEAN, or no map) the
object is preserved unless the newest snapshot already reads a clone: one
named for it, or one with a higher id kept for a removed snapshot (which
holds the same bytes). Images without an object map record an object
absent at the snapshot as a *whiteout*: a clone of size 0 (a data object
always has a size > 0).

A reader of a snapshot that finds no clone reads the head, then looks for
a clone again (with a fresh header): a writer makes the clone before it
touches the head, so a head read that raced with a write is caught.

Removing snapshot s keeps a clone only while a remaining snapshot reads
from it (a clone c serves the snapshots in (previous clone, c]); the ids of
removed snapshots whose clones are kept are listed in the header's
``clone_ids`` so readers still find them.
"""
from __future__ import annotations

from backend.errors import NotFound

from .header import ImageHeader, clone_object


def find_clone(store, hdr: ImageHeader, objno: int, snap_id: int) -> tuple[str, int] | None:
    """The clone snapshot ``snap_id`` reads object ``objno`` from, with its
    size (0: a whiteout, the object did not exist); None: read the head."""
    for cid in hdr.clone_candidates(snap_id):
        name = clone_object(hdr.id, objno, cid)
        try:
            return name, store.stat(name).size
        except NotFound:
            continue
    return None


def preserve(store, hdr: ImageHeader, objno: int, head: str, object_size: int,
             whiteout: bool) -> None:
    """Copy the head object to a clone for the newest snapshot, unless that
    snapshot already reads one (any clone with an id at or above it: see
    ``find_clone``). ``whiteout``: record an absent head as a size-0 clone
    (images whose snapshots have no object map)."""
    newest = hdr.newest_snap_id()
    if newest is None:
        return
    if find_clone(store, hdr, objno, newest) is not None:
        # the newest snapshot already reads a clone (its own, or one kept for
        # a removed later snapshot that holds the same bytes): nothing to copy
        return
    clone = clone_object(hdr.id, objno, newest)
    try:
        data = store.read(head, 0, object_size)
    except NotFound:
        if whiteout:
            store.write_full(clone, b"")
        return
    if not data:
        data = bytes(1)       # an existing but empty object must not read as a whiteout
    store.write_full(clone, data)


def prune_clones(store, hdr: ImageHeader, removed_id: int, num_objects: int,
                 progress=None) -> list[int]:
    """Delete the clones no snapshot other than ``removed_id`` reads from;
    returns the clone ids (of removed snapshots) that are still needed."""
    remaining = sorted(s.id for s in hdr.snapshots if s.id != removed_id)
    candidates = hdr.clone_candidates(0)
    kept: set[int] = set()
    for objno in range(num_objects):
        prev = -1
        for cid in candidates:
            name = clone_object(hdr.id, objno, cid)
            if not store.exists(name):
                continue
            if any(prev < r <= cid for r in remaining):
                kept.add(cid)
            else:
                store.remove(name)
            prev = cid
        if progress:
            progress(objno + 1, num_objects)
    return sorted(kept - set(remaining))
