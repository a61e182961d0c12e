"""The ``ecfs`` command: argparse front end and the one error-to-exit mapping.

Each verb group lives in its own module (cmd_pool, cmd_rados) and adds its
subparsers here; every handler takes the parsed args and returns an exit
status. EcfsError becomes one ``ecfs: error: ...`` line and the error's
exit code; a usage error likewise (no usage dump); anything unexpected is
one line too (traceback with ECFS_DEBUG=1).
"""
from __future__ import annotations

import argparse
import os
import sys

from backend.errors import EcfsError, OutputError

from . import __version__
from .output import drop_stdout, guard_stdout

EXIT_USAGE = 2
EXIT_INTERNAL = 70


class UsageError(Exception):
    pass


class _Commands(argparse._SubParsersAction):
    """Subcommands whose own --help opens with their one-line description,
    and which take the global options after the verb too."""

    def add_parser(self, name, **kwargs):
        if kwargs.get("help") and "description" not in kwargs:
            kwargs["description"] = kwargs["help"]
        p = super().add_parser(name, **kwargs)
        add_globals(p, top=False)
        return p


class Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line, not a usage dump."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.register("action", "parsers", _Commands)

    def error(self, message: str):
        raise UsageError(message)


def add_globals(p: argparse.ArgumentParser, top: bool) -> None:
    """--store and --no-progress, before the verb (``top``) or after it, as
    Ceph's tools take them anywhere. After the verb the default is
    SUPPRESS, so a sub-parser never overwrites a value given before it."""
    dflt = (lambda v: v) if top else (lambda v: argparse.SUPPRESS)
    p.add_argument("--store", default=dflt(None), metavar="DIR",
                   help="store directory (env ECFS_STORE; default /var/lib/ecfs for root, "
                        "else ~/.local/share/ecfs)")
    p.add_argument("--no-progress", action="store_true", default=dflt(False),
                   help="no progress bars")


def default_store() -> str:
    env = os.environ.get("ECFS_STORE")
    if env:
        return env
    if os.geteuid() == 0:
        return "/var/lib/ecfs"
    return os.path.join(os.path.expanduser("~"), ".local", "share", "ecfs")


def add_json(p: argparse.ArgumentParser, top: bool = False) -> None:
    """--json, and --format json as Ceph's tools spell it (also accepted
    before the verb; commands without a listing ignore it, as Ceph's do)."""
    p.add_argument("--json", action="store_true", default=False if top else argparse.SUPPRESS,
                   help="machine-readable output")
    p.add_argument("--format", choices=["json", "plain"],
                   default=None if top else argparse.SUPPRESS,
                   help="output format (json = --json)")


def wants_json(args) -> bool:
    return bool(getattr(args, "json", False) or getattr(args, "format", None) == "json")


def build_parser() -> Parser:
    from . import cmd_fsck, cmd_mount, cmd_pool, cmd_rados, cmd_rbd, cmd_scrub
    p = Parser(prog="ecfs", description="Erasure-coded block store with a FUSE face.")
    add_globals(p, top=True)
    add_json(p, top=True)
    p.add_argument("--version", action="version", version=f"ecfs {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    sub.required = True
    cmd_pool.register(sub)
    cmd_scrub.register(sub)
    cmd_fsck.register(sub)
    cmd_rados.register(sub)
    cmd_rbd.register(sub)
    cmd_mount.register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    with guard_stdout():
        try:
            rc = _run(argv)
        except SystemExit as e:       # --help, --version
            rc = e.code if isinstance(e.code, int) else int(e.code is not None)
        try:
            sys.stdout.flush()
        except BrokenPipeError:
            drop_stdout()
        except OutputError as e:
            drop_stdout()
            if not rc:                # else its error line is already out
                _err(str(e))
                rc = e.exit_code
    return rc


def _run(argv: list[str]) -> int:
    try:
        parser = build_parser()
        args, extra = parser.parse_known_args(argv)
        _late_positional(args, extra)
        args.store = os.path.abspath(args.store or default_store())
        args.progress = not args.no_progress
        rc = args.func(args)
    except UsageError as e:
        _err(str(e))
        rc = EXIT_USAGE
    except EcfsError as e:
        _err(str(e))
        rc = e.exit_code
        if isinstance(e, OutputError):
            drop_stdout()
    except KeyboardInterrupt:
        _err("interrupted")
        rc = 130
    except BrokenPipeError:
        rc = 0
        drop_stdout()
    except Exception as e:  # an internal error is still one line
        if os.environ.get("ECFS_DEBUG"):
            import traceback
            traceback.print_exc()
        _err(f"internal error: {type(e).__name__}: {e}")
        rc = EXIT_INTERNAL
    return rc or 0


def _late_positional(args, extra: list[str]) -> None:
    """argparse cannot give an optional positional that follows options
    (``rados read NAME --length 4K FILE``): take it here."""
    if not extra:
        return
    if len(extra) == 1 and getattr(args, "late_file", False) and args.file == "-" \
            and not extra[0].startswith("-"):
        args.file = extra[0]
        return
    raise UsageError(f"unrecognized arguments: {' '.join(extra)}")


def _err(msg: str) -> None:
    sys.stderr.write(f"ecfs: error: {msg}\n")
    sys.stderr.flush()


if __name__ == "__main__":
    sys.exit(main())
