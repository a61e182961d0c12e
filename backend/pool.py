"""The pool config (``STORE/pool.json``) and store creation.

The store directory holds::

    pool.json      this config (JSON, integer format_version)
    osdmap.json    OSD states set by the admin (down/up)
    journal.log    the redo journal (backend.journal)
    locks, inflight, ckpt.lock, clients.lock   coordination (backend.locks)
    counters/      I/O counters (backend.counters)
    osd.N/         OSD directories, unless placed elsewhere with --osd-dir

Every OSD directory holds ``osd.json`` (the store's fsid and the OSD id), so
a directory that went missing, or was swapped for another, is seen as down.
"""
from __future__ import annotations

import json
import os
import uuid
from dataclasses import asdict, dataclass, field

from .codec import SUPPORTED_PLUGINS, load_driver
from .errors import Exists, InvalidArgument, NotFound, StoreError

FORMAT_VERSION = 1
POOL_FILE = "pool.json"
OSD_FILE = "osd.json"
WRITE_MODES = ("auto", "delta", "full", "mixed", "reconstruct")
MIN_CHUNK, MAX_CHUNK = 4096, 1 << 20
SMALL_CHUNK, LARGE_CHUNK = 4096, 65536
MAX_OBJECT_SIZE = 128 << 20   # as Ceph's osd_max_object_size


@dataclass
class OsdEntry:
    id: int
    path: str   # relative to the store directory, or absolute


@dataclass
class PoolConfig:
    k: int
    m: int
    plugin: str
    chunk_size: str | int       # "auto" or bytes
    object_size: int            # default image object size
    osds: list[OsdEntry]
    write_mode: str = "auto"
    fsid: str = field(default_factory=lambda: str(uuid.uuid4()))
    format_version: int = FORMAT_VERSION

    def chunk_for(self, size: int) -> int:
        """Chunk size for an object of (expected) ``size`` bytes.

        ``auto``: 4 KiB chunks while the object is smaller than one stripe of
        64 KiB chunks (small objects waste less padding and parity), 64 KiB
        beyond (fewer shard I/Os per large read or write)."""
        if self.chunk_size != "auto":
            return int(self.chunk_size)
        return LARGE_CHUNK if size >= self.k * LARGE_CHUNK else SMALL_CHUNK

    def to_json(self) -> dict:
        d = asdict(self)
        d["osds"] = [asdict(o) for o in self.osds]
        return d


def pool_path(store: str) -> str:
    return os.path.join(store, POOL_FILE)


def write_json_atomic(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dfd = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def load_pool(store: str) -> PoolConfig:
    path = pool_path(store)
    try:
        with open(path) as f:
            d = json.load(f)
    except FileNotFoundError:
        raise NotFound(f"no ecfs store at {store} (run 'ecfs init')")
    except (OSError, ValueError) as e:
        raise StoreError(f"cannot read {path}: {e}")
    if not isinstance(d, dict) or not isinstance(d.get("format_version"), int):
        raise StoreError(f"{path}: no integer format_version: not an ecfs pool config")
    if d["format_version"] > FORMAT_VERSION:
        raise StoreError(f"store format {d['format_version']} is newer than this ecfs "
                         f"supports ({FORMAT_VERSION}); upgrade ecfs")
    try:
        osds = [OsdEntry(int(o["id"]), str(o["path"])) for o in d["osds"]]
        cfg = PoolConfig(k=int(d["k"]), m=int(d["m"]), plugin=str(d["plugin"]),
                         chunk_size=d["chunk_size"], object_size=int(d["object_size"]),
                         osds=osds, write_mode=str(d.get("write_mode", "auto")),
                         fsid=str(d["fsid"]), format_version=d["format_version"])
    except (KeyError, TypeError, ValueError) as e:
        raise StoreError(f"{path}: damaged pool config ({e})")
    validate_profile(cfg.k, cfg.m, len(cfg.osds), cfg.plugin, cfg.chunk_size, check_plugin=False)
    return cfg


def validate_profile(k: int, m: int, n: int, plugin: str, chunk_size, check_plugin=True) -> None:
    if k < 2:
        raise InvalidArgument(f"k must be at least 2 (got {k})")
    if m < 1:
        raise InvalidArgument(f"m must be at least 1 (got {m})")
    if k + m > 64:
        raise InvalidArgument(f"k+m must be at most 64 (got {k + m})")
    if k + m > n:
        raise InvalidArgument(f"k+m={k + m} needs at least that many OSDs (have {n})")
    if plugin not in SUPPORTED_PLUGINS:
        raise InvalidArgument(f"unknown plugin {plugin!r} (supported: {', '.join(SUPPORTED_PLUGINS)})")
    if chunk_size != "auto":
        c = int(chunk_size)
        if c < MIN_CHUNK or c > MAX_CHUNK or c % 4096:
            raise InvalidArgument(f"chunk size must be auto or a multiple of 4K in 4K..1M (got {c})")
    if check_plugin:
        load_driver(plugin, k, m)


def osd_abspath(store: str, entry: OsdEntry) -> str:
    return entry.path if os.path.isabs(entry.path) else os.path.join(store, entry.path)


def _usable_dir(path: str, what: str) -> None:
    if os.path.exists(path):
        if not os.path.isdir(path):
            raise InvalidArgument(f"{what} {path} exists and is not a directory")
        extra = [e for e in os.listdir(path) if e != "lost+found"]
        if extra:
            raise Exists(f"{what} {path} is not empty")


def create_store(store: str, *, k: int = 4, m: int = 2, osds: int | None = None,
                 osd_dirs: list[str] | None = None, plugin: str = "isa_l_rs_vand",
                 chunk_size="auto", object_size: int = 4 << 20,
                 write_mode: str = "auto") -> PoolConfig:
    """Create a store; validates everything before writing anything."""
    store = os.path.abspath(store)
    if os.path.exists(pool_path(store)):
        raise Exists(f"{store} already holds an ecfs store")
    if osd_dirs:
        if osds is not None and osds != len(osd_dirs):
            raise InvalidArgument("--osds and --osd-dir disagree on the number of OSDs")
        paths = [os.path.abspath(p) for p in osd_dirs]
        if len(set(paths)) != len(paths):
            raise InvalidArgument("the same --osd-dir is given twice")
    else:
        n = k + m if osds is None else osds
        if n < 1:
            raise InvalidArgument(f"--osds must be positive (got {n})")
        paths = [os.path.join(store, f"osd.{i}") for i in range(n)]
    if write_mode not in WRITE_MODES:
        raise InvalidArgument(f"unknown write mode {write_mode!r} ({', '.join(WRITE_MODES)})")
    validate_profile(k, m, len(paths), plugin, chunk_size)
    if object_size < 4096 or object_size > MAX_OBJECT_SIZE or object_size & (object_size - 1):
        raise InvalidArgument("object size must be a power of two between 4K and 128M")
    _usable_dir(store, "store directory")
    for p in paths:
        if not p.startswith(store + os.sep):
            _usable_dir(p, "OSD directory")
    entries = []
    for i, p in enumerate(paths):
        rel = os.path.relpath(p, store) if p.startswith(store + os.sep) else p
        entries.append(OsdEntry(i, rel))
    cfg = PoolConfig(k=k, m=m, plugin=plugin, chunk_size=chunk_size,
                     object_size=object_size, osds=entries, write_mode=write_mode)
    try:
        os.makedirs(store, exist_ok=True)
        for e in entries:
            d = osd_abspath(store, e)
            os.makedirs(os.path.join(d, "objects"), exist_ok=True)
            write_json_atomic(os.path.join(d, OSD_FILE),
                              {"format_version": FORMAT_VERSION, "fsid": cfg.fsid, "osd_id": e.id})
        write_json_atomic(os.path.join(store, "osdmap.json"), {"down": []})
        write_json_atomic(pool_path(store), cfg.to_json())
    except OSError as e:
        raise StoreError(f"cannot create store in {store}: {e.strerror or e}")
    return cfg
