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

from backend.errors import EcfsError

EXIT_USAGE = 2
EXIT_INTERNAL = 70


class UsageError(Exception):
    pass


class Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line, not a usage dump."""

    def error(self, message: str):
        raise UsageError(message)


def default_store() -> str:
    env = os.environ.get("ECFS_STORE")
    if env:
        return env
    if os.geteuid() == 0:
        return "/var/lib/ecfs"
    return os.path.join(os.path.expanduser("~"), ".local", "share", "ecfs")


def add_json(p: argparse.ArgumentParser) -> None:
    """--json, and --format json as Ceph's tools spell it."""
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--format", choices=["json", "plain"], default=None,
                   help="output format (json = --json)")


def wants_json(args) -> bool:
    return bool(getattr(args, "json", False) or getattr(args, "format", None) == "json")


def build_parser() -> Parser:
    from . import cmd_pool, cmd_rados
    p = Parser(prog="ecfs", description="Erasure-coded block store with a FUSE face.")
    p.add_argument("--store", default=None,
                   help="store directory (env ECFS_STORE; default /var/lib/ecfs for root, "
                        "else ~/.local/share/ecfs)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--version", action="version", version="ecfs 0.1.0")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    sub.required = True
    cmd_pool.register(sub)
    cmd_rados.register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        parser = build_parser()
        args, extra = parser.parse_known_args(argv)
        _late_positional(args, extra)
        args.store = args.store or default_store()
        args.progress = not args.no_progress
        rc = args.func(args)
    except UsageError as e:
        _err(str(e))
        rc = EXIT_USAGE
    except EcfsError as e:
        _err(str(e))
        rc = e.exit_code
    except KeyboardInterrupt:
        _err("interrupted")
        rc = 130
    except BrokenPipeError:
        rc = 0
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass
    except Exception as e:  # an internal error is still one line
        if os.environ.get("ECFS_DEBUG"):
            import traceback
            traceback.print_exc()
        _err(f"internal error: {type(e).__name__}: {e}")
        rc = EXIT_INTERNAL
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        pass
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
