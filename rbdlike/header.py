"""The image header: what an image is, kept as one object in the pool.

An image NAME with id ID is the object ``rbd_header.ID`` (a JSON document,
docs/format-image-header.md) plus data objects ``rbd_data.ID.<16 hex
objno>``, object maps ``rbd_object_map.ID[.<snap id>]`` and the directory
entry in ``rbd_directory``. Being objects, they are erasure coded like the
data and survive the loss of any M OSDs. A header is replaced whole with
``write_full`` (atomic in the object store); read-modify-write cycles are
serialized by the caller (rbdlike.directory.header_lock).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from backend.errors import InvalidArgument, NotFound, StoreError

FORMAT_VERSION = 2            # the newest this ecfs reads (2: "requests")
MIN_OBJECT_SIZE = 4 << 10
MAX_OBJECT_SIZE = 32 << 20
MAX_IMAGE_SIZE = 1 << 50                   # 1 PiB, far past anything a test makes
MAX_NAME = 250

FEATURES = ("layering", "exclusive-lock", "object-map", "fast-diff", "shared")
DEFAULT_FEATURES = ("layering", "exclusive-lock", "object-map", "fast-diff")


def header_object(image_id: str) -> str:
    return f"rbd_header.{image_id}"


def data_object(image_id: str, objno: int) -> str:
    return f"rbd_data.{image_id}.{objno:016x}"


def clone_object(image_id: str, objno: int, clone_id: int) -> str:
    """Where object ``objno`` keeps its content as of snapshot ``clone_id``
    (copy-on-write, rbdlike.snapshot)."""
    return f"rbd_data.{image_id}.{objno:016x}.{clone_id:08x}"


def validate_image_name(name: str, what: str = "image") -> None:
    raw = name.encode("utf-8", "surrogateescape")
    if not 1 <= len(raw) <= MAX_NAME:
        raise InvalidArgument(f"{what} name must be 1..{MAX_NAME} bytes")
    bad = [c for c in ("\0", "/", "@") if c in name]
    if bad:
        raise InvalidArgument(f"{what} name {name!r} must not contain {bad[0]!r}")
    if name == ".snap":
        raise InvalidArgument(f"{what} name '.snap' is reserved")
    if name in (".", ".."):
        # images and snapshots are files in the mount, where these two
        # name the directory itself and its parent
        raise InvalidArgument(f"{what} name {name!r} is not allowed: '.' and '..' name "
                              f"directories")
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidArgument(f"{what} name must be valid UTF-8")


def validate_object_size(n: int) -> None:
    if n < MIN_OBJECT_SIZE or n > MAX_OBJECT_SIZE or n & (n - 1):
        raise InvalidArgument(f"object size must be a power of two in 4K..32M (got {n})")


def validate_features(features) -> tuple[str, ...]:
    fs = tuple(dict.fromkeys(features))
    for f in fs:
        if f not in FEATURES:
            raise InvalidArgument(f"unknown image feature {f!r} (known: {', '.join(FEATURES)})")
    if "shared" in fs and ("exclusive-lock" in fs or "object-map" in fs):
        raise InvalidArgument("a shared image has no exclusive-lock and no object-map")
    if "object-map" in fs and "exclusive-lock" not in fs:
        raise InvalidArgument("object-map requires exclusive-lock")
    if "fast-diff" in fs and "object-map" not in fs:
        raise InvalidArgument("fast-diff requires object-map")
    return fs


@dataclass
class Parent:
    image_id: str
    image_name: str
    snap_id: int
    snap_name: str
    overlap: int


@dataclass
class Snapshot:
    id: int
    name: str
    size: int
    timestamp: float
    protected: bool = False
    parent: Parent | None = None      # the image's parent when the snapshot was taken


@dataclass
class ImageHeader:
    name: str
    id: str
    size: int
    object_size: int
    features: list[str]
    created: float
    snapshots: list[Snapshot] = field(default_factory=list)
    snap_seq: int = 0
    parent: Parent | None = None
    object_map_invalid: bool = False
    # ids of removed snapshots whose copy-on-write clones older snapshots still read
    clone_ids: list[int] = field(default_factory=list)
    # a snapshot being created: {"id", "name", "timestamp"} (finished by the next writer)
    snap_pending: dict | None = None
    # file attributes set through a mount (chmod, chown, touch): "mode",
    # "uid", "gid", "mtime_ns"; absent keys take the mount's defaults
    attrs: dict = field(default_factory=dict)
    # maintenance requests run for peers: {"id", "op", "result"}, newest
    # last, bounded (rbdlike.lock_owner: a retried request runs once)
    requests: list[dict] = field(default_factory=list)
    format_version: int = 1

    @property
    def num_objects(self) -> int:
        return -(-self.size // self.object_size)

    def has(self, feature: str) -> bool:
        return feature in self.features

    def snap(self, name: str) -> Snapshot:
        for s in self.snapshots:
            if s.name == name:
                return s
        raise NotFound(f"image {self.name!r} has no snapshot {name!r}")

    def snap_by_id(self, snap_id: int) -> Snapshot | None:
        return next((s for s in self.snapshots if s.id == snap_id), None)

    def newest_snap_id(self) -> int | None:
        return max((s.id for s in self.snapshots), default=None)

    def clone_candidates(self, from_id: int) -> list[int]:
        """Ids a copy-on-write clone of some object may carry, >= from_id."""
        ids = {s.id for s in self.snapshots} | set(self.clone_ids)
        return sorted(i for i in ids if i >= from_id)

    def encode(self) -> bytes:
        d = asdict(self)
        # format 1 unless the header carries request records, so a header
        # no peer request touched stays readable by an older ecfs
        if d["requests"]:
            d["format_version"] = 2
        else:
            del d["requests"]
            d["format_version"] = 1
        return (json.dumps(d, sort_keys=True, indent=1) + "\n").encode()

    @classmethod
    def decode(cls, raw: bytes, where: str) -> "ImageHeader":
        try:
            d = json.loads(raw)
            if not isinstance(d, dict):
                raise ValueError("not an object")
            v = d.get("format_version")
            if not isinstance(v, int):
                raise ValueError("no format_version")
            if v > FORMAT_VERSION:
                raise StoreError(f"{where}: image header format {v} is newer than this "
                                 f"ecfs knows ({FORMAT_VERSION})")
            snaps = []
            for sd in d.get("snapshots", []):
                if sd.get("parent") is not None:
                    sd["parent"] = Parent(**sd["parent"])
                snaps.append(Snapshot(**sd))
            d["snapshots"] = snaps
            if d.get("parent") is not None:
                d["parent"] = Parent(**d["parent"])
            h = cls(**d)
            if not (isinstance(h.size, int) and isinstance(h.object_size, int) and h.size >= 0):
                raise ValueError("bad size")
            validate_object_size(h.object_size)
            return h
        except StoreError:
            raise
        except (ValueError, TypeError, InvalidArgument) as e:
            raise StoreError(f"{where}: damaged image header ({e})")


def load_header(store, image_id: str, name: str = "") -> ImageHeader:
    try:
        raw = store.read(header_object(image_id), 0, 1 << 26)
    except NotFound:
        raise NotFound(f"image {name or image_id!r}: header object is missing")
    return ImageHeader.decode(raw, f"image {name or image_id!r}")


def save_header(store, hdr: ImageHeader) -> None:
    """Replace the header whole (atomic; the caller holds its header lock)."""
    store.write_full(header_object(hdr.id), hdr.encode())
