"""ecfs: the ``ecfs`` command, the FUSE mount and the service glue.

Top layer: may import ``rbdlike`` and ``backend``; nothing imports it.

Modules:
  cli          argument parsing, the one error-to-exit-code mapping
  cmd_pool     init, status, osd ...            cmd_rados     rados ...
  cmd_rbd      rbd create/ls/info/rm/...         cmd_rbd_snap  snap, clone, flatten, ...
  cmd_rbd_diff diff, export-diff, import-diff    cmd_rbd_bench rbd bench
  cmd_rbd_map  rbd map/unmap/showmapped          cmd_mount     mount, umount, serve
  fuse         the pyfuse3 Operations (images as files; errors -> errno once)
  mounts       the mount table and the registry of mount processes
  output, progress, units   printing, progress bars, size parsing
"""
__version__ = "0.1.0"
