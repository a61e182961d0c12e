"""Layering: clones of a protected snapshot (librbd's parent/child images).

A child image's header names its parent (image id, snapshot id, and the
*overlap*: how many bytes at the start of the child still come from the
parent). An object the child does not have reads from the parent
snapshot within the overlap, zeros beyond it. The first write to such an
object copies the parent's bytes for the whole object up into the child
(copy-up), then applies the write, so a child object that exists is
complete on its own. ``flatten`` copies up every remaining object and
drops the parent link. A snapshot of the child records the parent link it
had, so flattening the head leaves older child snapshots readable.

A parent snapshot may only be cloned while protected and cannot be
unprotected or removed while any image (or image snapshot) refers to it;
``children`` finds them by scanning the image headers (there are few).
"""
from __future__ import annotations

from . import directory
from .header import ImageHeader, Parent


def load_header(store, image_id: str, name: str = "") -> ImageHeader:
    from .image import load_header as _load
    return _load(store, image_id, name)


def refers_to(hdr: ImageHeader, image_id: str, snap_id: int) -> bool:
    """Whether image ``hdr`` (its head or one of its snapshots) reads from
    snapshot ``snap_id`` of image ``image_id``."""
    links = [hdr.parent] + [s.parent for s in hdr.snapshots]
    return any(p is not None and p.image_id == image_id and p.snap_id == snap_id
               for p in links)


def children(store, image_id: str, snap_id: int) -> list[str]:
    """Names of the images cloned from snapshot ``snap_id`` of ``image_id``."""
    out = []
    for name, cid in sorted(directory.load(store).items()):
        if cid == image_id:
            continue
        try:
            hdr = load_header(store, cid, name)
        except Exception:
            continue          # a damaged header is reported by its own commands
        if refers_to(hdr, image_id, snap_id):
            out.append(name)
    return out


def parent_name(store, p: Parent) -> str:
    """The parent image's current name (it may have been renamed)."""
    for name, iid in directory.load(store).items():
        if iid == p.image_id:
            return name
    return p.image_name
