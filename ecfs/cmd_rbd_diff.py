"""``ecfs rbd diff``, ``export-diff``, ``import-diff``: what changed, and
moving it between images in Ceph's ``rbd diff v1`` stream
(docs/format-rbd-diff.md)."""
from __future__ import annotations

import sys

from backend.errors import Exists, InvalidArgument, NotFound
from rbdlike import diffstream
from rbdlike.diff import diff_extents
from rbdlike.header import MAX_IMAGE_SIZE, validate_image_name
from rbdlike.image import Image

from . import outfile, progress
from .cli import add_json, wants_json
from .cmd_rbd import _check_output, open_store
from .cmd_rbd_snap import image_spec
from .output import print_json, print_table


def register(rs, parser_class) -> None:
    q = rs.add_parser("diff", help="extents changed since --from-snap (or allocated)")
    q.add_argument("spec", metavar="NAME[@SNAP]")
    q.add_argument("--from-snap", default=None, metavar="SNAP")
    q.add_argument("--whole-object", action="store_true",
                   help="whole objects, from the object maps alone")
    add_json(q)
    q.set_defaults(func=cmd_diff)
    q = rs.add_parser("export-diff", help="write the changes to FILE (or -) as an rbd diff v1 "
                                          "stream")
    q.add_argument("spec", metavar="NAME[@SNAP]")
    q.add_argument("file")
    q.add_argument("--from-snap", default=None, metavar="SNAP")
    q.add_argument("--whole-object", action="store_true",
                   help="accepted for rbd compatibility; extents are still exact")
    q.set_defaults(func=cmd_export_diff)
    q = rs.add_parser("import-diff", help="apply an rbd diff v1 stream from FILE (or -) to NAME")
    q.add_argument("file")
    q.add_argument("name")
    q.set_defaults(func=cmd_import_diff)


def cmd_diff(args) -> int:
    name, snap = image_spec(args.spec)
    rows = []
    with open_store(args) as s, Image(s, name, snapshot=snap, read_only=True) as img:
        for off, n, exists, _ in diff_extents(img, args.from_snap, 0, img.size(),
                                              whole_object=args.whole_object):
            rows.append((off, n, exists))
    if wants_json(args):
        print_json([{"offset": o, "length": n, "exists": e} for o, n, e in rows])
        return 0
    print_table(["Offset", "Length", "Type"],
                [[o, n, "data" if e else "zero"] for o, n, e in rows])
    return 0


def cmd_export_diff(args) -> int:
    name, snap = image_spec(args.spec)
    out_path = None if args.file == "-" else args.file
    in_place = out_path is not None and _check_output(out_path)
    with open_store(args) as s, Image(s, name, snapshot=snap, read_only=True) as img:
        if args.from_snap is not None:
            img.header.snap(args.from_snap)
        size = img.size()
        header = diffstream.DiffHeader(args.from_snap, snap, size)
        with progress.bar(args, total=size, desc="Exporting image") as bar, \
                outfile.output(out_path, in_place) as out:
            done = 0
            with diffstream.DiffWriter(out, header) as w:
                for off, n, exists, data in diff_extents(img, args.from_snap, 0, size,
                                                         want_data=True):
                    if exists:
                        w.data(off, data)
                    else:
                        w.zero(off, n)
                    bar.update(off + n - done)
                    done = off + n
            bar.update(size - done)
    return 0


def cmd_import_diff(args) -> int:
    if args.file == "-":
        src = diffstream.spool(sys.stdin.buffer)
    else:
        try:
            src = open(args.file, "rb")
        except OSError as e:
            raise InvalidArgument(f"cannot open {args.file}: {e.strerror}")
    with src:
        # the whole stream is checked before anything is applied
        summary = diffstream.validate(src, max_size=MAX_IMAGE_SIZE, want_extents=False)
        h = summary.header
        if h.to_snap is not None:
            validate_image_name(h.to_snap, "end snapshot")
        with open_store(args) as s, Image(s, args.name) as img:
            if img.header.snap_pending:
                # a snapshot half taken (an import-diff or snap create killed
                # in it): it exists, and the lock's next taker finishes it;
                # take the lock now, so that the names below include it
                img.acquire_lock()
            names = {x.name for x in img.header.snapshots}
            if h.from_snap is not None and h.from_snap not in names:
                raise NotFound(f"start snapshot {h.from_snap!r} does not exist in the image "
                               f"{args.name!r}")
            if h.to_snap is not None and h.to_snap in names:
                raise Exists(f"end snapshot {h.to_snap!r} already exists in the image "
                             f"{args.name!r}")
            if h.size != img.size():
                img.resize(h.size)
            total = summary.data_bytes + summary.zero_bytes
            with progress.bar(args, total=total, desc="Importing image diff") as bar:
                for ev in diffstream.records(src):
                    if ev[0] == "w":
                        img.write(ev[2], ev[1])
                        bar.update(len(ev[2]))
                    else:
                        img.discard(ev[1], ev[2])
                        bar.update(ev[2])
            if h.to_snap is not None:
                img.create_snap(h.to_snap)
    return 0
