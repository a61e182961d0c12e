"""ecfs: the command line (and later the FUSE mount and service glue).

Top layer: may import ``rbdlike`` and ``backend``; nothing imports it.
"""
__version__ = "0.1.0"
