"""``ecfs rbd map|unmap|showmapped``: images as block devices, through a
loop device on the image file in a live mount of the store (rbd-nbd's
role). Discard on the loop device becomes FUSE fallocate(PUNCH_HOLE) on
the image file, which the mount turns into object deletes and zeroing.

Each mapping is recorded in ``STORE/rbd/mapped/loopN.json`` with the
backing file's inode and device numbers, so ``unmap`` and ``showmapped``
still know the device after its mount died (the kernel then reports the
backing path relative to the lost mount), and never take a loop device
that has been reused for something else for one of ours. Once the mount is
gone the backing inode cannot be asked any more (losetup shows no inode
and no device numbers): a device in that state is still ours when its
backing path is the recorded image's path relative to the lost mount.
"""
from __future__ import annotations

import json
import os
import subprocess

from backend.errors import Busy, InvalidArgument, NotFound
from rbdlike import directory

from .cli import add_json, wants_json
from .cmd_rbd_snap import image_spec
from .output import print_json, print_table
from . import mounts


def register(rs, parser_class) -> None:
    q = rs.add_parser("map", help="attach a loop device to image NAME (prints /dev/loopN)")
    q.add_argument("name", metavar="NAME[@SNAP]")
    q.add_argument("--mount", default=None, metavar="MNT",
                   help="the mount to use (default: the one live mount of this store)")
    q.add_argument("--read-only", action="store_true", help="map read-only")
    q.set_defaults(func=cmd_map)
    q = rs.add_parser("unmap", help="detach a loop device mapped with 'rbd map'")
    q.add_argument("device")
    q.set_defaults(func=cmd_unmap)
    q = rs.add_parser("showmapped", help="list the mapped images")
    add_json(q)
    q.set_defaults(func=cmd_showmapped)


def _mount_for(store: str, want: str | None) -> mounts.MountRecord:
    live = mounts.live_mounts(store)
    if want is not None:
        want = mounts.resolve(os.path.abspath(want))
        for rec in live:
            if rec.mountpoint == want:
                return rec
        raise NotFound(f"{want} is not a live ecfs mount of the store {store}")
    if not live:
        raise NotFound(f"the store {store} is not mounted (run 'ecfs mount MOUNTPOINT' first, "
                       f"or give --mount)")
    if len(live) > 1:
        raise InvalidArgument(f"the store {store} is mounted {len(live)} times "
                              f"({', '.join(r.mountpoint for r in live)}); choose one with --mount")
    return live[0]


def _losetup_list(dev: str | None = None) -> list[dict]:
    p = subprocess.run(["losetup", "--list", "--json", "--output",
                        "NAME,BACK-FILE,BACK-INO,BACK-MAJ:MIN,RO"] + ([dev] if dev else []),
                       capture_output=True, text=True)
    if p.returncode != 0 or not p.stdout.strip():
        return []
    return json.loads(p.stdout).get("loopdevices", [])


def _records_dir(store: str) -> str:
    d = os.path.join(store, "rbd", "mapped")
    os.makedirs(d, mode=0o700, exist_ok=True)
    return d


def _identity(dev: dict) -> tuple:
    return (str(dev.get("back-ino")), str(dev.get("back-maj:min")))


def _orphan_of(dev: dict, rec: dict) -> bool:
    """``dev`` lost its mount (no backing inode to ask) and still backs the
    recorded image, by its path relative to that mount."""
    if dev.get("back-ino") is not None or dev.get("back-maj:min") is not None:
        return False
    rel = rec.get("image", "") if not rec.get("snap") else \
        f".snap/{rec.get('image', '')}/{rec['snap']}"
    back = (dev.get("back-file") or "").removesuffix(" (deleted)")
    return bool(rel) and back == "/" + rel


def _recorded(store: str) -> dict[str, dict]:
    """{device: record} of the mappings this store made that still hold
    (a record whose device now backs something else is dropped)."""
    out = {}
    d = _records_dir(store)
    for f in sorted(os.listdir(d)):
        path = os.path.join(d, f)
        try:
            with open(path) as fh:
                rec = json.load(fh)
            dev = _losetup_list(rec["device"])
        except (OSError, ValueError, KeyError):
            dev = []
        if dev and (_identity(dev[0]) == tuple(rec.get("identity", ()))
                    or _orphan_of(dev[0], rec)):
            out[rec["device"]] = rec
        else:
            try:
                os.unlink(path)
            except OSError:
                pass
    return out


def _mapped(store: str) -> list[dict]:
    """Loop devices whose backing file is an image in a live mount of the store."""
    out = []
    points = {rec.mountpoint for rec in mounts.live_mounts(store)}
    points |= set(mounts.ecfs_mount_points(store))   # a dead mount's devices too
    for point in sorted(points):
        base = point + "/"
        for dev in _losetup_list():
            back = (dev.get("back-file") or "").removesuffix(" (deleted)")
            if back.startswith(base):
                rel = back[len(base):]
                image, snap = rel, None
                if rel.startswith(".snap/"):
                    image, _, snap = rel[len(".snap/"):].partition("/")
                out.append({"device": dev["name"], "image": image, "snap": snap,
                            "mount": point, "read_only": bool(dev.get("ro"))})
    seen = {m["device"] for m in out}
    for dev, rec in _recorded(store).items():
        if dev not in seen:          # its mount died: still ours to unmap
            out.append({"device": dev, "image": rec["image"], "snap": rec.get("snap"),
                        "mount": rec["mount"], "read_only": rec.get("read_only", False)})
    return sorted(out, key=lambda m: m["device"])


def cmd_map(args) -> int:
    name, snap = image_spec(args.name)
    from backend.objectstore import ObjectStore
    with ObjectStore(args.store) as s:
        image_id = directory.lookup(s, name)
        if snap is not None:
            from rbdlike.image import load_header
            load_header(s, image_id, name).snap(snap)
    rec = _mount_for(args.store, args.mount)
    path = os.path.join(rec.mountpoint, name) if snap is None else \
        os.path.join(rec.mountpoint, ".snap", name, snap)
    if not os.path.exists(path):
        raise NotFound(f"{path} does not exist in the mount")
    ro = args.read_only or snap is not None or rec.read_only
    cmd = ["losetup", "--find", "--show"] + (["--read-only"] if ro else []) + [path]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        err = (p.stderr.strip().splitlines() or ["losetup failed"])[-1]
        raise Busy(f"cannot attach a loop device to {path}: {err}")
    dev = p.stdout.strip()
    info = _losetup_list(dev)
    if info:
        record = {"device": dev, "image": name, "snap": snap, "mount": rec.mountpoint,
                  "read_only": ro, "identity": list(_identity(info[0]))}
        path = os.path.join(_records_dir(args.store), os.path.basename(dev) + ".json")
        with open(path + ".tmp", "w") as f:
            json.dump(record, f)
        os.replace(path + ".tmp", path)
    print(dev)
    return 0


def cmd_unmap(args) -> int:
    dev = args.device
    mapped = {m["device"]: m for m in _mapped(args.store)}
    if dev not in mapped:
        # a device of another store, or not an ecfs image at all: leave it alone
        raise NotFound(f"{dev} is not an image of this store mapped with 'ecfs rbd map' "
                       f"(see 'ecfs rbd showmapped')")
    p = subprocess.run(["losetup", "--detach", dev], capture_output=True, text=True)
    if p.returncode != 0:
        err = (p.stderr.strip().splitlines() or ["losetup failed"])[-1]
        raise Busy(f"cannot detach {dev}: {err}")
    try:
        os.unlink(os.path.join(_records_dir(args.store), os.path.basename(dev) + ".json"))
    except FileNotFoundError:
        pass
    return 0


def cmd_showmapped(args) -> int:
    rows = _mapped(args.store)
    if wants_json(args):
        print_json([{"id": i, "pool": "ecfs", "namespace": "", "name": r["image"],
                     "snap": r["snap"] or "-", "device": r["device"], "mount": r["mount"]}
                    for i, r in enumerate(rows)])
        return 0
    if rows:
        print_table(["id", "pool", "namespace", "image", "snap", "device"],
                    [[i, "ecfs", "", r["image"], r["snap"] or "-", r["device"]]
                     for i, r in enumerate(rows)])
    return 0
