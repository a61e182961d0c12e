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
from contextlib import contextmanager

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
    ns.install_units({"ECFS_STORE": store, "ECFS_MOUNT": mnt,
                      "ECFS_MOUNT_OPTS": "--cache-size 32M"})
    ns.confine(unit, "ecfs-map@demo.service")
    pattern = os.urandom(MiB)
    with open(os.path.join(ns.dir, "pattern"), "wb") as f:
        f.write(pattern)
    return ns, store, mnt, unit, pattern


@contextmanager
def dump_journal_on_failure(ns, *units):
    """On a failure, print the units' journal (pytest shows it)."""
    try:
        yield
    except BaseException:
        if ns.alive():
            print("---- journal in the test systemd ----")
            print(ns.journal(*units)[-20000:])
        raise


def serving(ns, mnt) -> bool:
    """The mount is an ecfs mount that answers (a stale one does not)."""
    if ns.fstype(mnt) != "fuse.ecfs":
        return False
    p = ns.run("stat", "--format=%s", f"{mnt}/demo", check=False)
    return p.returncode == 0 and p.stdout.strip() == str(64 * MiB)


def last_stop(ns, unit) -> str:
    """The journal of ``unit`` from its last "Stopping" on."""
    j = ns.journal(unit)
    return j[j.rindex(f"Stopping {unit}"):]


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
        argv = ns.run("cat", f"/proc/{first}/cmdline").stdout.split("\0")
        assert argv[-6:] == ["mount", mnt, "--foreground", "--cache-size", "32M", ""], argv

        # SIGKILL: the mount is left stale; Restart=on-failure brings it back
        ns.systemctl("kill", "--signal=SIGKILL", unit)

        def back():
            s = ns.show(unit, "ActiveState", "SubState", "MainPID", "NRestarts")
            return (s["ActiveState"] == "active" and s["SubState"] == "running"
                    and s["MainPID"] not in ("0", str(first)) and s["NRestarts"] == "1"
                    and serving(ns, mnt))
        su.wait_for(back, timeout=60, what=f"{unit} restarted and serving again")
        second = int(ns.show(unit, "MainPID")["MainPID"])
        # the restart found the mount point stale (ExecStartPre's mkdir
        # could not stat it) and ecfs mount cleared it: exactly one mount
        # there now (ecfs mount refuses a mount point in use, so it did not
        # cover the stale one)
        assert "Transport endpoint is not connected" in ns.journal(unit)
        assert [t for t, _ in su.mount_table(ns.pid)].count(mnt) == 1
        assert read_back(ns, f"{mnt}/demo", 3) == pattern      # fsync'ed: survived

        ns.systemctl("stop", unit)
        assert ns.fstype(mnt) is None, "stop left a mount behind"
        assert not [t for t, k in su.mount_table(ns.pid) if t == mnt]
        assert ns.systemctl("is-active", unit, check=False).stdout.strip() == "inactive"
        # a clean result: the unit may be unloaded once inactive (then
        # `systemctl show` gives defaults), so read it from the journal
        last = last_stop(ns, unit)
        assert f"ecfs[{second}] INFO stopped" in last, last       # flushed, exit 0
        assert f"{unit}: Deactivated successfully." in last, last
        assert "Failed with result" not in last, last
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

        ns.systemctl("start", m)              # starts the mount first (Requires=)
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
        for u in (m, unit):
            assert ns.systemctl("is-active", u, check=False).stdout.strip() == "inactive"
            assert f"{u}: Deactivated successfully." in last_stop(ns, u)
        assert su.loops_under(ns.dir) == []
        assert ns.fstype(mnt) is None
        j = ns.journal(m, unit)
        assert j.rindex(f"Stopped {m}") < j.rindex(f"Stopping {unit}"), j
        assert "detaching" not in last_stop(ns, m)    # `ecfs rbd unmap` did it


def test_ecfs_umount_stops_the_service_for_good(setup):
    """`ecfs umount MNT` on a mount the unit serves: a clean stop (exit 0),
    so Restart=on-failure leaves it stopped."""
    ns, store, mnt, unit, _ = setup
    with dump_journal_on_failure(ns, unit):
        ns.systemctl("start", unit)
        pid = ns.show(unit, "MainPID")["MainPID"]
        env = dict(os.environ, PYTHONPATH=su.ROOT, ECFS_STORE=store)
        ns.run(sys.executable, "-m", "ecfs.cli", "umount", mnt, env=env)
        assert ns.fstype(mnt) is None
        su.wait_for(lambda: ns.systemctl("is-active", unit, check=False).stdout.strip()
                    == "inactive", timeout=30, what=f"{unit} inactive")
        j = ns.journal(unit)
        tail = j[j.rindex(f"ecfs[{pid}] INFO serving"):]
        assert f"ecfs[{pid}] INFO stopped" in tail and "Deactivated successfully" in tail, j
        assert "Failed with result" not in j and "Scheduled restart job" not in j, j


def test_stop_right_after_start_unmounts(setup):
    """A stop right after READY=1 still flushes and unmounts (SIGTERM is
    blocked until trio listens for it)."""
    ns, store, mnt, unit, _ = setup
    with dump_journal_on_failure(ns, unit):
        for i in range(30):
            ns.run("sh", "-c", f"systemctl start '{unit}' && systemctl stop '{unit}'")
            last = last_stop(ns, unit)
            left = ns.fstype(mnt)
            if left:
                ns.run("fusermount3", "-u", "-z", mnt, check=False)
            assert left is None and "INFO stopped" in last, f"round {i}: {left}\n{last}"


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


def test_boot_with_mount_and_map_enabled_has_no_ordering_cycle(tmp_path):
    """What boot would start with both units enabled (multi-user.target,
    remote-fs.target, ecfs@, ecfs-map@ with the generator's drop-in), as
    one transaction: systemd-analyze verify reports ordering cycles."""
    if shutil.which("systemd-analyze") is None or not os.access(su.ECFS_BIN, os.X_OK):
        pytest.skip(f"needs systemd-analyze and {su.ECFS_BIN}")
    units = tmp_path / "units"
    units.mkdir()
    for u in UNITS:
        shutil.copy(os.path.join(su.UNIT_DIR, u), units / u)
    dropin, _ = _generated(tmp_path, "ECFS_MOUNT=/srv/ecfs\n")
    (units / "ecfs-map@.service.d").mkdir()
    (units / "ecfs-map@.service.d" / "50-ecfs-mount.conf").write_text(dropin)
    (units / "ecfs-boot-check.target").write_text(
        "[Unit]\nDescription=boot with ecfs units enabled\nWants=multi-user.target "
        "remote-fs.target ecfs@srv-ecfs.service ecfs-map@demo.service\n")
    p = subprocess.run(["systemd-analyze", "verify", str(units / "ecfs-boot-check.target")],
                       capture_output=True, text=True, timeout=120)
    out = p.stdout + p.stderr
    assert p.returncode == 0 and "cycle" not in out, out
    assert not [line for line in out.splitlines() if "ecfs" in line], out


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
    assert "Requires=ecfs@srv-ecfs.service\n" in text
    assert "After=ecfs@srv-ecfs.service\n" in text
    text, _ = _generated(tmp_path, 'ECFS_MOUNT = "/srv/my ecfs-1/" \n')
    assert "Requires=ecfs@srv-my\\x20ecfs\\x2d1.service\n" in text
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
