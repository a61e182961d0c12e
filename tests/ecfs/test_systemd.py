"""The unit files under a real systemd (PID 1 of private namespaces, see
systemd_util): ecfs@.service starts, serves, survives a SIGKILL through
Restart=on-failure and stops cleanly; ecfs-map@.service follows its mount;
every unit passes systemd-analyze verify; scripts/install-units."""
from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys

import pytest

from . import systemd_util as su
from .util import ecfs

MiB = 1 << 20
UNITS = sorted(f for f in os.listdir(su.UNIT_DIR) if f.endswith(".service"))


@pytest.fixture
def systemd_ns():
    reason = su.unavailable()
    if reason:
        pytest.skip(f"systemd namespace: {reason}")
    ns = su.SystemdNS()
    try:
        ns.boot()
        yield ns
    finally:
        problems = ns.teardown()
        assert not problems, f"teardown: {problems}"


@pytest.fixture
def setup(systemd_ns):
    """A store with image demo, a mount point, the units installed."""
    ns = systemd_ns
    store, mnt = os.path.join(ns.dir, "store"), os.path.join(ns.dir, "mnt")
    ecfs(store, "init")
    ecfs(store, "rbd", "create", "demo", "--size", "64M")
    unit = f"ecfs@{su.systemd_escape_path(mnt)}.service"
    ns.install_units({"ECFS_STORE": store, "ECFS_MOUNT": mnt})
    ns.confine(unit, "ecfs-map@demo.service")
    pattern = os.urandom(MiB)
    with open(os.path.join(ns.dir, "pattern"), "wb") as f:
        f.write(pattern)
    return ns, store, mnt, unit, pattern


def dump_journal_on_failure(ns, *units):
    class _Guard:
        def __enter__(self):
            return self

        def __exit__(self, kind, exc, tb):
            if kind is not None and ns._alive():
                print("---- journal in the test systemd ----")
                print(ns.journal(*units)[-20000:])
            return False
    return _Guard()


def serving(ns, mnt) -> bool:
    """The mount is an ecfs mount that answers (a stale one does not)."""
    if ns.fstype(mnt) != "fuse.ecfs":
        return False
    p = ns.run("stat", "--format=%s", f"{mnt}/demo", check=False)
    return p.returncode == 0 and p.stdout.strip() == str(64 * MiB)


def read_back(ns, path, offset_mib) -> bytes:
    return ns.run("dd", f"if={path}", "bs=1M", f"skip={offset_mib}", "count=1",
                  "iflag=direct", "status=none", text=False).stdout


def test_mount_service_start_restart_stop(setup):
    ns, store, mnt, unit, pattern = setup
    with dump_journal_on_failure(ns, unit):
        ns.systemctl("start", unit)
        # start returned: the mount serves now, no waiting
        assert ns.fstype(mnt) == "fuse.ecfs"
        assert ns.run("stat", "--format=%s", f"{mnt}/demo").stdout.strip() == str(64 * MiB)
        ns.run("dd", f"if={ns.dir}/pattern", f"of={mnt}/demo", "bs=1M", "seek=3",
               "conv=notrunc,fsync", "status=none")
        assert read_back(ns, f"{mnt}/demo", 3) == pattern
        status = ns.systemctl("status", unit).stdout
        assert "active (running)" in status, status
        st = ns.show(unit, "MainPID", "NRestarts", "Type", "Result")
        assert st["Type"] == "notify" and st["NRestarts"] == "0", st
        first = int(st["MainPID"])
        assert first > 0

        # SIGKILL: the mount is left stale; Restart=on-failure brings it back
        ns.systemctl("kill", "--signal=SIGKILL", unit)

        def back():
            s = ns.show(unit, "ActiveState", "SubState", "MainPID", "NRestarts")
            return (s["ActiveState"] == "active" and s["SubState"] == "running"
                    and s["MainPID"] not in ("0", str(first)) and s["NRestarts"] == "1"
                    and serving(ns, mnt))
        su.wait_for(back, timeout=60, what=f"{unit} restarted and serving again")
        # exactly one mount there: the new mount cleared the stale one (ecfs
        # mount refuses a mount point in use, so it could not cover it)
        assert [t for t, _ in su.mount_table(ns.pid)].count(mnt) == 1
        assert read_back(ns, f"{mnt}/demo", 3) == pattern      # fsync'ed: survived

        ns.systemctl("stop", unit)
        assert ns.fstype(mnt) is None, "stop left a mount behind"
        assert not [t for t, k in su.mount_table(ns.pid) if t == mnt]
        st = ns.show(unit, "ActiveState", "Result", "ExecMainStatus", "MainPID")
        assert st == {"ActiveState": "inactive", "Result": "success", "ExecMainStatus": "0",
                      "MainPID": "0"}, st
    # what was written is in the store, read without any mount
    out = os.path.join(ns.dir, "export")
    ecfs(store, "rbd", "export", "demo", out)
    with open(out, "rb") as f:
        f.seek(3 * MiB)
        assert f.read(MiB) == pattern


def test_map_service_follows_its_mount(setup):
    ns, store, mnt, unit, pattern = setup
    m = "ecfs-map@demo.service"
    with dump_journal_on_failure(ns, unit, m):
        binds = ns.show(m, "Requires", "After")
        assert unit in shlex.split(binds["Requires"]), binds
        assert unit in shlex.split(binds["After"]), binds

        def device():
            with open(ns.host_path("/run/ecfs-map/demo/device")) as f:
                return f.read().strip()

        def mapped():
            env = dict(os.environ, PYTHONPATH=su.ROOT, ECFS_STORE=store)
            out = ns.run(sys.executable, "-m", "ecfs.cli", "rbd", "showmapped", "--json",
                         env=env).stdout
            return [(r["name"], r["device"]) for r in json.loads(out)]

        ns.systemctl("start", m)              # starts the mount first (BindsTo=)
        assert ns.show(unit, "ActiveState")["ActiveState"] == "active"
        dev = device()
        assert mapped() == [("demo", dev)]
        assert ns.run("blockdev", "--getsize64", dev).stdout.strip() == str(64 * MiB)
        ns.run("dd", f"if={ns.dir}/pattern", f"of={dev}", "bs=1M", "seek=5",
               "oflag=direct", "conv=fsync", "status=none")
        assert read_back(ns, f"{mnt}/demo", 5) == pattern

        # a killed mount comes back, and the map with it, on the new mount;
        # the old loop device (on the dead FUSE connection) is detached
        first = ns.show(m, "ActiveEnterTimestampMonotonic")["ActiveEnterTimestampMonotonic"]
        ns.systemctl("kill", "--signal=SIGKILL", unit)

        def back():
            s, t = ns.show(unit, "ActiveState", "NRestarts"), ns.show(
                m, "ActiveState", "ActiveEnterTimestampMonotonic")
            return (s == {"ActiveState": "active", "NRestarts": "1"}
                    and t["ActiveState"] == "active"
                    and t["ActiveEnterTimestampMonotonic"] != first and serving(ns, mnt))
        su.wait_for(back, timeout=60, what="mount and map back after SIGKILL")
        dev = device()
        assert mapped() == [("demo", dev)]
        assert su.loops_under(ns.dir) == [dev], su.loop_devices()
        assert read_back(ns, dev, 5) == pattern

        # stopping the mount stops the map first: unmapped, then unmounted
        ns.systemctl("stop", unit)
        assert ns.show(m, "ActiveState", "Result") == {"ActiveState": "inactive",
                                                        "Result": "success"}
        assert ns.show(unit, "ActiveState", "Result") == {"ActiveState": "inactive",
                                                           "Result": "success"}
        assert su.loops_under(ns.dir) == []
        assert ns.fstype(mnt) is None
        j = ns.journal(m, unit)
        assert j.rindex(f"Stopped {m}") < j.rindex(f"Stopping {unit}"), j


@pytest.mark.parametrize("unit", UNITS)
def test_units_pass_systemd_analyze_verify(unit, tmp_path):
    if shutil.which("systemd-analyze") is None:
        pytest.skip("no systemd-analyze")
    if not os.access(su.ECFS_BIN, os.X_OK):
        pytest.skip(f"no {su.ECFS_BIN}: verify checks that ExecStart= exists "
                    "(scripts/install links it)")
    # the template, and an instance of it (specifiers resolved)
    instance = unit.replace("@.", "@srv-ecfs." if unit.startswith("ecfs@") else "@demo.")
    for name in (unit, instance):
        p = subprocess.run(["systemd-analyze", "verify", os.path.join(su.UNIT_DIR, name)],
                           capture_output=True, text=True, timeout=120)
        ours = [line for line in (p.stdout + p.stderr).splitlines() if "ecfs" in line]
        assert p.returncode == 0 and not ours, p.stdout + p.stderr


def _generated(tmp_path, conf_text):
    conf = tmp_path / "ecfs.conf"
    conf.write_text(conf_text)
    gen = tmp_path / "gen"
    text = open(os.path.join(su.UNIT_DIR, "ecfs-generator")).read()
    gen.write_text(text.replace("conf=/etc/ecfs/ecfs.conf\n", f"conf={conf}\n"))
    out = tmp_path / "out"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    p = subprocess.run(["sh", str(gen), str(out), str(out), str(out)],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    f = out / "ecfs-map@.service.d" / "50-ecfs-mount.conf"
    return f.read_text() if f.exists() else None, p.stderr


def test_generator_ties_map_units_to_the_configured_mount(tmp_path):
    if shutil.which("systemd-escape") is None:
        pytest.skip("no systemd-escape")
    text, _ = _generated(tmp_path, "#ECFS_MOUNT=/nope\nECFS_STORE=/s\nECFS_MOUNT=/srv/ecfs\n")
    assert "BindsTo=ecfs@srv-ecfs.service\n" in text
    assert "After=ecfs@srv-ecfs.service\n" in text
    text, _ = _generated(tmp_path, 'ECFS_MOUNT = "/srv/my ecfs-1/" \n')
    assert "BindsTo=ecfs@srv-my\\x20ecfs\\x2d1.service\n" in text
    assert _generated(tmp_path, "#ECFS_MOUNT=/srv/ecfs\n") == (None, "")
    text, err = _generated(tmp_path, "ECFS_MOUNT=srv\n")
    assert text is None and "not an absolute path" in err


def test_install_units_is_idempotent_and_keeps_the_config(tmp_path):
    script = os.path.join(su.ROOT, "scripts", "install-units")
    root = tmp_path / "root"
    for _ in range(2):
        p = subprocess.run(["bash", script, "--root", str(root)], capture_output=True,
                           text=True)
        assert p.returncode == 0, p.stderr
        for u in UNITS:
            assert (root / "etc/systemd/system" / u).read_bytes() == \
                open(os.path.join(su.UNIT_DIR, u), "rb").read()
        gen = root / "usr/local/lib/systemd/system-generators/ecfs-generator"
        assert os.access(gen, os.X_OK)
        conf = root / "etc/ecfs/ecfs.conf"
        assert "#ECFS_STORE=" in conf.read_text() and "#ECFS_MOUNT=" in conf.read_text()
    conf.write_text("ECFS_STORE=/srv/store\n")
    p = subprocess.run(["bash", script, "--root", str(root)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert conf.read_text() == "ECFS_STORE=/srv/store\n"        # never overwritten
    assert sorted(os.listdir(root / "etc/ecfs")) == ["ecfs.conf"]
