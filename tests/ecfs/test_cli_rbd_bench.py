"""ecfs rbd bench (as rbd bench) as a user runs it."""
import json
import re
from concurrent.futures import ThreadPoolExecutor

import pytest

from ecfs import cli, cmd_rbd_bench

from .util import assert_user_error, ecfs, ecfs_json, ecfs_tty

KiB, MiB = 1 << 10, 1 << 20

ROW = re.compile(r"^ {0,4}\d+ *\d+ +\S+ +\d+(\.\d+)? [KMGT]?i?B/s$")
SUMMARY = re.compile(r"^elapsed: (\d+)   ops: (\d+)   ops/sec: (\S+)   "
                     r"bytes/sec: \d+(\.\d+)? [KMGT]?i?B/s$")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One store for the module (each ecfs run is a process start): image
    ``img`` of 16 MiB that the benches share."""
    st = tmp_path_factory.mktemp("bench") / "s"
    ecfs(st, "init")
    ecfs(st, "rbd", "create", "img", "--size", "16")      # 16 MiB
    return st


def _state(store):
    st = ecfs_json(store, "status")
    return st["counters"], st["objects"], st["images"]


def _bench(store, *args, image="img"):
    """Run a bench; returns its stdout lines (nothing on stderr: no terminal)."""
    p = ecfs(store, "rbd", "bench", image, *args)
    assert p.stderr == b""
    return p.stdout.decode().splitlines()


def _check_text(lines, header, ops, extra=0):
    """rbd bench's shape: header, table head, rows, summary (+ per-kind lines)."""
    assert lines[0] == header
    assert lines[1] == "  SEC       OPS   OPS/SEC   BYTES/SEC"
    rows, summary = lines[2:len(lines) - 1 - extra], lines[len(lines) - 1 - extra:]
    for r in rows:
        assert ROW.match(r), r
    m = SUMMARY.match(summary[0])
    assert m, summary[0]
    assert int(m.group(2)) == ops and float(m.group(3)) > 0
    return rows, summary


def test_write_then_read_seq_and_rand(store, tmp_path):
    ecfs(store, "rbd", "create", "w", "--size", "16")
    lines = _bench(store, "--io-type", "write", "--io-size", "4K", "--io-total", "1M",
                   image="w")
    _check_text(lines, "bench  type write io_size 4096 io_threads 16 bytes 1048576 "
                       "pattern sequential", 256)
    # seq from the start: the first 1 MiB holds random data, every 4K of it
    # (a zero block would be a lost write), the rest is still unwritten
    out = tmp_path / "out.img"
    ecfs(store, "rbd", "export", "w", out)
    data = out.read_bytes()
    assert len(data) == 16 * MiB
    zero = bytes(4 * KiB)
    assert all(data[o:o + 4 * KiB] != zero for o in range(0, MiB, 4 * KiB))
    assert data[MiB:] == bytes(15 * MiB)

    lines = _bench(store, "--io-type", "read", "--io-size", "64K", "--io-total", "2M",
                   "--io-threads", "4", image="w")
    _check_text(lines, "bench  type read io_size 65536 io_threads 4 bytes 2097152 "
                       "pattern sequential", 32)
    lines = _bench(store, "--io-type", "read", "--io-size", "4096", "--io-total", "1M",
                   "--io-pattern", "rand", image="w")
    _check_text(lines, "bench  type read io_size 4096 io_threads 16 bytes 1048576 "
                       "pattern random", 256)
    lines = _bench(store, "--io-type", "write", "--io-size", "64K", "--io-total", "2M",
                   "--io-pattern", "rand", "--io-threads", "8", image="w")
    _check_text(lines, "bench  type write io_size 65536 io_threads 8 bytes 2097152 "
                       "pattern random", 32)
    # rand writes land on 64K-aligned blocks: each is all random or untouched
    out.unlink()                       # export, as rbd, does not overwrite a file
    ecfs(store, "rbd", "export", "w", out)
    data = out.read_bytes()
    blocks = [data[o:o + 64 * KiB] for o in range(MiB, 16 * MiB, 64 * KiB)]
    assert any(b != bytes(64 * KiB) for b in blocks)
    assert all(b.count(0) < 4 * KiB or b == bytes(64 * KiB) for b in blocks)


def test_readwrite_text_and_json(store):
    lines = _bench(store, "--io-type", "readwrite", "--io-size", "4K", "--io-total", "1M",
                   "--io-pattern", "rand")
    _, summary = _check_text(lines, "bench  type readwrite read:write=50:50 io_size 4096 "
                                    "io_threads 16 bytes 1048576 pattern random", 256, extra=2)
    kinds = {}
    for line, kind in zip(summary[1:], ("read", "write")):
        m = re.match(rf"^{kind}_ops: (\d+)   {kind}_ops/sec: \S+   "
                     rf"{kind}_bytes/sec: \d+(\.\d+)? [KMGT]?i?B/s$", line)
        assert m, line
        kinds[kind] = int(m.group(1))
    assert kinds["read"] + kinds["write"] == 256

    res = ecfs_json(store, "rbd", "bench", "img", "--io-type", "rw", "--io-size", "8K",
                    "--io-total", "1M", "--rw-mix-read", "100", "--io-threads", "3")
    assert res["io_type"] == "readwrite" and res["rw_mix_read"] == 100
    assert res["ops"] == res["read_ops"] == 128 and res["write_ops"] == 0
    res = ecfs_json(store, "rbd", "bench", "img", "--io-type", "write", "--io-size", "16K",
                    "--io-total", "1000K", "--io-pattern", "rand")
    assert {k: res[k] for k in ("image", "io_type", "io_size", "io_threads", "io_total",
                                "io_pattern", "rw_mix_read")} == \
        {"image": "img", "io_type": "write", "io_size": 16 * KiB, "io_threads": 16,
         "io_total": 1000 * KiB, "io_pattern": "rand", "rw_mix_read": 0}
    # as rbd: whole I/Os until io_total bytes are issued
    assert res["ops"] == res["write_ops"] == 63 and res["read_ops"] == 0
    assert res["bytes"] == 63 * 16 * KiB
    assert res["elapsed"] > 0 and res["ops_per_sec"] > 0
    assert res["bytes_per_sec"] == pytest.approx(res["ops_per_sec"] * 16 * KiB)
    assert 0 < res["min_latency_s"] <= res["avg_latency_s"] <= res["max_latency_s"]
    assert isinstance(res["seconds"], list)
    # --format json is --json; nothing but the JSON on stdout
    p = ecfs(store, "rbd", "bench", "img", "--io-type", "read", "--io-total", "64K",
             "--format", "json")
    assert json.loads(p.stdout)["ops"] == 16


def test_rows_every_second(store, monkeypatch, capsys):
    """A row per elapsed second (a second made short here), rbd's columns."""
    monkeypatch.setattr(cmd_rbd_bench, "ROW_SECONDS", 0.002)
    assert cli.main(["--store", str(store), "rbd", "bench", "img", "--io-type", "write",
                     "--io-total", "1M", "--io-threads", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows, _ = _check_text(lines, "bench  type write io_size 4096 io_threads 2 bytes 1048576 "
                                 "pattern sequential", 256)
    assert rows
    secs = [int(r.split()[0]) for r in rows]
    ops = [int(r.split()[1]) for r in rows]
    assert secs == sorted(set(secs)) and ops == sorted(ops) and ops[-1] <= 256


def test_progress_bar_on_a_terminal(store):
    rc, out, err = ecfs_tty(store, "rbd", "bench", "img", "--io-type", "write",
                            "--io-total", "256K")
    assert rc == 0 and "bench write" in err and "%|" in err
    assert b"ops: 64" in out
    rc, out, err = ecfs_tty(store, "rbd", "bench", "img", "--io-type", "read",
                            "--io-total", "256K", "--no-progress")
    assert rc == 0 and err == "" and b"ops: 64" in out


BAD = [
    (("nosuch", "--io-type", "write"), "does not exist"),
    (("img", "--io-type", "write", "--io-size", "0"), "io-size"),
    (("img", "--io-type", "read", "--io-size", "32M"), "larger than image"),
    (("img", "--io-type", "write", "--io-size", "4Q"), "io size"),
    (("img", "--io-type", "bogus"), "invalid choice"),
    (("img",), "--io-type"),
    (("img", "--io-type", "write", "--io-total", "0"), "io-total"),
    (("img", "--io-type", "write", "--io-threads", "0"), "io-threads"),
    (("img", "--io-type", "write", "--io-threads", "1025"), "io-threads"),
    (("img", "--io-type", "write", "--io-threads", "x"), "io-threads"),
    (("img", "--io-type", "readwrite", "--rw-mix-read", "101"), "rw-mix-read"),
    (("img", "--io-type", "write", "--io-pattern", "zigzag"), "invalid choice"),
    # ASCII digits only, no whitespace (int() would take these); --io-total
    # keeps a wrongly accepted run short
    (("img", "--io-type", "write", "--io-threads", "\u0663", "--io-total", "4K"), "io-threads"),
    (("img", "--io-type", "write", "--io-threads", " 2", "--io-total", "4K"), "io-threads"),
    (("img", "--io-type", "write", "--io-threads", "2\n", "--io-total", "4K"), "io-threads"),
    (("img", "--io-type", "write", "--io-threads", "+2", "--io-total", "4K"), "io-threads"),
    (("img", "--io-type", "write", "--io-threads", "1_0", "--io-total", "4K"), "io-threads"),
    (("img", "--io-type", "readwrite", "--rw-mix-read", "\uff15\uff10", "--io-total", "4K"),
     "rw-mix-read"),
    (("img", "--io-type", "write", "--io-size", "\u0664K", "--io-total", "4K"), "io size"),
    (("img", "--io-type", "write", "--io-total", "\u0664K"), "io total"),
]


def test_bad_input_is_one_line_and_changes_nothing(store):
    before = _state(store)
    with ThreadPoolExecutor(4) as pool:      # independent processes: run them together
        done = list(pool.map(lambda a: ecfs(store, "rbd", "bench", *a, check=False),
                             [args for args, _ in BAD]))
    for (args, msg), p in zip(BAD, done):
        assert_user_error(p, msg)
        assert p.stdout == b"", args
    assert _state(store) == before


def test_image_smaller_than_io_size(store):
    ecfs(store, "rbd", "create", "tiny", "--size", "3K", "--object-size", "64K")
    p = ecfs(store, "rbd", "bench", "tiny", "--io-type", "write", check=False)
    assert_user_error(p, "larger than image")
    # an io size that fits a tiny image works, wrapping at its end
    res = ecfs_json(store, "rbd", "bench", "tiny", "--io-type", "write", "--io-size", "1K",
                    "--io-total", "10K")
    assert res["ops"] == 10
