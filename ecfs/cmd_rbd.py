"""``ecfs rbd ...``: images, as the ``rbd`` tool handles them.

Here: create, ls, info, rm, rename, resize, export, import, du, status,
lock ls|rm and object-map check|rebuild. Snapshots, clones and image
maintenance are in cmd_rbd_snap, diffs in cmd_rbd_diff, bench in
cmd_rbd_bench.
"""
from __future__ import annotations

import os
import sys
import time

import numpy as np

from backend.errors import InvalidArgument, NotFound
from backend.objectstore import ObjectStore
from rbdlike import directory
from rbdlike.exclusive_lock import break_lock, owner
from rbdlike.image import Image, flush_owner, load_header
from rbdlike.objectmap import ObjectMap
from rbdlike.rbd import RBD, object_map_check, object_map_rebuild

from . import outfile, progress
from .cli import add_json, wants_json
from .output import print_json, print_table
from .units import format_size, parse_size

IO_CHUNK = 4 << 20


def register(sub) -> None:
    p = sub.add_parser("rbd", help="images (like the rbd tool)")
    rs = p.add_subparsers(dest="rbd_cmd", metavar="VERB", parser_class=p.__class__)
    rs.required = True
    q = rs.add_parser("create", help="create an image")
    q.add_argument("name")
    q.add_argument("--size", "-s", required=True, help="size (a bare number is MiB)")
    q.add_argument("--object-size", default=None, help="object size, a power of two 4K..32M "
                                                        "(default: the pool's, from ecfs init)")
    q.add_argument("--image-shared", action="store_true",
                   help="no exclusive lock, no object map: several writers at once")
    q.add_argument("--image-feature", action="append", default=None, metavar="FEATURE",
                   help="feature to enable (repeat or comma-separate)")
    q.set_defaults(func=cmd_create)
    q = rs.add_parser("ls", help="list images")
    q.add_argument("-l", "--long", action="store_true", help="with size and lock")
    add_json(q)
    q.set_defaults(func=cmd_ls)
    q = rs.add_parser("info", help="show an image's (or a snapshot's) header")
    q.add_argument("name", metavar="NAME[@SNAP]")
    add_json(q)
    q.set_defaults(func=cmd_info)
    q = rs.add_parser("rm", help="remove an image and its data")
    q.add_argument("name")
    q.set_defaults(func=cmd_rm)
    q = rs.add_parser("rename", help="rename an image")
    q.add_argument("old")
    q.add_argument("new")
    q.set_defaults(func=cmd_rename)
    q = rs.add_parser("resize", help="grow or (with --allow-shrink) shrink an image")
    q.add_argument("name")
    q.add_argument("--size", "-s", required=True, help="new size (a bare number is MiB)")
    q.add_argument("--allow-shrink", action="store_true", help="allow making it smaller")
    q.set_defaults(func=cmd_resize)
    q = rs.add_parser("export", help="write an image's (or a snapshot's) bytes to FILE "
                                     "(or - for stdout)")
    q.add_argument("name", metavar="NAME[@SNAP]")
    q.add_argument("file")
    q.set_defaults(func=cmd_export)
    q = rs.add_parser("import", help="create image NAME from FILE (or - for stdin), sparse")
    q.add_argument("file")
    q.add_argument("name")
    q.add_argument("--object-size", default=None, help="object size, a power of two 4K..32M "
                                                        "(default: the pool's, from ecfs init)")
    q.add_argument("--image-shared", action="store_true", help="import as a shared image")
    q.set_defaults(func=cmd_import)
    q = rs.add_parser("du", help="provisioned and used space, from the object maps")
    q.add_argument("name", nargs="?")
    add_json(q)
    q.set_defaults(func=cmd_du)
    q = rs.add_parser("status", help="an image's watchers and lock owner")
    q.add_argument("name")
    add_json(q)
    q.set_defaults(func=cmd_status)
    q = rs.add_parser("lock", help="the exclusive lock: ls | rm")
    ls = q.add_subparsers(dest="lock_cmd", metavar="ls|rm", parser_class=p.__class__)
    ls.required = True
    r = ls.add_parser("ls", help="show the lock owner")
    r.add_argument("name")
    add_json(r)
    r.set_defaults(func=cmd_lock_ls)
    r = ls.add_parser("rm", help="break the lock and fence its owner")
    r.add_argument("name")
    r.add_argument("rest", nargs="*", help=argparse_suppress())
    r.set_defaults(func=cmd_lock_rm)
    q = rs.add_parser("object-map", help="the object map: check | rebuild")
    os_ = q.add_subparsers(dest="om_cmd", metavar="check|rebuild", parser_class=p.__class__)
    os_.required = True
    r = os_.add_parser("check", help="compare the map with the objects")
    r.add_argument("name")
    r.set_defaults(func=cmd_om_check)
    r = os_.add_parser("rebuild", help="regenerate the map from the objects")
    r.add_argument("name")
    r.set_defaults(func=cmd_om_rebuild)
    from . import cmd_rbd_bench, cmd_rbd_diff, cmd_rbd_map, cmd_rbd_snap
    cmd_rbd_snap.register(rs, p.__class__)
    cmd_rbd_diff.register(rs, p.__class__)
    cmd_rbd_map.register(rs, p.__class__)
    cmd_rbd_bench.register(rs, p.__class__)


def argparse_suppress():
    import argparse
    return argparse.SUPPRESS


def open_store(args) -> ObjectStore:
    return ObjectStore(args.store)


def _size(text: str) -> int:
    return parse_size(text, default_unit="M", what="size")


def _object_size(text: str | None) -> int | None:
    """--object-size, or None when not given (the pool's default applies;
    an empty value is not 'not given')."""
    return None if text is None else parse_size(text, what="object size")


def split_features(values) -> list[str] | None:
    """--image-feature values (repeated and/or comma-separated) as a list;
    None when none were given (the defaults apply)."""
    if not values:
        return None
    out = []
    for f in values:
        names = [x.strip() for x in f.split(",")]
        if "" in names:     # a stray comma is a typo, never "no feature"
            raise InvalidArgument(f"empty feature name in {f!r} (give FEATURE[,FEATURE...])")
        out += names
    return out


def cmd_create(args) -> int:
    size = _size(args.size)
    osz = _object_size(args.object_size)
    with open_store(args) as s:
        RBD().create(s, args.name, size, object_size=osz, features=split_features(args.image_feature),
                     shared=args.image_shared)
    return 0


def cmd_ls(args) -> int:
    from rbdlike.layering import parent_name
    with open_store(args) as s:
        names = RBD().list(s)
        if not args.long and not wants_json(args):
            for n in names:
                print(n)
            return 0
        rows = []
        for n in names:
            image_id = directory.lookup(s, n)
            h = load_header(s, image_id, n)
            o = owner(s, image_id)
            par = None if h.parent is None else f"{parent_name(s, h.parent)}@{h.parent.snap_name}"
            rows.append({"image": n, "id": image_id, "size": h.size, "format": 2,
                         "parent": par, "lock_type": "exclusive" if o else ""})
            if args.long:
                for sn in sorted(h.snapshots, key=lambda x: x.id):
                    sp = None if sn.parent is None else \
                        f"{parent_name(s, sn.parent)}@{sn.parent.snap_name}"
                    rows.append({"image": n, "id": image_id, "snapshot": sn.name,
                                 "snapshot_id": sn.id, "size": sn.size, "format": 2,
                                 "parent": sp, "protected": "true" if sn.protected else "false"})
    if wants_json(args):
        out = []
        for r in rows:
            d = {k: v for k, v in r.items() if v is not None and k != "parent"}
            if r.get("parent"):
                pi, _, ps = r["parent"].partition("@")
                d["parent"] = {"pool": "ecfs", "image": pi, "snapshot": ps}
            out.append(d)
        print_json(out if args.long else [r["image"] for r in rows])
    else:
        print_table(["NAME", "SIZE", "PARENT", "FMT", "PROT", "LOCK"],
                    [[r["image"] + (f"@{r['snapshot']}" if "snapshot" in r else ""),
                      format_size(r["size"]), r.get("parent") or "", 2,
                      ("yes" if r["protected"] == "true" else "") if "snapshot" in r else "",
                      "excl" if r.get("lock_type") else ""] for r in rows])
    return 0


def cmd_info(args) -> int:
    from rbdlike.layering import children, parent_name
    from .cmd_rbd_snap import image_spec
    name, snap = image_spec(args.name)
    with open_store(args) as s:
        image_id = directory.lookup(s, name)
        h = load_header(s, image_id, name)
        sn = h.snap(snap) if snap is not None else None
        size = sn.size if sn else h.size
        nobj = -(-size // h.object_size)
        m = ObjectMap(s, image_id, sn.id if sn else None)
        present = None
        flags = []
        if h.has("object-map"):
            if m.load(nobj) and not (h.object_map_invalid and not sn):
                present = m.count()
            else:               # as rbd info says it
                flags = ["object map invalid"] + \
                    (["fast diff invalid"] if h.has("fast-diff") else [])
        o = owner(s, image_id)
        par = sn.parent if sn else h.parent
        pname = parent_name(s, par) if par else None
        kids = children(s, image_id, sn.id) if sn else []
    info = {"name": h.name, "id": h.id, "size": size, "objects": nobj,
            "order": h.object_size.bit_length() - 1, "object_size": h.object_size,
            "block_name_prefix": f"rbd_data.{h.id}", "format": 2,
            "features": h.features, "flags": flags,
            "snapshot_count": len(h.snapshots), "objects_present": present,
            "create_timestamp": time.ctime(h.created),
            "access_timestamp": time.ctime(h.attrs.get("atime_ns", h.attrs.get(
                "mtime_ns", h.created * 1e9)) / 1e9),
            "modify_timestamp": time.ctime(h.attrs.get("mtime_ns", h.created * 1e9) / 1e9),
            "parent": None if par is None else
            {"pool": "ecfs", "image": pname, "snapshot": par.snap_name, "overlap": par.overlap},
            "lock_owner": None if o is None else {"pid": o.pid, "host": o.host,
                                                  "cookie": o.cookie, "epoch": o.epoch}}
    if sn is not None:
        info["protected"] = "true" if sn.protected else "false"
        info["snapshot"] = sn.name
    if wants_json(args):
        print_json(info)
        return 0
    print(f"rbd image '{h.name}':")
    print(f"\tsize {format_size(size)} in {nobj} objects")
    print(f"\torder {info['order']} ({format_size(h.object_size)} objects)")
    print(f"\tsnapshot_count: {len(h.snapshots)}")
    print(f"\tid: {h.id}")
    print(f"\tblock_name_prefix: rbd_data.{h.id}")
    print("\tformat: 2")
    print(f"\tfeatures: {', '.join(h.features)}")
    print(f"\tflags: {', '.join(info['flags'])}")
    print(f"\tcreate_timestamp: {info['create_timestamp']}")
    print(f"\taccess_timestamp: {info['access_timestamp']}")
    print(f"\tmodify_timestamp: {info['modify_timestamp']}")
    if sn is not None:
        print(f"\tprotected: {'True' if sn.protected else 'False'}")
        if kids:
            print(f"\tchildren: {', '.join(kids)}")
    print(f"\tobjects: {present if present is not None else 'unknown (no valid object map)'}")
    if par is not None:
        print(f"\tparent: {pname}@{par.snap_name}")
        print(f"\toverlap: {format_size(par.overlap)}")
    print(f"\tlock owner: {'none' if o is None else f'pid {o.pid} on {o.host} (epoch {o.epoch})'}")
    return 0


def cmd_rm(args) -> int:
    with open_store(args) as s:
        with progress.bar(args, total=None, desc="Removing image", unit="obj") as bar:
            RBD().remove(s, args.name, progress=lambda done, total: bar.update(1))
    return 0


def cmd_rename(args) -> int:
    with open_store(args) as s:
        RBD().rename(s, args.old, args.new)
    return 0


def cmd_resize(args) -> int:
    size = _size(args.size)
    with open_store(args) as s:
        with Image(s, args.name) as img:
            with progress.bar(args, total=None, desc="Resizing image", unit="obj") as bar:
                img.resize(size, allow_shrink=args.allow_shrink,
                           progress=lambda done, total: bar.update(1))
    return 0


def cmd_export(args) -> int:
    out_path = None if args.file == "-" else args.file
    in_place = out_path is not None and _check_output(out_path)
    from .cmd_rbd_snap import image_spec
    name, snap = image_spec(args.name)
    # a new file is written sparse; stdout, a device or a FIFO as a stream
    sparse = out_path is not None and not in_place
    with open_store(args) as s:
        with Image(s, name, snapshot=snap, read_only=True) as img:
            size = img.size()
            with progress.bar(args, total=size, desc="Exporting image") as bar, \
                    outfile.output(out_path, in_place) as out:
                pos = 0
                while pos < size:
                    n = min(IO_CHUNK, size - pos)
                    buf = img.read(pos, n)
                    if sparse:
                        _write_sparse(out, pos, buf)
                    else:
                        out.write(buf)
                    pos += n
                    bar.update(n)
                if sparse:
                    out.truncate(size)
    return 0


def cmd_import(args) -> int:
    osz = _object_size(args.object_size)
    if args.file == "-":
        src, size = sys.stdin.buffer, None
    else:
        try:
            src = open(args.file, "rb")
        except OSError as e:
            raise InvalidArgument(f"cannot open {args.file}: {e.strerror}")
        size = os.fstat(src.fileno()).st_size
    with open_store(args) as s:
        if size is None:
            # stdin: spool, since the image size must be known up front
            import tempfile
            spool = tempfile.TemporaryFile()
            while True:
                b = src.read(IO_CHUNK)
                if not b:
                    break
                spool.write(b)
            size = spool.tell()
            spool.seek(0)
            src = spool
        RBD().create(s, args.name, size, object_size=osz, shared=args.image_shared)
        ok = False
        bar = progress.bar(args, total=size, desc="Importing image")
        try:
            with Image(s, args.name) as img:
                pos = 0
                osz = img.header.object_size      # given, or the pool's default
                while pos < size:
                    n = min(osz - pos % osz, size - pos)
                    buf = src.read(n)
                    if len(buf) < n:
                        raise InvalidArgument(f"{args.file}: shorter than expected")
                    if np.frombuffer(buf, np.uint8).any():   # all-zero runs are skipped, as rbd does
                        img.write(buf, pos)
                    pos += n
                    bar.update(n)
            ok = True
        finally:
            bar.close()
            if not ok:
                try:
                    RBD().remove(s, args.name)
                except Exception:
                    pass
    return 0


def cmd_du(args) -> int:
    rows = []
    with open_store(args) as s:
        names = [args.name] if args.name else RBD().list(s)
        for n in names:
            rows += _du_rows(s, n)
    heads = [r for r in rows if "snapshot" not in r]
    total_prov = sum(r["provisioned_size"] for r in heads)
    total_used = sum(r["used_size"] for r in rows)
    if wants_json(args):
        print_json({"images": rows, "total_provisioned_size": total_prov,
                    "total_used_size": total_used})
        return 0
    print_table(["NAME", "PROVISIONED", "USED"],
                [[r["name"] + (f"@{r['snapshot']}" if "snapshot" in r else ""),
                  format_size(r["provisioned_size"]), format_size(r["used_size"])]
                 for r in rows] +
                ([["<TOTAL>", format_size(total_prov), format_size(total_used)]]
                 if len(rows) > 1 else []))
    return 0


def _du_rows(s, name: str) -> list[dict]:
    """rbd du's rows for one image: each snapshot, then the head. With
    fast-diff maps, a snapshot's (or the head's) used space is what changed
    since the snapshot before it, from the maps alone (no data I/O)."""
    from rbdlike.objectmap import EXISTS, NONEXISTENT
    image_id = directory.lookup(s, name)
    flush_owner(s, image_id)        # a mount's cached writes count too
    h = load_header(s, image_id, name)
    osz = h.object_size
    snaps = sorted(h.snapshots, key=lambda x: x.id)
    points = [(sn, ObjectMap(s, image_id, sn.id), sn.size) for sn in snaps]
    points.append((None, ObjectMap(s, image_id), h.size))
    # a snapshot half taken (rbdlike.diff.changed_objects): the head map's
    # marks say nothing until the next writer finishes it
    ok = h.has("object-map") and not h.object_map_invalid and h.snap_pending is None and \
        all(m.load(-(-size // osz)) for _, m, size in points)
    rows = []
    if ok:
        prev = np.zeros(0, dtype=np.uint8)
        for sn, m, size in points:
            st = m.states
            before = np.zeros(len(st), dtype=np.uint8)
            k = min(len(prev), len(st))
            before[:k] = prev[:k]
            changed = (st != NONEXISTENT) & ((before == NONEXISTENT) | (st == EXISTS))
            used = min(int(np.count_nonzero(changed)) * osz, size)
            row = {"name": name, "provisioned_size": size, "used_size": used}
            if sn is not None:
                row = {"name": name, "snapshot": sn.name, "snapshot_id": sn.id,
                       "provisioned_size": size, "used_size": used}
            rows.append(row)
            prev = st
        return rows
    used = sum(s.stat(x).size for x in s.list(f"rbd_data.{image_id}.")
               if len(x) == len(f"rbd_data.{image_id}.") + 16)
    return [{"name": name, "provisioned_size": h.size, "used_size": min(used, h.size)}]


def cmd_status(args) -> int:
    from rbdlike.notify import watchers
    with open_store(args) as s:
        image_id = directory.lookup(s, args.name)
        o = owner(s, image_id)
        ws = watchers(s, image_id)
    rows = [{"address": w["address"], "pid": w["pid"], "host": w["host"], "cookie": w["cookie"],
             "lock_owner": o is not None and o.address == w["address"]} for w in ws]
    if wants_json(args):
        print_json({"watchers": rows,
                    "lock_owner": None if o is None else
                    {"pid": o.pid, "host": o.host, "cookie": o.cookie,
                     "exclusive": o.exclusive, "epoch": o.epoch}})
        return 0
    if not rows:
        print("Watchers: none")
    else:
        print("Watchers:")
        for r in rows:
            tag = " (lock owner)" if r["lock_owner"] else ""
            print(f"\twatcher=pid {r['pid']} on {r['host']} cookie={r['cookie']}{tag}")
    return 0


def cmd_lock_ls(args) -> int:
    with open_store(args) as s:
        image_id = directory.lookup(s, args.name)
        o = owner(s, image_id)
    if wants_json(args):
        print_json([] if o is None else [{"id": f"auto {o.cookie}", "locker": f"pid.{o.pid}",
                                          "address": o.host, "epoch": o.epoch}])
        return 0
    if o is None:
        return 0
    print("There is 1 exclusive lock on this image.")
    print_table(["Locker", "ID", "Address"], [[f"pid.{o.pid}", f"auto {o.cookie}", o.host]])
    return 0


def cmd_lock_rm(args) -> int:
    with open_store(args) as s:
        image_id = directory.lookup(s, args.name)
        if owner(s, image_id) is None:
            raise NotFound(f"image {args.name!r} is not locked")
        break_lock(s, image_id)
    return 0


def cmd_om_check(args) -> int:
    with open_store(args) as s:
        problems = object_map_check(s, args.name)
    for p in problems:
        print(p)
    if problems:
        from backend.errors import Inconsistent
        raise Inconsistent(f"object map of {args.name!r}: {len(problems)} problem(s); "
                           f"run 'ecfs rbd object-map rebuild {args.name}'")
    return 0


def cmd_om_rebuild(args) -> int:
    with open_store(args) as s:
        n = object_map_rebuild(s, args.name)
    print(f"object map rebuilt: {n} objects present")
    return 0


SPARSE_BLOCK = 64 << 10


def _write_sparse(out, pos: int, buf: bytes) -> None:
    """Write ``buf`` at ``pos`` leaving all-zero 64 KiB blocks as holes."""
    a = np.frombuffer(buf, np.uint8)
    nblk = -(-len(a) // SPARSE_BLOCK)
    padded = np.zeros(nblk * SPARSE_BLOCK, np.uint8)
    padded[:len(a)] = a
    nz = padded.reshape(nblk, SPARSE_BLOCK).any(axis=1)
    edges = np.flatnonzero(np.diff(nz.astype(np.int8))) + 1
    bounds = [0, *edges.tolist(), nblk]
    for b0, b1 in zip(bounds, bounds[1:]):
        if nz[b0]:
            lo, hi = b0 * SPARSE_BLOCK, min(b1 * SPARSE_BLOCK, len(a))
            out.seek(pos + lo)
            out.write(buf[lo:hi])


def _check_output(path: str) -> bool:
    """Check an output path as rbd does (an existing file is not
    overwritten); True when it is a device or FIFO, written in place."""
    import stat as _stat
    if os.path.isdir(path):
        raise InvalidArgument(f"{path} is a directory")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise InvalidArgument(f"cannot write {path}: no such directory {parent}")
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    if _stat.S_ISREG(st.st_mode):
        from backend.errors import Exists
        raise Exists(f"{path} already exists (rbd does not overwrite it either)")
    return True
