"""Scrub names what is wrong and where; repair rewrites exactly that; a
second scrub is clean and every byte reads back (backend/scrub.py)."""
import os

import pytest

from backend import shardfile as sf
from backend.scrub import repair_object, scrub_object

from .util import check_parity, osd_of, shard_paths

K, M = 4, 2
PAGE = 4096


@pytest.fixture
def obj(make_store):
    d, s = make_store(k=K, m=M, chunk_size=4096)
    data = os.urandom(256 << 10)
    s.write_full("o", data)
    return d, s, data


def _problems(s, level):
    return scrub_object(s, "o", level).problems


def _silently_rewrite(d, shard, page):
    """Change a page of a shard AND its checksum to match (a dropped or torn
    write that checksums cannot see)."""
    dpath, mpath = shard_paths(d, "o", shard)
    new = os.urandom(PAGE)
    with open(dpath, "r+b") as f:
        f.seek(page * PAGE)
        f.write(new)
    with open(mpath, "r+b") as f:
        f.seek(sf.crc_offset(page))
        f.write(sf.page_crcs(new).astype("<u4").tobytes())


def _repaired(d, s, data):
    rep, fixed = repair_object(s, "o")
    assert fixed, rep.problems
    for level in ("light", "deep", "full"):
        assert _problems(s, level) == [], level
    assert s.read("o", 0, len(data)) == data
    check_parity(d)
    return rep


def test_a_clean_object_is_clean_at_every_depth(obj):
    d, s, data = obj
    for level in ("light", "deep", "full"):
        rep = scrub_object(s, "o", level)
        assert rep.problems == [] and rep.stripes == 16


@pytest.mark.parametrize("shard", [1, K + 1], ids=["data", "parity"])
@pytest.mark.parametrize("level", ["deep", "full"])
def test_the_culprit_of_a_silent_change_is_named_and_repaired(obj, shard, level):
    d, s, data = obj
    _silently_rewrite(d, shard, 5)
    assert _problems(s, "light") == []
    probs = _problems(s, level)
    assert [(p.stripe, p.shard, p.osd) for p in probs] == [(5, shard, osd_of(d, "o", shard))]
    assert "bytes disagree with the other 5" in probs[0].line()
    assert f"osd.{osd_of(d, 'o', shard)}" in probs[0].line()
    _repaired(d, s, data)


def test_with_m_1_the_culprit_cannot_be_told_apart(make_store):
    d, s = make_store(k=2, m=1, chunk_size=4096)
    data = os.urandom(64 << 10)
    s.write_full("o", data)
    dpath, mpath = shard_paths(d, "o", 1)
    new = os.urandom(PAGE)
    with open(dpath, "r+b") as f:
        f.write(new)
    with open(mpath, "r+b") as f:
        f.seek(sf.crc_offset(0))
        f.write(sf.page_crcs(new).astype("<u4").tobytes())
    probs = scrub_object(s, "o", "deep").problems
    assert len(probs) == 1 and probs[0].shard is None and probs[0].stripe == 0
    assert "cannot be told apart" in probs[0].what and "M=1" in probs[0].what


def test_a_flipped_page_names_its_page_and_is_repaired(obj):
    d, s, data = obj
    dpath, _ = shard_paths(d, "o", 2)
    with open(dpath, "r+b") as f:
        f.seek(7 * PAGE + 100)
        b = f.read(1)
        f.seek(7 * PAGE + 100)
        f.write(bytes([b[0] ^ 0x40]))
    probs = _problems(s, "deep")
    assert [(p.shard, p.page) for p in probs] == [(2, 7)]
    assert "checksum" in probs[0].what
    _repaired(d, s, data)


@pytest.mark.parametrize("damage", ["delete", "truncate", "header", "delete-meta"])
def test_missing_truncated_and_damaged_shard_files_are_found_by_light_and_rebuilt(obj, damage):
    d, s, data = obj
    dpath, mpath = shard_paths(d, "o", 3)
    if damage == "delete":
        os.unlink(dpath)
    elif damage == "truncate":
        os.truncate(dpath, 5 * PAGE)
    elif damage == "header":
        with open(mpath, "r+b") as f:
            f.seek(20)
            f.write(b"\xff\xff")
    else:
        os.unlink(mpath)
    light = _problems(s, "light")
    deep = _problems(s, "deep")
    if damage == "truncate":
        assert light == []        # a short file is normal for sparse data: deep finds it
        assert {p.shard for p in deep} == {3} and all("checksum" in p.what for p in deep)
    else:
        assert [p.shard for p in light] == [3], light
    _repaired(d, s, data)


def test_leftovers_where_a_shard_holds_nothing_are_removed(make_store):
    d, s = make_store(k=K, m=M, chunk_size=4096)
    s.write_full("o", os.urandom(4096))        # only data shard 0 (and parity) hold data
    dpath, _ = shard_paths(d, "o", 2)
    os.makedirs(os.path.dirname(dpath), exist_ok=True)
    with open(dpath, "wb") as f:
        f.write(os.urandom(PAGE))
    probs = scrub_object(s, "o", "light").problems
    assert [(p.shard, p.fix) for p in probs] == [(2, "remove")]
    repair_object(s, "o")
    assert scrub_object(s, "o", "deep").problems == []
    assert not os.path.exists(dpath)


def test_deep_scrub_compares_only_4k_summaries_per_stripe(make_store, monkeypatch):
    """With 64 KiB chunks the deep check decodes one 4 KiB summary per
    stripe, never a whole stripe, and still finds a silent change."""
    d, s = make_store(k=K, m=M, chunk_size=65536)
    data = os.urandom(1 << 20)
    s.write_full("o", data)
    seen = []
    real = s.codec.decode

    def spy(chunks, want):
        seen.append({len(v) for v in chunks.values()})
        return real(chunks, want)

    monkeypatch.setattr(s.codec, "decode", spy)
    assert scrub_object(s, "o", "deep").problems == []
    assert seen and all(x == {PAGE} for x in seen)
    _silently_rewrite(d, 4, 16 + 3)           # stripe 1, a page inside the chunk
    probs = scrub_object(s, "o", "deep").problems
    assert [(p.stripe, p.shard) for p in probs] == [(1, 4)]


def test_a_rebuild_cut_short_never_leaves_wrong_bytes(obj, monkeypatch):
    """A whole-shard rebuild (repair, backfill) killed after it emptied a
    shard that was current: the shard then says it is stale and is decoded
    around, never an empty shard claiming to be current (read as zeros)."""
    from backend.recovery import rebuild_shard
    d, s, data = obj

    def cut(*a, **k):
        raise RuntimeError("killed mid-rebuild")

    with s._locked("o") as o:
        monkeypatch.setattr(s, "_fetch", cut)
        with pytest.raises(RuntimeError):
            rebuild_shard(s, o, 3, o.loc[3], kind="repair")
    monkeypatch.undo()
    assert s.read("o", 0, len(data)) == data
    assert [p.shard for p in _problems(s, "light")] == [3]
    _repaired(d, s, data)


def test_repair_fixes_pages_in_place_when_others_are_damaged_too(make_store):
    """One bad page on each of three shards, in different stripes: each page
    is rewritten from the others, nothing else of the shards is touched."""
    d, s = make_store(k=K, m=M, chunk_size=4096)
    data = os.urandom(256 << 10)
    s.write_full("o", data)
    for shard, page in ((0, 1), (1, 6), (4, 11)):
        _silently_rewrite(d, shard, page)
    rep, fixed = repair_object(s, "o")
    assert len(fixed) == 3, rep.problems
    assert scrub_object(s, "o", "full").problems == []
    assert s.read("o", 0, len(data)) == data
