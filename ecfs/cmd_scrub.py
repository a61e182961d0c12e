"""``ecfs scrub [--deep|--full] [IMAGE]`` and ``ecfs repair [IMAGE]``:
consistency checks over the store's objects, or over one image's (its
header, object maps, data objects and its snapshots' clones), with the
culprit named: object, stripe, shard, ``osd.N``, what is wrong
(backend/scrub.py). Exit status 0 when clean, 4 while inconsistencies
remain. Each object is checked under its full lock, so a mount writing the
image meanwhile waits for it instead of racing it."""
from __future__ import annotations

from backend.errors import DataUnavailable, Inconsistent, NotFound
from backend.objectstore import ObjectStore
from backend.scrub import repair_object, scrub_names

from . import progress
from .cli import add_json, wants_json
from .output import print_json


def register(sub) -> None:
    p = sub.add_parser("scrub", help="check objects for inconsistencies (light, --deep, --full)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--deep", action="store_true",
                   help="also read every page: checksums, and stripes by XOR summaries")
    g.add_argument("--full", action="store_true",
                   help="also re-encode every stripe and compare byte for byte")
    p.add_argument("image", nargs="?", help="only this image's objects")
    add_json(p)
    p.set_defaults(func=cmd_scrub)
    p = sub.add_parser("repair", help="rewrite what a deep scrub finds at fault")
    p.add_argument("image", nargs="?", help="only this image's objects")
    add_json(p)
    p.set_defaults(func=cmd_repair)


def _names(store, image: str | None) -> list[str]:
    if image is None:
        return store.list()
    from rbdlike import directory
    image_id = directory.lookup(store, image)
    names = set()
    for prefix in (f"rbd_header.{image_id}", f"rbd_object_map.{image_id}",
                   f"rbd_data.{image_id}."):
        names.update(n for n in store.list(prefix)
                     if n == prefix or n.startswith(prefix if prefix.endswith(".") else prefix + "."))
    return sorted(names)


def _scrub(args, store, names, level: str, desc: str):
    with progress.bar(args, total=len(names), desc=desc, unit="obj") as bar:
        return scrub_names(store, names, level, progress=lambda done, total: bar.update(1))


def _summary(reports) -> tuple[dict, list]:
    probs = [p for r in reports for p in r.problems]
    return {"objects": len(reports), "stripes": sum(r.stripes for r in reports),
            "unchecked_stripes": sum(r.unchecked_stripes for r in reports),
            "inconsistencies": [p.as_dict() for p in probs],
            "inconsistent_objects": len({p.object for p in probs}), "clean": not probs}, probs


def _print_summary(what: str, s: dict) -> None:
    n = len(s["inconsistencies"])
    tail = "clean" if not n else \
        f"{n} inconsistenc{'y' if n == 1 else 'ies'} in {s['inconsistent_objects']} " \
        f"object{'s' if s['inconsistent_objects'] != 1 else ''}"
    extra = f" ({s['unchecked_stripes']} with too few shards readable to compare)" \
        if s["unchecked_stripes"] else ""
    print(f"{what}: {s['objects']} objects, {s['stripes']} stripes{extra}: {tail}")


def cmd_scrub(args) -> int:
    level = "full" if args.full else "deep" if args.deep else "light"
    with ObjectStore(args.store) as store:
        names = _names(store, args.image)
        reports = _scrub(args, store, names, level, f"scrub ({level})")
    s, probs = _summary(reports)
    if wants_json(args):
        print_json({"level": level, **s})
    else:
        for p in probs:
            print(p.line())
        _print_summary(f"scrub ({level})", s)
    if not s["clean"]:
        n = len(s["inconsistencies"])
        raise Inconsistent(f"{n} inconsistenc{'y' if n == 1 else 'ies'} found "
                           f"(run 'ecfs repair{' ' + args.image if args.image else ''}')")
    return 0


def cmd_repair(args) -> int:
    with ObjectStore(args.store) as store:
        names = _names(store, args.image)
        found, fixed = [], []
        with progress.bar(args, total=len(names), desc="repair", unit="obj") as bar:
            for name in names:
                bar.update(1)
                try:
                    rep, done = repair_object(store, name)
                except NotFound:
                    continue              # removed meanwhile
                except DataUnavailable:
                    continue              # reported by the check that follows
                found += rep.problems
                fixed += done
        after, left = _summary(_scrub(args, store, names, "deep", "verify (deep)"))
    if wants_json(args):
        print_json({"found": [p.as_dict() for p in found], "repaired": [p.as_dict() for p in fixed],
                    "after": after})
    else:
        for p in fixed:
            print(f"repaired: {p.line()}")
        for p in left:
            print(f"remains: {p.line()}")
        _print_summary("after repair (deep)", after)
    if not after["clean"]:
        n = len(after["inconsistencies"])
        raise Inconsistent(f"{n} inconsistenc{'y' if n == 1 else 'ies'} remain after repair")
    return 0
