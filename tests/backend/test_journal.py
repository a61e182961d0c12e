"""Journal records: round trip, torn tails, and a torn record in the middle
(a process killed mid-append while others kept appending)."""
import os

from backend.journal import OP_TRUNCATE, OP_UNLINK, OP_WRITE, FileOp, Journal, Record, encode_record


def _rec(i, n=3000):
    return Record(f"obj{i}", i, [FileOp(OP_WRITE, i % 5, f"objects/ab/obj{i}.s0", 4096 * i,
                                        os.urandom(n)),
                                 FileOp(OP_TRUNCATE, 1, "objects/ab/x.s1", 77),
                                 FileOp(OP_UNLINK, 2, "objects/ab/x.s2")])


def _same(a, b):
    return (a.name, a.slot, [(o.type, o.osd, o.path, o.offset, bytes(o.data)) for o in a.ops]) == \
        (b.name, b.slot, [(o.type, o.osd, o.path, o.offset, bytes(o.data)) for o in b.ops])


def test_roundtrip_and_torn_tail(tmp_path):
    j = Journal(str(tmp_path / "j"))
    recs = [_rec(i) for i in range(5)]
    for r in recs:
        t, n = j.append(r)
        j.wait_durable(t)
    got = list(j.records())
    assert len(got) == 5 and all(_same(a, b) for a, b in zip(recs, got))
    blob = encode_record(_rec(9))
    with open(j.path, "ab") as f:
        f.write(blob[: len(blob) // 2])
    got = list(j.records())
    assert len(got) == 5
    j.reset()
    assert list(j.records()) == []
    j.close()


def test_torn_record_in_the_middle(tmp_path):
    j = Journal(str(tmp_path / "j"))
    a, torn, b, c = _rec(1), _rec(2, 20000), _rec(3), _rec(4)
    j.append(a)
    blob = encode_record(torn)
    with open(j.path, "ab") as f:      # another process, killed mid-append
        f.write(blob[: 9000])
    j.append(b)
    j.append(c)
    got = list(j.records())
    assert len(got) == 3
    assert _same(got[0], a) and _same(got[1], b) and _same(got[2], c)
    j.close()


def test_corrupt_record_skipped(tmp_path):
    j = Journal(str(tmp_path / "j"))
    recs = [_rec(i) for i in range(3)]
    for r in recs:
        j.append(r)
    size1 = len(encode_record(recs[0]))
    with open(j.path, "r+b") as f:
        f.seek(16 + size1 + 100)            # inside record 1's payload
        f.write(b"\xff\x00\xff")
    got = list(j.records())
    assert [g.name for g in got] == ["obj0", "obj2"]
    j.close()


def test_a_failed_fdatasync_fails_every_waiter_it_covered(tmp_path, monkeypatch):
    """Group commit: two records covered by one fdatasync that fails. Both
    waiters get the error (before, the second was told 'durable'), and the
    journal refuses appends and waits until reopened."""
    import threading

    import pytest

    from backend import journal as jmod
    from backend.errors import StoreError
    j = Journal(str(tmp_path / "j"))
    t1, _ = j.append(_rec(1))
    t2, _ = j.append(_rec(2))
    entered, go = threading.Event(), threading.Event()

    def failing(fd):
        entered.set()
        go.wait(30)
        raise OSError(5, "injected EIO")

    monkeypatch.setattr(jmod.os, "fdatasync", failing)
    results = {}

    def wait(name, t):
        try:
            results[name] = j.wait_durable(t)
        except StoreError as e:
            results[name] = e

    a = threading.Thread(target=wait, args=("a", t1))
    a.start()
    assert entered.wait(30)
    b = threading.Thread(target=wait, args=("b", t2))
    b.start()
    go.set()
    a.join(30)
    b.join(30)
    monkeypatch.undo()
    assert isinstance(results["a"], StoreError) and isinstance(results["b"], StoreError), results
    assert j.failed
    with pytest.raises(StoreError, match="fdatasync failed"):
        j.append(_rec(3))
    with pytest.raises(StoreError):
        j.reset()
    j.close()
    j = Journal(str(tmp_path / "j"))       # reopened: usable again
    j.wait_durable(j.append(_rec(4))[0])
    j.close()

