"""The image directory (name -> id) and the store-side lock files of images.

The directory is the object ``rbd_directory`` in the pool: a JSON document
``{"format_version": 1, "images": {NAME: ID}}`` replaced whole on each
change. Changes are serialized across processes by an flock on
``STORE/rbd/directory.lock``; a header's read-modify-write cycles by an
flock on ``STORE/rbd/ID.header.lock``. Lock files are plain files in the
store directory (like Ceph's monitors, the store directory is not an OSD).
"""
from __future__ import annotations

import fcntl
import json
import os
from contextlib import contextmanager

from backend.errors import NotFound, StoreError

DIRECTORY = "rbd_directory"
FORMAT_VERSION = 1


def rbd_dir(store) -> str:
    d = os.path.join(store.store, "rbd")
    os.makedirs(d, mode=0o700, exist_ok=True)
    return d


@contextmanager
def flocked(path: str):
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def directory_lock(store):
    return flocked(os.path.join(rbd_dir(store), "directory.lock"))


def header_lock(store, image_id: str):
    return flocked(os.path.join(rbd_dir(store), f"{image_id}.header.lock"))


def load(store) -> dict[str, str]:
    """{image name: id}."""
    try:
        raw = store.read(DIRECTORY, 0, 1 << 26)
    except NotFound:
        return {}
    try:
        d = json.loads(raw)
        v = d["format_version"]
        if v > FORMAT_VERSION:
            raise StoreError(f"image directory format {v} is newer than this ecfs knows")
        images = d["images"]
        if not isinstance(images, dict):
            raise TypeError("images is not a mapping")
        return {str(k): str(v) for k, v in images.items()}
    except StoreError:
        raise
    except (ValueError, KeyError, TypeError) as e:
        raise StoreError(f"the image directory (object {DIRECTORY!r}) is damaged: {e}")


def save(store, images: dict[str, str]) -> None:
    doc = {"format_version": FORMAT_VERSION, "images": dict(sorted(images.items()))}
    store.write_full(DIRECTORY, (json.dumps(doc, indent=1) + "\n").encode())


def lookup(store, name: str) -> str:
    image_id = load(store).get(name)
    if image_id is None:
        raise NotFound(f"image {name!r} does not exist")
    return image_id
