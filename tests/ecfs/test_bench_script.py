"""scripts/bench's argument parsing (no benchmark runs: those take minutes)."""
import importlib.util
import sys
from importlib.machinery import SourceFileLoader
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


@pytest.fixture(scope="module")
def bench():
    if str(SCRIPTS) not in sys.path:
        sys.path.insert(0, str(SCRIPTS))          # its venvexec import
    loader = SourceFileLoader("ecfs_bench_script", str(SCRIPTS / "bench"))
    mod = importlib.util.module_from_spec(importlib.util.spec_from_loader(loader.name, loader))
    sys.modules[loader.name] = mod                # its dataclasses look themselves up
    try:
        loader.exec_module(mod)
        yield mod
    finally:
        sys.modules.pop(loader.name, None)


def test_scale_defaults(bench):
    a = bench._parser().parse_args(["scale"])
    assert a.configs == ["4+2-6osd-1g", "4+2-6osd-64g-sparse", "4+2-12osd-1g", "8+3-11osd-1g"]
    assert a.rows == ["4k-randwrite", "4k-randwrite-32m", "4k-randread", "4k-randwrite-fsync"]
    assert a.seconds == 20.0 and a.tmpdir == "/var/tmp" and not a.json
    # the whole default run stays within a few minutes on the development VM
    assert 5 * 60 <= bench._scale_duration_s(a.configs, a.rows, a.seconds) <= 8 * 60


def test_scale_configs(bench):
    c = bench.SCALE_CONFIGS
    assert c["4+2-6osd-1g"].init_args == ("--k", "4", "--m", "2", "--osds", "6")
    assert c["4+2-12osd-1g"].init_args == ("--k", "4", "--m", "2", "--osds", "12")
    assert c["8+3-11osd-1g"].init_args == ("--k", "8", "--m", "3", "--osds", "11")
    assert c["4+2-6osd-64g-sparse"].label == "4+2, 6 OSDs, 64 GiB sparse"
    assert c["8+3-11osd-1g"].label == "8+3, 11 OSDs, 1 GiB"
    sparse = c["4+2-6osd-64g-sparse"]
    assert sparse.size == 64 << 30 and not sparse.prefill
    assert all(x.prefill and x.size == 1 << 30 for x in c.values() if x is not sparse)
    assert sparse.disk_need < 4 << 30                 # never the image's 64 GiB


def test_scale_choices(bench):
    a = bench._parser().parse_args(["scale", "--seconds", "1", "--configs",
                                    "8+3-11osd-1g,4+2-6osd-1g", "--rows",
                                    "4k-randread,4k-randwrite", "--json", "--tmpdir", "/tmp"])
    assert a.configs == ["8+3-11osd-1g", "4+2-6osd-1g"]
    assert a.rows == ["4k-randread", "4k-randwrite"]
    assert a.seconds == 1.0 and a.json and a.tmpdir == "/tmp"


@pytest.mark.parametrize("argv", [["scale", "--configs", "4+2-6osd-2g"],
                                  ["scale", "--rows", "1m-write"],     # not a 4K row
                                  ["scale", "--rows", ","]])
def test_scale_rejects(bench, argv, capsys):
    with pytest.raises(SystemExit) as e:
        bench._parser().parse_args(argv)
    assert e.value.code == 2
    assert "unknown" in capsys.readouterr().err
