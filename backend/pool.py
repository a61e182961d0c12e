"""The pool config (``STORE/pool.json``) and store creation.

The store directory holds::

    pool.json      this config (JSON, integer format_version)
    osdmap.json    OSD states set by the admin (down/up)
    journal.log    the redo journal (backend.journal; sealed segments
                   journal.log.SEQ wait beside it until they are synced)
    locks, inflight, ckpt.lock, clients.lock   coordination (backend.locks)
    counters/      I/O counters (backend.counters)
    osd.N/         OSD directories, unless placed elsewhere with --osd-dir

Every OSD directory holds ``osd.json`` (the store's fsid and the OSD id), so
a directory that went missing, or was swapped for another, is seen as down.
"""
from __future__ import annotations

import json
import os
import shutil
import uuid
from dataclasses import asdict, dataclass, field

from .codec import SUPPORTED_PLUGINS, load_driver
from .errors import Exists, InvalidArgument, NotFound, StoreError

FORMAT_VERSION = 1            # written while no OSD was ever removed (and osd.json's)
REMOVED_FORMAT = 2            # pool.json listing removed OSDs: an older ecfs would
                              # place shards without them, so it must refuse the store
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
    # shards a write must reach (Ceph's min_size); None: K+1, Ceph's EC default
    min_size: int | None = None
    # ids of OSDs taken out ('ecfs osd rm'): never reused, and placement keeps
    # their draws (backend/placement.py) so that a removal moves only their shards
    removed: list[int] = field(default_factory=list)

    @property
    def write_min(self) -> int:
        return self.k + 1 if self.min_size is None else self.min_size

    def chunk_for(self, size: int) -> int:
        """Chunk size for an object of (expected) ``size`` bytes.

        ``auto``: 4 KiB chunks while the object is smaller than one stripe of
        64 KiB chunks (small objects waste less padding and parity), 64 KiB
        beyond (fewer shard I/Os per large read or write)."""
        if self.chunk_size != "auto":
            return int(self.chunk_size)
        return LARGE_CHUNK if size >= self.k * LARGE_CHUNK else SMALL_CHUNK

    @property
    def next_id(self) -> int:
        return max([e.id for e in self.osds] + self.removed) + 1

    def to_json(self) -> dict:
        d = asdict(self)
        d["osds"] = [asdict(o) for o in self.osds]
        d["removed"] = sorted(self.removed)
        d["format_version"] = REMOVED_FORMAT if self.removed else FORMAT_VERSION
        if not self.removed:
            del d["removed"]
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
    """Read and check ``STORE/pool.json``; anything damaged or of the wrong
    type is a StoreError naming the file."""
    path = pool_path(store)
    try:
        with open(path) as f:
            d = json.load(f)
    except FileNotFoundError:
        raise NotFound(f"no ecfs store at {store} (run 'ecfs init')")
    except PermissionError:
        raise StoreError(f"cannot read {path}: permission denied")
    except (OSError, ValueError) as e:
        raise StoreError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}")
    if not isinstance(d, dict) or not _is_int(d.get("format_version")):
        raise StoreError(f"{path}: no integer format_version: not an ecfs pool config")
    if d["format_version"] > REMOVED_FORMAT:
        raise StoreError(f"store format {d['format_version']} is newer than this ecfs "
                         f"supports ({REMOVED_FORMAT}); upgrade ecfs")
    if d["format_version"] < 1:
        raise StoreError(f"{path}: bad format_version {d['format_version']}")

    def bad(what: str):
        return StoreError(f"{path}: damaged pool config: {what}")

    for key in ("fsid", "k", "m", "plugin", "chunk_size", "object_size", "osds"):
        if key not in d:
            raise bad(f"no {key!r}")
    for key in ("k", "m", "object_size"):
        if not _is_int(d[key]):
            raise bad(f"{key} must be an integer (got {d[key]!r})")
    if not isinstance(d["fsid"], str) or not d["fsid"]:
        raise bad(f"fsid must be a string (got {d['fsid']!r})")
    if not isinstance(d["plugin"], str):
        raise bad(f"plugin must be a string (got {d['plugin']!r})")
    cs = d["chunk_size"]
    if cs != "auto" and not _is_int(cs):
        raise bad(f"chunk_size must be \"auto\" or an integer (got {cs!r})")
    wm = d.get("write_mode", "auto")
    if wm not in WRITE_MODES:
        raise bad(f"write_mode must be one of {', '.join(WRITE_MODES)} (got {wm!r})")
    if not isinstance(d["osds"], list):
        raise bad("osds must be a list")
    osds = []
    for o in d["osds"]:
        if not isinstance(o, dict) or not _is_int(o.get("id")) or o["id"] < 0 \
                or not isinstance(o.get("path"), str) or not o["path"]:
            raise bad(f"bad OSD entry {o!r} (want {{\"id\": N, \"path\": PATH}})")
        osds.append(OsdEntry(o["id"], o["path"]))
    ids = [o.id for o in osds]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise bad(f"osd.{dup[0]} is listed more than once")
    removed = d.get("removed", [])
    if not isinstance(removed, list) or not all(_is_int(i) and i >= 0 for i in removed) \
            or len(set(removed)) != len(removed):
        raise bad(f"removed must be a list of distinct OSD ids (got {removed!r})")
    if set(removed) & set(ids):
        raise bad(f"osd.{sorted(set(removed) & set(ids))[0]} is listed and removed")
    if removed and d["format_version"] < REMOVED_FORMAT:
        raise bad(f"removed OSDs need format_version {REMOVED_FORMAT}")
    ms = d.get("min_size")
    if ms is not None and (not _is_int(ms) or not d["k"] <= ms <= d["k"] + d["m"]):
        raise bad(f"min_size must be an integer within k..k+m (got {ms!r})")
    cfg = PoolConfig(k=d["k"], m=d["m"], plugin=d["plugin"], chunk_size=cs,
                     object_size=d["object_size"], osds=osds, write_mode=wm,
                     fsid=d["fsid"], format_version=d["format_version"], min_size=ms,
                     removed=sorted(removed))
    paths = [os.path.realpath(osd_abspath(store, o)) for o in osds]
    if len(set(paths)) != len(paths):
        raise bad("two OSDs share one directory")
    try:
        validate_profile(cfg.k, cfg.m, len(cfg.osds), cfg.plugin, cfg.chunk_size,
                         check_plugin=False)
        validate_object_size(cfg.object_size)
    except InvalidArgument as e:
        raise bad(str(e))
    return cfg


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def validate_profile(k: int, m: int, n: int, plugin: str, chunk_size, check_plugin=True) -> None:
    if k < 2:
        raise InvalidArgument(f"K must be >= 2 (got {k})")
    if m < 1:
        raise InvalidArgument(f"M must be >= 1 (got {m})")
    if k + m > 64:
        raise InvalidArgument(f"K+M must be <= 64 (got {k + m})")
    if k + m > n:
        raise InvalidArgument(f"K+M={k + m} needs at least that many OSDs (have {n})")
    if plugin not in SUPPORTED_PLUGINS:
        raise InvalidArgument(f"unknown plugin {plugin!r} (supported: {', '.join(SUPPORTED_PLUGINS)})")
    if chunk_size != "auto":
        c = int(chunk_size)
        if c < MIN_CHUNK or c > MAX_CHUNK or c % 4096:
            raise InvalidArgument(f"chunk size must be auto or a multiple of 4K in 4K..1M (got {c})")
    if check_plugin:
        load_driver(plugin, k, m)


def validate_object_size(size: int) -> None:
    if size < 4096 or size > MAX_OBJECT_SIZE or size & (size - 1):
        raise InvalidArgument(f"object size must be a power of two between 4K and 128M (got {size})")


def osd_abspath(store: str, entry: OsdEntry) -> str:
    return entry.path if os.path.isabs(entry.path) else os.path.join(store, entry.path)


# What the store directory holds for itself: no OSD directory may take these names.
STORE_ENTRIES = ("pool.json", "osdmap.json", "osdmap.json.lock", "journal.log", "locks",
                 "inflight", "ckpt.lock", "clients.lock", "counters", "missed", "backfill",
                 "rebalance.json", "maint.lock", "seq", "faults.json", "rbd", "mount.log")
MAX_OSDS = 1024


def _inside(path: str, parent: str) -> bool:
    return path.startswith(parent.rstrip(os.sep) + os.sep)


def _check_layout(store: str, paths: list[str]) -> None:
    """OSD directories are distinct, do not nest, are not the store (nor
    contain it), and inside the store take no name the store uses."""
    rstore = os.path.realpath(store)
    real = [os.path.realpath(p) for p in paths]
    for p, rp in zip(paths, real):
        if rp == rstore:
            raise InvalidArgument(f"OSD directory {p} is the store directory itself")
        if _inside(rstore, rp):
            raise InvalidArgument(f"the store directory {store} is inside OSD directory {p}")
        top = os.path.relpath(rp, rstore).split(os.sep)[0] if _inside(rp, rstore) else None
        if top is not None and (top in STORE_ENTRIES or top.startswith("journal.log.")):
            raise InvalidArgument(f"OSD directory {p} takes a name the store uses for itself")
    for i in range(len(real)):
        for j in range(len(real)):
            if i == j:
                continue
            if real[i] == real[j] and i < j:
                raise InvalidArgument(f"the same OSD directory is given twice: {paths[j]}")
            if _inside(real[i], real[j]):
                raise InvalidArgument(f"OSD directory {paths[i]} is inside OSD directory {paths[j]}")


def _usable_dir(path: str, what: str) -> None:
    """``path`` is an empty directory we may write in, or can be created."""
    if os.path.lexists(path):
        if not os.path.isdir(path):
            raise InvalidArgument(f"{what} {path} exists and is not a directory")
        try:
            extra = [e for e in os.listdir(path) if e != "lost+found"]
        except OSError as e:
            raise InvalidArgument(f"cannot read {what} {path}: {e.strerror}")
        if extra:
            raise Exists(f"{what} {path} is not empty")
        if not os.access(path, os.W_OK | os.X_OK):
            raise InvalidArgument(f"cannot write in {what} {path}: permission denied")
        return
    parent = os.path.dirname(path)
    while not os.path.lexists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise InvalidArgument(f"cannot create {what} {path}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InvalidArgument(f"cannot create {what} {path}: {parent} is not writable "
                              f"(permission denied)")


class _Undo:
    """What a store creation made, to take it away again on failure: the
    directories it created (with all inside), and the contents it put into
    directories that existed (and were empty)."""

    def __init__(self):
        self.created: list[str] = []
        self.filled: list[str] = []

    def makedirs(self, path: str) -> None:
        missing = []
        p = path
        while not os.path.lexists(p):
            missing.append(p)
            p = os.path.dirname(p)
        if not missing and path not in self.filled and not any(
                path == c or _inside(path, c) for c in self.created):
            self.filled.append(path)
        for d in reversed(missing):
            os.mkdir(d)
            if not any(_inside(d, c) for c in self.created):
                self.created.append(d)

    def run(self) -> None:
        for d in self.filled:
            for e in _listdir(d):
                if e == "lost+found":
                    continue
                p = os.path.join(d, e)
                if os.path.isdir(p) and not os.path.islink(p):
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    try:
                        os.unlink(p)
                    except OSError:
                        pass
        for d in reversed(self.created):
            shutil.rmtree(d, ignore_errors=True)


def _listdir(p: str) -> list[str]:
    try:
        return os.listdir(p)
    except OSError:
        return []


def create_store(store: str, *, k: int = 4, m: int = 2, osds: int | None = None,
                 osd_dirs: list[str] | None = None, plugin: str = "isa_l_rs_vand",
                 chunk_size="auto", object_size: int = 4 << 20,
                 write_mode: str = "auto", min_size: int | None = None,
                 finish=None) -> PoolConfig:
    """Create a store. Everything is checked before anything is written; if
    writing fails all the same, what this call created is removed again.
    ``finish(store)`` runs last, under the same guarantee."""
    store = os.path.abspath(store)
    if os.path.exists(pool_path(store)):
        raise Exists(f"{store} already holds an ecfs store")
    if write_mode not in WRITE_MODES:
        raise InvalidArgument(f"unknown write mode {write_mode!r} ({', '.join(WRITE_MODES)})")
    if osd_dirs:
        if osds is not None and osds != len(osd_dirs):
            raise InvalidArgument("--osds and --osd-dir disagree on the number of OSDs")
        n = len(osd_dirs)
    else:
        n = k + m if osds is None else osds
        if osds is not None and osds < 1:
            raise InvalidArgument(f"--osds must be positive (got {osds})")
    validate_profile(k, m, n, plugin, chunk_size)
    if min_size is not None and not k <= min_size <= k + m:
        raise InvalidArgument(f"min size must be within K..K+M ({k}..{k + m}; got {min_size})")
    if n > MAX_OSDS:
        raise InvalidArgument(f"at most {MAX_OSDS} OSDs (got {n})")
    validate_object_size(object_size)
    if osd_dirs:
        paths = [os.path.abspath(p) for p in osd_dirs]
    else:
        paths = [os.path.join(store, f"osd.{i}") for i in range(n)]
    _check_layout(store, paths)
    _usable_dir(store, "store directory")
    for p in paths:
        _usable_dir(p, "OSD directory")
    entries = []
    for i, p in enumerate(paths):
        rel = os.path.relpath(p, store) if _inside(p, store) else p
        entries.append(OsdEntry(i, rel))
    cfg = PoolConfig(k=k, m=m, plugin=plugin, chunk_size=chunk_size,
                     object_size=object_size, osds=entries, write_mode=write_mode,
                     min_size=k + 1 if min_size is None else min_size)
    undo = _Undo()
    try:
        undo.makedirs(store)
        for e in entries:
            d = osd_abspath(store, e)
            undo.makedirs(d)
            os.mkdir(os.path.join(d, "objects"))
            write_json_atomic(os.path.join(d, OSD_FILE),
                              {"format_version": FORMAT_VERSION, "fsid": cfg.fsid, "osd_id": e.id})
        write_json_atomic(os.path.join(store, "osdmap.json"), {"down": [], "reasons": {}})
        write_json_atomic(pool_path(store), cfg.to_json())
        if finish is not None:
            finish(store)
    except OSError as e:
        undo.run()
        where = e.filename or store
        if where.endswith(".tmp"):
            where = where[:-4]
        raise StoreError(f"cannot create {where}: {e.strerror or e}")
    except BaseException:
        undo.run()
        raise
    return cfg
