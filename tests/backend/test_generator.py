"""Seeded generator runs in every write mode, verified against a model and
then against a fresh encode of every stripe read from the shard files."""
import pytest

from backend.objectstore import ObjectStore

from .iogen import IOGen, Model, run_op, verify_all
from .util import check_parity

MODES = ("auto", "delta", "full", "reconstruct", "mixed")


@pytest.mark.parametrize("chunk", ["auto", 4096])
@pytest.mark.parametrize("mode", MODES)
def test_generator(make_store, mode, chunk):
    d, s = make_store(k=4, m=2, chunk_size=chunk, write_mode=mode)
    seed = MODES.index(mode) * 10 + (chunk == "auto")
    gen = IOGen(seed, k=4, names=("a", "b", "dir/c"), max_size=640 << 10)
    model = Model()
    chunk_sizes = set()
    for op in gen.ops(400):
        run_op(s, op, model)
        if op.mutates and op.name in model.objs:
            chunk_sizes.add(s.stat(op.name).chunk_size)
        if op.index % 40 == 39:
            verify_all(s, model)
    verify_all(s, model)
    if chunk == "auto":
        assert chunk_sizes == {4096, 65536}      # the run crossed the restripe threshold
    c = s.counters.snapshot()
    if mode in ("delta", "auto"):
        assert c["writes_delta"] > 0
    if mode != "full":
        assert c["writes_reconstruct"] > 0
    s.close()
    rep = check_parity(d)
    assert rep.objects == len(model.objs)
    # reopened, the same content
    s2 = ObjectStore(d)
    try:
        verify_all(s2, model)
    finally:
        s2.close()


def test_generator_is_deterministic():
    a = [op for op in IOGen(7, k=4, names=("x", "y")).ops(300)]
    b = [op for op in IOGen(7, k=4, names=("x", "y")).ops(300)]
    assert a == b
    assert [o.data() for o in a[:50]] == [o.data() for o in b[:50]]
    kinds = {o.kind for o in a}
    assert kinds == {"write", "write_full", "read", "truncate", "remove"}


@pytest.mark.parametrize("k,m,osds,chunk,plugin", [
    (8, 3, 12, "auto", "isa_l_rs_vand"),
    (3, 1, 5, 8192, "liberasurecode_rs_vand"),
    (2, 2, 4, "auto", "isa_l_rs_cauchy"),
])
def test_generator_other_profiles(make_store, k, m, osds, chunk, plugin):
    d, s = make_store(k=k, m=m, osds=osds, chunk_size=chunk, write_mode="mixed", plugin=plugin)
    gen = IOGen(k * 100 + m, k=k, chunks=(4096, 8192, 65536), names=("p", "q"),
                max_size=(k * 65536 * 5) // 2)
    model = Model()
    for op in gen.ops(150):
        run_op(s, op, model)
    verify_all(s, model)
    s.close()
    check_parity(d)
