import os

import pytest

from backend.objectstore import ObjectStore
from backend.pool import create_store


@pytest.fixture
def make_store(tmp_path):
    """make_store(k=4, m=2, chunk_size=..., write_mode=..., osds=None, min_size=K) -> (dir, ObjectStore)

    min_size defaults to K here (the pool's own default is K+1): most backend
    tests write with M OSDs down on purpose."""
    opened = []

    def make(*, k=4, m=2, chunk_size="auto", write_mode="auto", osds=None, name="store",
             plugin="isa_l_rs_vand", min_size=None):
        d = os.path.join(str(tmp_path), name)
        create_store(d, k=k, m=m, osds=osds, chunk_size=chunk_size, write_mode=write_mode,
                     plugin=plugin, min_size=k if min_size is None else min_size)
        s = ObjectStore(d)
        opened.append(s)
        return d, s

    yield make
    for s in opened:
        try:
            s.close()
        except Exception:
            pass
