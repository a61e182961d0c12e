"""``ecfs init``, ``ecfs status``, ``ecfs osd ...``: the pool."""
from __future__ import annotations

import os

from backend import counters
from backend.errors import InvalidArgument, NotFound
from backend.objectstore import ObjectStore, amplification
from backend.locks import maintenance
from backend.osdmap import OsdMap
from backend.space import full_osds
from backend.pool import WRITE_MODES, create_store, load_pool
from rbdlike.header import validate_object_size as validate_image_object_size

from . import progress
from .cli import add_json, wants_json
from .output import print_json, print_table
from .units import format_size, int_option, parse_int, parse_size


def register(sub) -> None:
    p = sub.add_parser("init", help="create a store")
    p.add_argument("--k", type=int_option("--k"), default=4, help="data chunks per stripe (default 4)")
    p.add_argument("--m", type=int_option("--m"), default=2, help="parity chunks per stripe (default 2)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--osds", type=int_option("--osds"), default=None,
                   help="number of OSD directories STORE/osd.N (default K+M)")
    g.add_argument("--osd-dir", nargs="+", action="extend", default=None, metavar="PATH",
                   help="OSD directories, one per OSD (each may be on its own disk)")
    p.add_argument("--plugin", default="isa_l_rs_vand",
                   help="erasure code plugin (isa_l_rs_vand, liberasurecode_rs_vand, isa_l_rs_cauchy)")
    p.add_argument("--chunk-size", default="auto", help="auto, or 4K..1M in 4K steps")
    p.add_argument("--object-size", default="4M",
                   help="default object size of new images, a power of two 4K..32M (4M)")
    p.add_argument("--write-mode", default="auto", choices=WRITE_MODES,
                   help="parity update policy (default auto)")
    p.add_argument("--min-size", type=int_option("--min-size"), default=None,
                   help="shards a write must reach, K..K+M (default K+1, as Ceph's min_size); "
                        "below it writes fail and nothing written is lost")
    p.set_defaults(func=cmd_init)

    p = sub.add_parser("status", help="health, pool, OSDs, data and I/O, as ceph -s")
    p.add_argument("--verbose", "-v", action="store_true",
                   help="also the OSD table and every I/O counter")
    add_json(p)
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("osd", help="OSD directories")
    osub = p.add_subparsers(dest="osd_cmd", metavar="ls|down|up|rebuild|replace|add|rm",
                            parser_class=p.__class__)
    osub.required = True
    q = osub.add_parser("ls", help="list OSDs")
    add_json(q)
    q.set_defaults(func=cmd_osd_ls)
    q = osub.add_parser("down", help="mark an OSD down")
    q.add_argument("id", type=_osd_id)
    q.set_defaults(func=cmd_osd_down)
    q = osub.add_parser("up", help="mark an OSD up again")
    q.add_argument("id", type=_osd_id)
    q.set_defaults(func=cmd_osd_up)
    q = osub.add_parser("rebuild", help="rebuild every shard an OSD should hold (online, "
                                         "resumable)")
    q.add_argument("id", type=_osd_id)
    q.add_argument("--max-rate", default=None, metavar="BYTES",
                   help="shard bytes written per second at most (e.g. 64M)")
    q.set_defaults(func=cmd_osd_rebuild)
    q = osub.add_parser("replace", help="put an OSD on a new (empty) directory and rebuild it")
    q.add_argument("id", type=_osd_id)
    q.add_argument("--dir", default=None, metavar="NEWDIR",
                   help="the new directory (default: the OSD's own path, a new empty disk)")
    q.add_argument("--max-rate", default=None, metavar="BYTES",
                   help="shard bytes written per second at most (e.g. 64M)")
    q.set_defaults(func=cmd_osd_replace)
    q = osub.add_parser("add", help="add an OSD on an empty directory and fill it (online)")
    q.add_argument("--dir", default=None, metavar="DIR",
                   help="the new directory (default: STORE/osd.N, N the next id)")
    q.add_argument("--max-rate", default=None, metavar="BYTES",
                   help="shard bytes copied per second at most (e.g. 64M)")
    q.set_defaults(func=cmd_osd_add)
    q = osub.add_parser("rm", help="drain an OSD onto the others, then remove it (online)")
    q.add_argument("id", type=_osd_id)
    q.add_argument("--max-rate", default=None, metavar="BYTES",
                   help="shard bytes copied per second at most (e.g. 64M)")
    q.set_defaults(func=cmd_osd_rm)


def _osd_id(text: str) -> int:
    t = text[4:] if text.startswith("osd.") else text
    try:
        n = parse_int(t, "OSD id")
    except InvalidArgument:
        n = -1
    if n < 0:
        raise InvalidArgument(f"invalid OSD id {text!r} (use N or osd.N, N in ASCII digits)")
    return n


def cmd_init(args) -> int:
    cs = args.chunk_size
    if cs != "auto":
        cs = parse_size(cs, what="chunk size")
    obj_size = parse_size(args.object_size, what="object size")
    # it is the default of new images only, so it must be one an image can take
    validate_image_object_size(obj_size)
    # The first open makes the store's working files (journal, locks,
    # counters), so that no later command, failed or not, adds files.
    cfg = create_store(args.store, k=args.k, m=args.m, osds=args.osds, osd_dirs=args.osd_dir,
                       plugin=args.plugin, chunk_size=cs, object_size=obj_size,
                       write_mode=args.write_mode, min_size=args.min_size,
                       finish=lambda store: ObjectStore(store).close())
    print(f"created store {os.path.abspath(args.store)}: {cfg.k}+{cfg.m} {cfg.plugin} over "
          f"{len(cfg.osds)} OSDs, chunk size {cfg.chunk_size}, min size {cfg.write_min}")
    return 0


def _osd_rows(store: str, pool, osdmap: OsdMap, usage: bool = True) -> list[dict]:
    full = full_osds({i: p for i, p in osdmap.paths.items() if osdmap.is_up(i)})
    return [{"id": s.id, "path": s.path, "up": s.up,
             "status": ("recovering" if s.recovering else "down") if not s.up
             else full[s.id][0] if s.id in full else "up",
             "full": full.get(s.id, ("",))[0] == "full",
             "reason": s.reason or full.get(s.id, ("", ""))[1],
             "bytes": osdmap.usage(s.id) if usage and s.up else 0}
            for s in sorted(osdmap.states.values(), key=lambda s: s.id)]


def health(pool, osdmap: OsdMap) -> tuple[str, str]:
    down = [s for s in osdmap.states.values() if not s.up]
    full = full_osds({i: p for i, p in osdmap.paths.items() if osdmap.is_up(i)})
    reasons, status = [], "HEALTH_OK"
    if down:
        names = ", ".join(f"osd.{s.id} ({s.reason})" for s in sorted(down, key=lambda s: s.id))
        if len(down) > pool.m:
            status = "HEALTH_ERR"
            reasons.append(f"{len(down)} OSDs down, more than M={pool.m}: data unavailable: {names}")
        else:
            status = "HEALTH_DEGRADED"
            reasons.append(f"{len(down)} OSD{'s' if len(down) > 1 else ''} down: {names}")
            if len(down) > pool.k + pool.m - pool.write_min:
                # as Ceph's PG_AVAILABILITY: below min_size writes stop
                reasons.append(f"writes blocked for objects with a shard on "
                               f"{pool.k + pool.m - pool.write_min + 1} or more of them "
                               f"(min size {pool.write_min}); reads go on")
    for level in ("full", "nearfull"):
        these = {i: why for i, (lv, why) in full.items() if lv == level}
        if not these:
            continue
        names = ", ".join(f"osd.{i} ({why})" for i, why in sorted(these.items()))
        n = f"{len(these)} OSD{'s' if len(these) > 1 else ''}"
        if level == "full":
            # as Ceph's OSD_FULL: an error, since writes stop
            status = "HEALTH_ERR"
            reasons.append(f"{n} full, writes refused (free space on their disks or add "
                           f"OSDs; reads go on): {names}")
        else:
            if status == "HEALTH_OK":
                status = "HEALTH_DEGRADED"
            reasons.append(f"{n} nearly full (free space on their disks or add OSDs): {names}")
    return status, "; ".join(reasons)


def cmd_status(args) -> int:
    st = ObjectStore(args.store, readonly=True)     # reads only, counts nothing
    pool, osdmap = st.pool, st.osdmap
    osds = _osd_rows(args.store, pool, osdmap)
    h, reason = health(pool, osdmap)
    names = st.list()
    nobj, nimg = len(names), sum(1 for n in names if n.startswith("rbd_header."))
    ctr = counters.totals(args.store)
    amp = amplification(ctr)
    free = osdmap.free_bytes()
    usable = sum(f for f, _ in free.values()) * pool.k // (pool.k + pool.m)
    from backend.backfill import under_way
    backfills = [{"osd": osd, "done": done, "total": total,
                  "percent": None if not total else min(100.0, round(100 * done / total, 1))}
                 for osd, (done, total) in sorted(under_way(args.store).items())]
    from backend.rebalance import rebalance_state
    rebalance = rebalance_state(args.store)
    if wants_json(args):
        print_json({
            "store": os.path.abspath(args.store), "fsid": pool.fsid,
            "format_version": pool.format_version,
            "pool": {"k": pool.k, "m": pool.m, "plugin": pool.plugin, "min_size": pool.write_min,
                     "chunk_size": pool.chunk_size, "object_size": pool.object_size,
                     "write_mode": pool.write_mode},
            "health": {"status": h, "reason": reason},
            "osds": osds, "objects": nobj, "images": nimg,
            "usable_bytes": usable, "backfill": backfills, "rebalance": rebalance,
            "counters": ctr, "amplification": amp,
        })
        return 0
    print(f"store:   {os.path.abspath(args.store)} (fsid {pool.fsid})")
    print(f"health:  {h}" + (f": {reason}" if reason else ""))
    print(f"pool:    {pool.k}+{pool.m} {pool.plugin} (min size {pool.write_min}), "
          f"chunk size {pool.chunk_size}, "
          f"object size {format_size(pool.object_size)}, write mode {pool.write_mode}")
    up = sum(1 for o in osds if o["up"])
    nfull = sum(1 for o in osds if o["status"] in ("full", "nearfull"))
    print(f"osds:    {len(osds)} total, {up} up, {len(osds) - up} down"
          + (f", {nfull} full or nearly full" if nfull else ""))
    print(f"data:    {nobj} objects, {nimg} images, usable capacity {format_size(usable)}")
    for b in backfills:
        of = f"{b['done']}/{b['total']} objects ({b['percent']:g}%)" if b["total"] \
            else f"{b['done']} objects done"
        print(f"backfill: osd.{b['osd']} {of}"
              f" (running, or interrupted: 'ecfs osd rebuild {b['osd']}' goes on)")
    if rebalance:
        r = rebalance
        of = f" {r['done']}/{r['total']} objects" if r.get("total") else ""
        print(f"rebalance: osd {r['op']} osd.{r['osd']}: {r.get('phase', '')}{of}"
              + (f" (pid {r['pid']})" if r["running"] else f"; interrupted: {r['next']}"))
    print(f"io:      {ctr['client_read_ops']} reads ({format_size(ctr['client_read_bytes'])}), "
          f"{ctr['client_write_ops']} writes ({format_size(ctr['client_write_bytes'])}); "
          f"{ctr['shard_reads']} shard reads, {ctr['shard_writes']} shard writes, "
          f"{ctr['fsyncs']} fsyncs")
    print(f"         {amp['shard_ios_per_write']:.2f} shard I/Os per write, "
          f"{amp['shard_reads_per_read']:.2f} shard reads per read, "
          f"byte amplification {amp['byte_amplification']:.2f}")
    if ctr["cache_writes"]:
        print(f"cache:   {format_size(ctr['cache_dirty_bytes'])} dirty now; "
              f"{ctr['cache_writes']} writes absorbed, {ctr['cache_flushes']} object flushes, "
              f"{ctr['cache_hits']} read hits, {ctr['cache_waits']} waits for room")
        print(f"         {format_size(ctr['page_cache_bytes'])} of clean pages kept now; "
              f"{ctr['page_hits']} shard reads saved by them")
    if not getattr(args, "verbose", False):
        return 0
    print()
    print_table(["ID", "STATUS", "BYTES", "PATH"],
                [[f"osd.{o['id']}", o["status"] + (f" ({o['reason']})" if o["reason"] else ""),
                  o["bytes"], o["path"]] for o in osds])
    print()
    print("io:")
    for k, v in ctr.items():
        print(f"  {k:22} {v}")
    print("amplification:")
    for k, v in amp.items():
        print(f"  {k:22} {v:.2f}")
    return 0


def cmd_osd_ls(args) -> int:
    pool = load_pool(args.store)
    osdmap = OsdMap(args.store, pool)
    rows = _osd_rows(args.store, pool, osdmap)
    if wants_json(args):
        print_json(rows)
        return 0
    print_table(["ID", "STATUS", "BYTES", "PATH"],
                [[f"osd.{o['id']}", o["status"] + (f" ({o['reason']})" if o["reason"] else ""),
                  o["bytes"], o["path"]] for o in rows])
    return 0


def _check_osd(pool, osd: int) -> None:
    if osd not in {e.id for e in pool.osds}:
        have = ", ".join(f"osd.{e.id}" for e in sorted(pool.osds, key=lambda e: e.id))
        raise NotFound(f"no osd.{osd} in this store (it has {have})")


def cmd_osd_down(args) -> int:
    pool = load_pool(args.store)
    _check_osd(pool, args.id)
    OsdMap(args.store, pool).mark_down(args.id, "marked down")
    print(f"marked down osd.{args.id}")
    return 0


def _rate(args) -> int | None:
    rate = parse_size(args.max_rate, what="rate") if args.max_rate else None
    if rate is not None and rate <= 0:
        raise InvalidArgument("--max-rate must be positive")
    return rate


def cmd_osd_add(args) -> int:
    from backend.rebalance import add_osd
    rate = _rate(args)
    with ObjectStore(args.store) as s:
        with progress.bar(args, total=None, desc="Filling the new OSD", unit="obj") as bar:
            res = add_osd(s, args.dir, rate=rate, progress=lambda done, total: (
                bar.set_total(total), bar.update(1)))
    print(f"added osd.{res.osd}: {_count(res.shards, 'shard')} of "
          f"{_count(res.objects, 'object')} copied to it ({format_size(res.bytes)}), "
          f"{_count(res.misplaced, 'old shard file')} removed from the others; up")
    return 0


def cmd_osd_rm(args) -> int:
    from backend.rebalance import rm_osd
    rate = _rate(args)
    with ObjectStore(args.store) as s:
        with progress.bar(args, total=None, desc=f"Draining osd.{args.id}", unit="obj") as bar:
            res = rm_osd(s, args.id, rate=rate, progress=lambda done, total: (
                bar.set_total(total), bar.update(1)))
    if res.already:
        print(f"osd.{res.osd} is out of the pool already"
              + (f"; finished its removal: {res.emptied} emptied" if res.emptied else ""))
    else:
        print(f"removed osd.{res.osd}: {_count(res.shards, 'shard')} of "
              f"{_count(res.objects, 'object')} copied to the other OSDs "
              f"({format_size(res.bytes)}); {res.emptied} emptied")
    return 0


def _count(n: int, what: str) -> str:
    return f"{n} {what}{'' if n == 1 else 's'}"


def _backfill(args, verb: str) -> int:
    from backend.backfill import rebuild_osd
    rate = _rate(args)
    with ObjectStore(args.store) as s:
        with progress.bar(args, total=None, desc=f"Rebuilding osd.{args.id}", unit="obj") as bar:
            res = rebuild_osd(s, args.id, rate=rate,
                              progress=lambda done, total: (bar.set_total(total), bar.update(1)))
    print(f"osd.{args.id} {verb}: {res.shards} shards of {res.objects} objects rebuilt"
          + (f" ({res.skipped} objects done by an earlier run)" if res.skipped else "")
          + "; marked up")
    return 0


def cmd_osd_rebuild(args) -> int:
    pool = load_pool(args.store)
    _check_osd(pool, args.id)
    return _backfill(args, "rebuilt")


def cmd_osd_replace(args) -> int:
    from backend.backfill import prepare_replacement
    pool = load_pool(args.store)
    _check_osd(pool, args.id)
    prepare_replacement(args.store, args.id, args.dir, check_only=True)   # bad input: no change
    with maintenance(args.store, f"osd replace {args.id}"):
        OsdMap(args.store, pool).mark_down(args.id, "being replaced")
        prepare_replacement(args.store, args.id, args.dir)
        return _backfill(args, "replaced")


def cmd_osd_up(args) -> int:
    """Bring an OSD back: rebuild what it missed while away, then mark it up."""
    from backend.objectstore import ObjectStore
    from backend.recovery import recover_osd
    pool = load_pool(args.store)
    _check_osd(pool, args.id)
    with ObjectStore(args.store) as s:
        pending = s.missed.pending(args.id)
        with progress.bar(args, total=pending or None, desc=f"Recovering osd.{args.id}",
                          unit="obj") as bar:
            res = recover_osd(s, args.id, progress=lambda done, total: bar.update(1))
        st = s.osdmap.states[args.id]
        if not st.up:
            raise InvalidArgument(f"osd.{args.id} stays down: {st.reason}")
    print(f"marked up osd.{args.id}: {res.objects} objects recovered "
          f"({res.rebuilt} shards rebuilt, {res.headers} headers rewritten, "
          f"{res.removed} removed objects cleaned)")
    return 0