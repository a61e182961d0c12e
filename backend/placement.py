"""Placement: object name -> ordered list of K+M distinct OSD ids.

Every OSD draws a hash of (object name, OSD id), as in CRUSH's straw2, and
the draws pick a seeded random sample of K+M OSDs in order: walking the OSDs
by ascending id, OSD number t (0-based) takes shard position ``draw % (t+1)``
if that is below K+M (reservoir sampling, Algorithm R; the first K+M OSDs
are shuffled in "inside-out" Fisher-Yates style). Every OSD, and every OSD
at every shard position, is equally likely.

Growing the map with a new OSD of a higher id than the others (ids are
handed out 0, 1, 2, ...) changes a placement only where the new OSD's draw
lands in 0..K+M-1: it takes that one position and no other shard moves, so
about 1/(N+1) of all shards move, all of them to the new OSD and none
between two old ones. (Rendezvous "highest draw per position" cannot
promise that: an OSD displaced from one position can win a later one.)

Shrinking keeps the walk unchanged: a removed OSD's id stays in it (ids
are never reused), and each position it draws goes to the OSD with the
highest second draw for that position among the live OSDs the object
does not use yet. So removing an OSD moves exactly its shards, each to an
OSD that holds no other shard of that object. (After several removals, or
an add following one, a substitute may change hands too: a little more
than the minimum moves, never a shard the change does not concern twice.)
"""
from __future__ import annotations

import hashlib
import struct
from functools import lru_cache

_PACK = struct.Struct("<I")
_PACK2 = struct.Struct("<II")


def _draw(name: bytes, osd: int) -> int:
    return int.from_bytes(hashlib.blake2b(name + _PACK.pack(osd), digest_size=8).digest(), "little")


def _draw2(name: bytes, osd: int, pos: int) -> int:
    return int.from_bytes(hashlib.blake2b(name + _PACK2.pack(osd, pos), digest_size=8,
                                          person=b"ecfs-sub").digest(), "little")


def place(name: str, width: int, osds: tuple[int, ...],
          removed: tuple[int, ...] = ()) -> list[int]:
    """The OSD of each shard 0..width-1 of object ``name``: ``osds`` are
    the live OSDs, ``removed`` the ids of OSDs taken out of the pool."""
    return list(_place(name.encode(), width, tuple(osds), tuple(removed)))


@lru_cache(maxsize=65536)
def _place(name: bytes, width: int, osds: tuple[int, ...],
           removed: tuple[int, ...] = ()) -> tuple[int, ...]:
    if width > len(osds):
        raise ValueError("more shards than OSDs")
    chosen = _walk(name, width, sorted(set(osds) | set(removed)))
    if removed:
        gone = set(removed)
        for pos, osd in enumerate(chosen):
            if osd in gone:
                free = [o for o in osds if o not in chosen]
                chosen[pos] = max(free, key=lambda o: _draw2(name, o, pos))
    return tuple(chosen)


def _walk(name: bytes, width: int, osds: list[int]) -> list[int]:
    chosen: list[int] = []
    for t, osd in enumerate(osds):
        j = _draw(name, osd) % (t + 1)
        if t < width:
            if j == t:
                chosen.append(osd)
            else:
                chosen.append(chosen[j])
                chosen[j] = osd
        elif j < width:
            chosen[j] = osd
    return chosen
