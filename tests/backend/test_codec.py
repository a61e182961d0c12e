"""Codec: decode from every K-subset, and parity deltas equal a re-encode."""
import itertools
import os

import numpy as np
import pytest

from backend.codec import FLAG_DELTA_GF8_TABLE, FLAG_PARITY_DELTA, PAGE, Codec
from backend.errors import InvalidArgument

PLUGINS = ("isa_l_rs_vand", "liberasurecode_rs_vand")
PROFILES = ((4, 2), (8, 3))
LENGTH = 2 * PAGE


def _chunks(codec, rng):
    data = [rng.integers(0, 256, LENGTH, dtype=np.uint8).tobytes() for _ in range(codec.k)]
    parity = [bytes(p) for p in codec.encode(data)]
    return data + parity


@pytest.fixture(scope="module", params=[(p, k, m) for p in PLUGINS for k, m in PROFILES],
                ids=lambda t: f"{t[0]}-{t[1]}+{t[2]}")
def codec(request):
    plugin, k, m = request.param
    return Codec(plugin, k, m)


def test_encode_matches_plugin_and_is_not_trivial(codec):
    rng = np.random.default_rng(1)
    allc = _chunks(codec, rng)
    frags = codec._drv.encode(b"".join(allc[: codec.k]))
    for j in range(codec.m):
        assert bytes(frags[codec.k + j])[-LENGTH:] == allc[codec.k + j]
        assert allc[codec.k + j] != bytes(LENGTH)


def test_decode_from_every_k_subset(codec):
    rng = np.random.default_rng(2)
    allc = _chunks(codec, rng)
    width = codec.k + codec.m
    n = 0
    for have in itertools.combinations(range(width), codec.k):
        avail = {i: allc[i] for i in have}
        missing = [i for i in range(width) if i not in have]
        # everything at once (data and parity missing)
        got = codec.decode(avail, range(width))
        assert sorted(got) == list(range(width))
        for i in range(width):
            assert bytes(got[i]) == allc[i], (have, i)
        # each missing chunk alone (data-only and parity-only paths)
        for i in missing:
            assert bytes(codec.decode(avail, [i])[i]) == allc[i], (have, i)
        # only the missing data chunks
        mdata = [i for i in missing if i < codec.k]
        if mdata:
            got = codec.decode(avail, mdata)
            assert all(bytes(got[i]) == allc[i] for i in mdata)
        n += 1
    assert n == len(list(itertools.combinations(range(width), codec.k)))


def test_decode_with_more_than_k_chunks(codec):
    rng = np.random.default_rng(3)
    allc = _chunks(codec, rng)
    width = codec.k + codec.m
    avail = {i: allc[i] for i in range(1, width)}
    assert bytes(codec.decode(avail, [0])[0]) == allc[0]


def test_minimum_to_decode(codec):
    width = codec.k + codec.m
    assert codec.minimum_to_decode([1], range(width)) == [1]
    got = codec.minimum_to_decode([0], range(1, width))
    assert len(got) == codec.k and 0 not in got
    with pytest.raises(InvalidArgument):
        codec.minimum_to_decode([0], range(1, codec.k))


def _methods(plugin, k, m):
    out = ["encode"]
    if Codec(plugin, k, m).flags & FLAG_DELTA_GF8_TABLE:
        out.append("table")
    return out


@pytest.mark.parametrize("plugin,k,m,method", [
    (p, k, m, meth) for p in PLUGINS for k, m in PROFILES for meth in _methods(p, k, m)])
def test_delta_equals_reencode_every_index(plugin, k, m, method):
    codec = Codec(plugin, k, m, delta_method=method)
    assert codec.flags & FLAG_PARITY_DELTA
    assert codec.delta_method == method
    rng = np.random.default_rng(4)
    allc = _chunks(codec, rng)
    data, parity = allc[:k], allc[k:]
    for i in range(k):
        new = rng.integers(0, 256, LENGTH, dtype=np.uint8).tobytes()
        delta = Codec.make_delta(data[i], new)
        data2 = list(data)
        data2[i] = new
        want = [bytes(p) for p in codec.encode(data2)]
        assert want != parity
        for j in range(m):
            got = codec.apply_delta(j, i, delta, parity[j])
            assert got.tobytes() == want[j], (method, i, j)
        pd = codec.parity_deltas({i: delta})
        assert len(pd) == m
        for j in range(m):
            assert np.bitwise_xor(np.frombuffer(parity[j], np.uint8), pd[j]).tobytes() == want[j]
    # several data chunks changed at once
    new = {i: rng.integers(0, 256, LENGTH, dtype=np.uint8).tobytes() for i in range(0, k, 2)}
    data2 = [new.get(i, data[i]) for i in range(k)]
    want = [bytes(p) for p in codec.encode(data2)]
    pd = codec.parity_deltas({i: Codec.make_delta(data[i], v) for i, v in new.items()})
    for j in range(m):
        assert np.bitwise_xor(np.frombuffer(parity[j], np.uint8), pd[j]).tobytes() == want[j]


def test_table_refused_without_gf8_flag():
    for plugin in PLUGINS:
        c = Codec(plugin, 4, 2)
        if not c.flags & FLAG_DELTA_GF8_TABLE:
            with pytest.raises(InvalidArgument):
                Codec(plugin, 4, 2, delta_method="table")
        else:
            assert c.coefficients is not None


def test_isa_l_has_table_deltas():
    # ISA-L's rs_vand is byte-wise GF(2^8): the table path must be exercised.
    assert Codec("isa_l_rs_vand", 4, 2).flags & FLAG_DELTA_GF8_TABLE


def test_unknown_plugin():
    with pytest.raises(InvalidArgument):
        Codec("nope", 4, 2)


def test_encode_accepts_numpy_views():
    c = Codec("isa_l_rs_vand", 4, 2)
    buf = np.frombuffer(os.urandom(4 * LENGTH), dtype=np.uint8).reshape(4, LENGTH)
    a = [bytes(p) for p in c.encode([buf[i] for i in range(4)])]
    b = [bytes(p) for p in c.encode([buf[i].tobytes() for i in range(4)])]
    assert a == b


@pytest.mark.parametrize("plugin", ["isa_l_rs_vand", "isa_l_rs_cauchy"])
@pytest.mark.parametrize("k,m", [(4, 2), (8, 3), (2, 1), (6, 4)])
def test_isa_l_encodes_directly_and_as_pyeclib_does(plugin, k, m):
    """The ISA-L plugins encode by calling ISA-L itself (ctypes lets the
    GIL go; no copies); what they give is pyeclib's parity, byte for
    byte, for rows of any page-multiple length, through both entry
    points."""
    if os.environ.get("ECFS_PYECLIB_ENCODE") == "1":
        pytest.skip("ECFS_PYECLIB_ENCODE=1: pyeclib encodes")
    c = Codec(plugin, k, m)
    assert c._direct is not None
    for length in (PAGE, 5 * PAGE, 256 << 10, (1 << 20) + PAGE):
        data = [np.frombuffer(os.urandom(length), dtype=np.uint8) for _ in range(k)]
        frags = c._drv.encode(b"".join(d.tobytes() for d in data))
        hdr = len(frags[0]) - length
        want = [bytes(f[hdr:hdr + length]) for f in frags[k:]]
        par = [np.zeros(length, dtype=np.uint8) for _ in range(m)]
        c.encode_into(data, par)
        assert [p.tobytes() for p in par] == want
        assert [bytes(p) for p in c.encode([d.tobytes() for d in data])] == want
    # rows that are not contiguous arrays (copied first), as pyeclib encodes them
    wide = np.frombuffer(os.urandom(2 * k * PAGE), dtype=np.uint8).reshape(k, 2 * PAGE)
    rows = [wide[i, ::2] for i in range(k)]
    par = [np.zeros(PAGE, dtype=np.uint8) for _ in range(m)]
    c.encode_into(rows, par)
    c._direct = None
    assert [bytes(p) for p in c.encode([r.copy() for r in rows])] == [p.tobytes() for p in par]


def test_liberasurecode_rs_vand_encodes_through_pyeclib():
    assert Codec("liberasurecode_rs_vand", 4, 2)._direct is None


def test_a_direct_encoder_not_giving_pyeclibs_parity_is_not_used(monkeypatch):
    from backend.codec import _DirectEncoder
    if os.environ.get("ECFS_PYECLIB_ENCODE") == "1":
        pytest.skip("ECFS_PYECLIB_ENCODE=1: pyeclib encodes")
    vand = Codec("isa_l_rs_vand", 4, 2)
    # the Cauchy matrix against the Vandermonde plugin: other parity
    assert _DirectEncoder.load("isa_l_rs_cauchy", 4, 2, vand._drv) is None
    assert _DirectEncoder.load("isa_l_rs_vand", 4, 2, vand._drv) is not None
    with pytest.raises(ValueError):      # rows of other lengths never reach ISA-L
        vand._direct.encode_into([np.zeros(PAGE, np.uint8)] * 3 + [np.zeros(8, np.uint8)],
                                 [np.zeros(PAGE, np.uint8)] * 2)
    monkeypatch.setenv("ECFS_PYECLIB_ENCODE", "1")
    off = Codec("isa_l_rs_vand", 4, 2)
    assert off._direct is None
    data = [os.urandom(PAGE) for _ in range(4)]
    assert [bytes(p) for p in off.encode(data)] == [bytes(p) for p in vand.encode(data)]
