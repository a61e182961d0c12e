"""Stores written by earlier versions read back unchanged (the golden
corpus, tests/golden/make_corpus.py): every object and image byte, a
clean deep scrub and fsck, and the journal record the copy kept."""
import glob
import hashlib
import json
import os
import subprocess
import sys
import tarfile

import pytest

from backend.objectstore import ObjectStore
from rbdlike.image import Image

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
CORPORA = sorted(glob.glob(os.path.join(HERE, "store-v*.tar.gz")))


def _sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def _ecfs(store, *args):
    return subprocess.run([sys.executable, "-m", "ecfs.cli", "--store", str(store), *args],
                          cwd=REPO, capture_output=True, text=True, timeout=300)


def test_there_is_a_corpus():
    assert CORPORA, "tests/golden/store-v*.tar.gz missing"


@pytest.mark.parametrize("corpus", CORPORA, ids=os.path.basename)
def test_a_corpus_store_reads_back(corpus, tmp_path):
    with tarfile.open(corpus) as t:
        t.extractall(tmp_path)      # our own archive (no filter= before Python 3.11.4)
    d = tmp_path / "store"
    want = json.loads((d / "golden.json").read_text())
    segments = sorted(f for f in os.listdir(d) if f.startswith("journal.log."))
    s = ObjectStore(str(d))         # replays the journal the copy kept
    try:
        # alone, it replayed and emptied the journal, sealed segments too
        assert s.journal.sealed() == [] and s.journal.size() == 16, segments
        assert not any(f.startswith("journal.log.") for f in os.listdir(d))
        for name, digest in want["objects"].items():
            got = s.read(name, 0, want["sizes"][name] + 4096)
            assert len(got) == want["sizes"][name] and _sha(got) == digest, name
        for spec, digest in want["images"].items():
            name, _, snap = spec.partition("@")
            with Image(s, name, snapshot=snap or None) as img:
                got = img.read(0, want["image_sizes"][spec])
            assert _sha(got) == digest, spec
    finally:
        s.close()
    for cmd in (["scrub", "--deep"], ["fsck"]):
        p = _ecfs(d, "--no-progress", *cmd)
        assert p.returncode == 0, (cmd, p.stdout, p.stderr)
