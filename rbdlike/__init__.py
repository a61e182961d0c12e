"""rbdlike: images on top of objects (the librbd layer).

Imports ``backend`` only; never ``ecfs``.
"""
