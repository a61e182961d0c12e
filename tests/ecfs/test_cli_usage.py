"""The command line itself: global options anywhere, --help texts,
progress bars on a terminal."""
import json
import os

import pytest

from ecfs import cli

from .util import assert_user_error, ecfs, ecfs_tty


@pytest.fixture
def store(tmp_path):
    st = tmp_path / "s"
    ecfs(st, "init")
    return st


def test_global_options_after_the_verb(store):
    ecfs(store, "rados", "put", "x", "-", input=b"abc")
    s = json.loads(ecfs(None, "status", "--store", store, "--json").stdout)
    assert s["store"] == str(store)
    assert ecfs(None, "rados", "ls", "--store", store).stdout == b"x\n"
    assert ecfs(None, "rados", "--store", store, "ls").stdout == b"x\n"
    # the last --store given wins, wherever it stands
    rows = json.loads(ecfs(None, "--store", "/nonexistent", "osd", "ls", "--store", store,
                           "--format", "json").stdout)
    assert len(rows) == 6
    assert json.loads(ecfs(None, "--json", "status", "--store", store).stdout)["fsid"]
    ecfs(None, "rados", "put", "y", "-", "--no-progress", "--store", store, input=b"y")
    assert ecfs(store, "rados", "get", "y", "-", "--no-progress").stdout == b"y"
    assert_user_error(ecfs(store, "rados", "ls", "--store", check=False), "--store")


def _commands(parser, path=()):
    """Every (sub)command path of the parser, depth first."""
    for action in parser._actions:
        if action.__class__.__name__ == "_Commands":
            for name, sub in action.choices.items():
                yield path + (name,)
                yield from _commands(sub, path + (name,))


def test_every_command_help_has_a_description(capsys):
    paths = list(_commands(cli.build_parser()))
    assert ("rados", "bench") in paths and ("osd", "up") in paths
    for path in paths:
        assert cli.main([*path, "--help"]) == 0
        out = capsys.readouterr().out
        assert out.startswith("usage: ecfs " + " ".join(path))
        desc = out.split("\n\n")[1].strip()
        assert desc and "\n" not in desc and not desc.startswith(("positional", "options")), path
        assert "--store" in out, path
    p = ecfs(None, "rados", "get", "--help")       # the same through the real command
    assert p.returncode == 0 and b"write object NAME to FILE" in p.stdout


def test_progress_bars_only_on_a_terminal(store, tmp_path):
    big = tmp_path / "big"
    big.write_bytes(os.urandom(9 << 20))          # three 4 MiB operations
    rc, _, err = ecfs_tty(store, "rados", "put", "big", big)
    assert rc == 0 and "put big" in err and "%|" in err
    rc, out, err = ecfs_tty(store, "rados", "get", "big", "-")
    assert rc == 0 and out == big.read_bytes() and "get big" in err
    rc, out, err = ecfs_tty(store, "rados", "get", "big", "-", "--no-progress")
    assert rc == 0 and err == ""
    p = ecfs(store, "rados", "get", "big", "-")    # stderr not a terminal
    assert p.stdout == big.read_bytes() and p.stderr == b""
    rc, out, err = ecfs_tty(store, "rados", "bench", "1", "write", "-b", "4K", "-t", "1")
    assert rc == 0 and "bench write" in err and b"Total writes made:" in out
