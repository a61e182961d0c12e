"""backend: the erasure-coded object store (the RADOS + OSD + EC plugin layer).

Layering: this package is the bottom of ecfs. It imports only the standard
library and its chosen dependencies (pyeclib, numpy, crc32c, sortedcontainers);
it never imports ``rbdlike`` or ``ecfs``.

Modules, one concept each:
  errors      the EcfsError hierarchy (shared by every layer above)
  codec       pyeclib behind a Ceph-shaped interface (encode/decode/minimum_to_decode)
  delta       parity-delta math (GF(2^8) tables and encode-of-delta)
  placement   object name -> ordered OSD list (hashed reservoir sample)
  pool        the pool config file (pool.json) and store creation
  osdmap      OSD directories, up/down state
  shardfile   shard data file + sidecar (header, version vector, page crcs)
  journal     the store's redo log, group commit and replay
  locks       in-process and cross-process stripe/object locks
  counters    I/O counters shared across processes
  objectstore the I/O path: read, write (delta/reconstruct/full), degraded
              read, checksum repair, remove, truncate
  missed      per-OSD logs of the objects changed while it was away
  recovery    `osd up`: rebuild what an OSD missed
  procs       whether a process still runs
"""
