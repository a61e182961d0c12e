"""rbdlike: images on top of objects (the librbd layer).

Imports ``backend`` only; never ``ecfs``.

Modules, one concept each:
  header          the image header object, names of an image's objects
  directory       image name -> id, and the store-side lock files' home
  objectmap       the 2-bit object map (head and per snapshot)
  exclusive_lock  the image lock: flock per epoch, owner record, fencing
  notify          watch/notify between processes: lock requests, proxied ops
  image           an open image: I/O, the lock hand-over, maintenance ops
  snapshot        copy-on-write clones and how snapshots find them
  layering        parent/child links, children
  diff            what changed between two points (maps, then pages)
  diffstream      Ceph's rbd diff v1 stream
  rbd             create/list/remove/rename/clone, object-map and feature admin
"""
