import os

import pytest

from backend.objectstore import ObjectStore
from backend.pool import create_store


@pytest.fixture
def make_store(tmp_path):
    """make_store(k=4, m=2, chunk_size=..., write_mode=..., osds=None) -> (dir, ObjectStore)"""
    opened = []

    def make(*, k=4, m=2, chunk_size="auto", write_mode="auto", osds=None, name="store",
             plugin="isa_l_rs_vand"):
        d = os.path.join(str(tmp_path), name)
        create_store(d, k=k, m=m, osds=osds, chunk_size=chunk_size, write_mode=write_mode,
                     plugin=plugin)
        s = ObjectStore(d)
        opened.append(s)
        return d, s

    yield make
    for s in opened:
        try:
            s.close()
        except Exception:
            pass
