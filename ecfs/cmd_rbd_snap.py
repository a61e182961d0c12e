"""``ecfs rbd snap ...``, ``clone``, ``children``, ``flatten``, ``sparsify``,
``feature enable|disable``: snapshots, layering and image maintenance,
spelled as the ``rbd`` tool spells them (``NAME@SNAP``)."""
from __future__ import annotations

import time

from backend.errors import InvalidArgument
from rbdlike import directory
from rbdlike.header import validate_image_name
from rbdlike.image import Image
from rbdlike.rbd import RBD, update_features

from . import progress
from .cli import add_json, wants_json
from .cmd_rbd import open_store, split_features
from .output import print_json, print_table
from .units import format_size


def image_spec(text: str, snap: str = "optional") -> tuple[str, str | None]:
    """Split ``NAME[@SNAP]``; ``snap`` is "optional", "required" or "none"."""
    name, at, sn = text.partition("@")
    validate_image_name(name)
    if at:
        if snap == "none":
            raise InvalidArgument(f"{text!r}: a snapshot is not allowed here (give the image name)")
        validate_image_name(sn, "snapshot")
        return name, sn
    if snap == "required":
        raise InvalidArgument(f"{text!r}: give the snapshot as NAME@SNAP")
    return name, None


def register(rs, parser_class) -> None:
    p = rs.add_parser("snap", help="snapshots: create|ls|rm|rollback|protect|unprotect")
    ss = p.add_subparsers(dest="snap_cmd", metavar="create|ls|rm|rollback|protect|unprotect",
                          parser_class=parser_class)
    ss.required = True
    for verb, helptext, func in (
            ("create", "take a snapshot NAME@SNAP", cmd_snap_create),
            ("rm", "remove snapshot NAME@SNAP", cmd_snap_rm),
            ("rollback", "make the image what it was at NAME@SNAP", cmd_snap_rollback),
            ("protect", "protect NAME@SNAP (needed to clone it)", cmd_snap_protect),
            ("unprotect", "unprotect NAME@SNAP (it must have no clones)", cmd_snap_protect)):
        q = ss.add_parser(verb, help=helptext)
        q.add_argument("spec", metavar="NAME@SNAP")
        q.set_defaults(func=func, protect=verb == "protect")
    q = ss.add_parser("ls", help="list an image's snapshots")
    q.add_argument("name")
    add_json(q)
    q.set_defaults(func=cmd_snap_ls)

    q = rs.add_parser("clone", help="clone the protected snapshot NAME@SNAP as CHILD")
    q.add_argument("spec", metavar="NAME@SNAP")
    q.add_argument("child")
    q.add_argument("--image-feature", action="append", default=None, metavar="FEATURE",
                   help="feature to enable (repeat or comma-separate)")
    q.set_defaults(func=cmd_clone)
    q = rs.add_parser("children", help="list the clones of NAME@SNAP")
    q.add_argument("spec", metavar="NAME@SNAP")
    add_json(q)
    q.set_defaults(func=cmd_children)
    q = rs.add_parser("flatten", help="copy the parent's data into a clone and detach it")
    q.add_argument("name")
    q.set_defaults(func=cmd_flatten)
    q = rs.add_parser("sparsify", help="deallocate all-zero objects and pages")
    q.add_argument("name")
    q.set_defaults(func=cmd_sparsify)
    q = rs.add_parser("feature", help="features: enable|disable NAME FEATURE...")
    fs = q.add_subparsers(dest="feature_cmd", metavar="enable|disable", parser_class=parser_class)
    fs.required = True
    for verb, on in (("enable", True), ("disable", False)):
        r = fs.add_parser(verb, help=f"{verb} features of a closed image")
        r.add_argument("name")
        r.add_argument("features", nargs="+", metavar="FEATURE")
        r.set_defaults(func=cmd_feature, enable=on)


def cmd_snap_create(args) -> int:
    name, snap = image_spec(args.spec, "required")
    with open_store(args) as s, Image(s, name) as img:
        img.create_snap(snap)
    return 0


def cmd_snap_rm(args) -> int:
    name, snap = image_spec(args.spec, "required")
    with open_store(args) as s, Image(s, name) as img:
        img.header.snap(snap)
        with progress.bar(args, total=None, desc="Removing snap", unit="obj") as bar:
            img.remove_snap(snap, progress=lambda done, total: bar.update(1))
    return 0


def cmd_snap_rollback(args) -> int:
    name, snap = image_spec(args.spec, "required")
    with open_store(args) as s, Image(s, name) as img:
        n = -(-img.header.snap(snap).size // img.header.object_size)
        with progress.bar(args, total=n, desc="Rolling back to snapshot", unit="obj") as bar:
            img.rollback_to_snap(snap, progress=lambda done, total: bar.update(1))
    return 0


def cmd_snap_protect(args) -> int:
    """snap protect and snap unprotect."""
    name, snap = image_spec(args.spec, "required")
    with open_store(args) as s, Image(s, name) as img:
        (img.protect_snap if args.protect else img.unprotect_snap)(snap)
    return 0


def cmd_snap_ls(args) -> int:
    name, _ = image_spec(args.name, "none")
    with open_store(args) as s, Image(s, name, read_only=True) as img:
        snaps = img.list_snaps()
    if wants_json(args):
        print_json([{"id": x["id"], "name": x["name"], "size": x["size"],
                     "protected": "true" if x["protected"] else "false",
                     "timestamp": time.ctime(x["timestamp"])} for x in snaps])
        return 0
    if snaps:
        print_table(["SNAPID", "NAME", "SIZE", "PROTECTED", "TIMESTAMP"],
                    [[x["id"], x["name"], format_size(x["size"]),
                      "yes" if x["protected"] else "", time.ctime(x["timestamp"])]
                     for x in snaps])
    return 0


def cmd_clone(args) -> int:
    name, snap = image_spec(args.spec, "required")
    child, _ = image_spec(args.child, "none")
    with open_store(args) as s:
        RBD().clone(s, name, snap, child, features=split_features(args.image_feature))
    return 0


def cmd_children(args) -> int:
    name, snap = image_spec(args.spec, "required")
    with open_store(args) as s:
        kids = RBD().children(s, name, snap)
    if wants_json(args):
        print_json([{"pool": "ecfs", "pool_namespace": "", "image": k} for k in kids])
        return 0
    for k in kids:
        print(k)
    return 0


def cmd_flatten(args) -> int:
    name, _ = image_spec(args.name, "none")
    with open_store(args) as s, Image(s, name) as img:
        if img.header.parent is None:
            raise InvalidArgument(f"image {name!r} has no parent")
        with progress.bar(args, total=img.header.num_objects, desc="Image flatten",
                          unit="obj") as bar:
            img.flatten(progress=lambda done, total: bar.update(1))
    return 0


def cmd_sparsify(args) -> int:
    name, _ = image_spec(args.name, "none")
    with open_store(args) as s, Image(s, name) as img:
        with progress.bar(args, total=img.header.num_objects, desc="Image sparsify",
                          unit="obj") as bar:
            img.sparsify(progress=lambda done, total: bar.update(1))
    return 0


def cmd_feature(args) -> int:
    name, _ = image_spec(args.name, "none")
    with open_store(args) as s:
        directory.lookup(s, name)
        update_features(s, name, split_features(args.features) or [], args.enable)
    return 0
