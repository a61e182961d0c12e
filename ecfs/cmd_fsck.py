"""``ecfs fsck [--repair]``: an offline check of the whole store, as e2fsck
is of a file system: the pool config, the OSD map and every OSD directory,
the journal, the missed-writes logs and interrupted backfills, every
object's shards (scrub's light checks), the image directory, each image's
header and object map against its objects, and objects no image owns.

Offline: it refuses a store another process has open (a mount, a running
command), since it may rewrite maps and remove orphans. ``--repair`` fixes
what it safely can (shard files rebuilt as ``ecfs repair`` does, object maps
rebuilt, orphaned objects of images that are gone removed) and says what it
did; what it cannot fix is said with the command that can. Exit status 0
when clean (after repair), 4 otherwise.
"""
from __future__ import annotations

import os
import re

from backend.errors import Busy, EcfsError, Inconsistent
from backend.objectstore import ObjectStore
from backend.rebalance import (drop_unswitched_add, finish_rm, rebalance_state,
                               remove_misplaced, state_clear)
from backend.scrub import repair_object, scrub_names

from . import progress
from .cli import add_json, wants_json
from .output import print_json

IMAGE_PREFIXES = ("rbd_header.", "rbd_object_map.", "rbd_data.")
_IMAGE_ID = re.compile(r"[0-9a-f]{12}", re.ASCII)      # rbdlike.rbd: uuid4().hex[:12]


def register(sub) -> None:
    p = sub.add_parser("fsck", help="offline check of the whole store (--repair fixes)")
    p.add_argument("--repair", action="store_true", help="fix what can be fixed safely")
    add_json(p)
    p.set_defaults(func=cmd_fsck)


class _Findings:
    def __init__(self):
        self.items: list[dict] = []

    def add(self, area: str, what: str, fixed: str = "", hint: str = "") -> None:
        self.items.append({"area": area, "what": what, "fixed": fixed, "hint": hint})

    @property
    def open(self) -> list[dict]:
        return [i for i in self.items if not i["fixed"]]


def _open_alone(store_dir: str) -> ObjectStore:
    """The store, with every other opener kept out until fsck ends (a check
    then an open would let a mount in between)."""
    try:
        return ObjectStore(store_dir, alone=True)    # alone: the journal is replayed on open
    except Busy as e:
        raise Busy(f"{e}: fsck runs offline; 'ecfs umount' first, or use 'ecfs scrub' "
                   f"online") from None


def cmd_fsck(args) -> int:
    f = _Findings()
    with _open_alone(args.store) as store:
        _check_osds(store, f, args.repair)
        _check_journal(store, f)
        names = store.list()
        _check_objects(args, store, names, f)
        _check_images(store, names, f, args.repair)
    if wants_json(args):
        print_json({"clean": not f.open, "findings": f.items})
    else:
        for i in f.items:
            line = f"{i['area']}: {i['what']}"
            if i["fixed"]:
                line += f" -- fixed: {i['fixed']}"
            elif i["hint"]:
                line += f" ({i['hint']})"
            print(line)
        n = len(f.open)
        print(f"fsck: {len(names)} objects: " + (
            "clean" if not f.items else f"{len(f.items) - n} fixed, {n} left" if n
            else f"{len(f.items)} fixed, clean"))
    if f.open:
        n = len(f.open)
        raise Inconsistent(f"{n} problem{'s' if n != 1 else ''} left"
                           + ("" if args.repair else " (see 'ecfs fsck --repair')"))
    return 0


def _check_osds(store, f: _Findings, repair: bool) -> None:
    behind = store.missed.behind()
    for osd, st in sorted(store.osdmap.states.items()):
        if not st.up and osd not in behind:
            f.add(f"osd.{osd}", f"down: {st.reason}",
                  hint=f"bring it back and 'ecfs osd up {osd}', or 'ecfs osd replace {osd}'")
    for osd in sorted(behind):
        f.add(f"osd.{osd}", f"behind: {store.missed.pending(osd)} objects missed writes",
              hint=f"'ecfs osd up {osd}' rebuilds them")
    root = os.path.join(store.store, "backfill")
    for e in sorted(os.listdir(root)) if os.path.isdir(root) else []:
        if e.startswith("osd.") and e[4:].isdigit():      # beside it: osd.N.total
            f.add(e, "a backfill was interrupted", hint=f"'ecfs osd rebuild {e[4:]}' goes on")
    r = rebalance_state(store.store)
    if r and not r["running"]:
        what = (f"an 'osd add' (of osd.{r['osd']})" if r["op"] == "add"
                else f"an 'osd rm {r['osd']}'") + f" was interrupted ({r.get('phase', '')})"
        if repair:
            if r["op"] == "add":
                fixed = (f"finished: osd.{r['osd']} is in the pool"
                         if drop_unswitched_add(store, r) else
                         "what it copied dropped; the pool is as it was before it")
            else:
                fixed = "finished" if finish_rm(store, r["osd"]) else \
                    "what it copied dropped; the pool is as it was before it"
            state_clear(store.store)
            f.add("OSDs", what, fixed=fixed)
        else:
            f.add("OSDs", what, hint=r["next"])
    n = remove_misplaced(store, dry_run=True)
    if n:
        what = (f"{n} shard files lie where placement puts no shard (copies left by an "
                f"interrupted 'osd add' or 'osd rm')")
        if repair:
            f.add("OSDs", what, fixed=f"{remove_misplaced(store)} removed")
        else:
            f.add("OSDs", what, hint="'ecfs fsck --repair' removes them")


def _check_journal(store, f: _Findings) -> None:
    c = store.counters.snapshot()
    if c["journal_damaged"]:
        f.add("journal", f"{c['journal_damaged']} objects held newer data than the journal's "
                         f"records of them (records lost); left as their shards have them",
              fixed="nothing rolled back")
    if c["journal_skipped"]:
        f.add("journal", f"{c['journal_skipped']} unreadable spans skipped at replay",
              fixed="replayed around them")


def _check_objects(args, store, names: list[str], f: _Findings) -> None:
    level = "deep"       # offline: every page is read (what --repair would fix, it reports)
    with progress.bar(args, total=len(names), desc="fsck objects", unit="obj") as bar:
        reports = scrub_names(store, names, level, progress=lambda d, t: bar.update(1))
    for r in reports:
        if not r.problems:
            continue
        if args.repair:
            try:
                repair_object(store, r.name)
            except EcfsError as e:
                f.add(f"object {r.name!r}", f"repair failed: {e}")
            after = scrub_names(store, [r.name], "deep")
            clean = not any(x.problems for x in after)
            for p in r.problems:
                f.add(f"object {r.name!r}", p.line().split(": ", 1)[1],
                      fixed="rebuilt from the other shards" if clean else "")
        else:
            for p in r.problems:
                f.add(f"object {r.name!r}", p.line().split(": ", 1)[1],
                      hint="'ecfs repair' or 'ecfs fsck --repair'")


def _check_images(store, names: list[str], f: _Findings, repair: bool) -> None:
    from rbdlike import directory
    from rbdlike.image import load_header
    from rbdlike.rbd import object_map_check, object_map_rebuild
    try:
        images = directory.load(store)
    except EcfsError as e:
        f.add("image directory", str(e), hint="images cannot be listed until it is restored")
        return
    ids = set(images.values())
    for name, image_id in sorted(images.items()):
        try:
            hdr = load_header(store, image_id, name)
        except EcfsError as e:
            f.add(f"image {name!r}", f"header unreadable: {e}")
            continue
        if hdr.has("object-map"):
            try:
                problems = object_map_check(store, name)
            except EcfsError as e:
                problems = [str(e)]
            for p in problems:
                if repair:
                    try:
                        object_map_rebuild(store, name)
                        f.add(f"image {name!r}", p, fixed="object map rebuilt")
                        continue
                    except EcfsError as e:
                        p = f"{p}; rebuild failed: {e}"
                f.add(f"image {name!r}", p, hint=f"'ecfs rbd object-map rebuild {name}'")
    for n in names:
        if not n.startswith(IMAGE_PREFIXES):
            continue
        owner = n.split(".")[1]
        if owner in ids or not _IMAGE_ID.fullmatch(owner):
            continue            # an image's, or a rados object that merely looks alike
        if repair:
            try:
                store.remove(n)
                f.add(f"object {n!r}", "belongs to no image (an image removed, or a create "
                                       "cut short)", fixed="removed")
                continue
            except EcfsError as e:
                f.add(f"object {n!r}", f"belongs to no image; removal failed: {e}")
                continue
        f.add(f"object {n!r}", "belongs to no image (an image removed, or a create cut short)",
              hint="'ecfs fsck --repair' removes it")
