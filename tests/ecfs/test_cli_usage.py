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


# Digits int() takes besides ASCII ones: Arabic-Indic, fullwidth, Devanagari;
# and spellings with whitespace, signs or underscores around ASCII ones.
NOT_NUMBERS = ["\u0663", "\uff13", "\u0969", "\u0663M", "\uff14K", "\u00b2", "4M\n", "4\n",
               " 4", "4 ", "4 M", "\t4K", "+4", "1_0", "", "K", "0x10", "4.0", "\u0664\u0660\u0669\u0666"]


@pytest.mark.parametrize("text", NOT_NUMBERS)
def test_numbers_are_ascii_digits_only(text):
    from backend.errors import InvalidArgument
    from ecfs.units import parse_size
    with pytest.raises(InvalidArgument):
        parse_size(text)
    from ecfs.units import parse_int
    with pytest.raises(InvalidArgument):
        parse_int(text, "--threads")


def test_number_spellings_that_stay():
    from ecfs.units import parse_int, parse_size
    assert [parse_size(t) for t in ("4096", "4K", "4k", "4Ki", "4KiB", "4KB", "4096B", "0")] == \
        [4096] * 7 + [0]
    assert parse_size("10", default_unit="M") == 10 << 20
    assert parse_size("1T") == 1 << 40 and parse_size("007") == 7
    assert parse_int("16", "--threads") == 16 and parse_int("-3", "--k") == -3


def test_cache_size_is_bounded_by_memory(tmp_path):
    """--cache-size is refused above half of physical memory (the stripe
    cache lives in RAM; Linux's ZFS ARC takes the same default bound),
    before anything is mounted."""
    from .mountutil import force_unmount, mount_pid
    st, mnt = tmp_path / "s", tmp_path / "mnt"
    ecfs(st, "init")
    mnt.mkdir()
    try:
        for bad, msg in (("9223372036854775808", "half of the physical memory"),
                         ("16E", "invalid cache size"), ("\uff16\uff14M", "invalid cache size"),
                         ("64M\n", "invalid cache size")):
            assert_user_error(ecfs(st, "mount", mnt, "--cache-size", bad, check=False), msg)
            assert not os.path.ismount(mnt)
    finally:
        pid = mount_pid(mnt)
        force_unmount(mnt)
        if pid is not None:
            from ecfs.mounts import pid_alive
            if pid_alive(pid):
                os.kill(pid, 9)
    from backend.errors import InvalidArgument
    from ecfs import cmd_mount
    limit = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2
    assert cmd_mount.cache_size(str(limit)) == limit
    assert cmd_mount.cache_size("0") == 0
    with pytest.raises(InvalidArgument, match="half"):
        cmd_mount.cache_size(str(limit + 1))
