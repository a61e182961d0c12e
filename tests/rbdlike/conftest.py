import os

import pytest

from backend.objectstore import ObjectStore
from backend.pool import create_store


@pytest.fixture
def store(tmp_path):
    """A 4+2 store over six OSD directories, open for the test."""
    d = os.path.join(str(tmp_path), "store")
    create_store(d, k=4, m=2, osds=None, chunk_size="auto", write_mode="auto",
                 plugin="isa_l_rs_vand")
    s = ObjectStore(d)
    try:
        yield s
    finally:
        s.close()
