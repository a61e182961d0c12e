"""The one error hierarchy of ecfs.

Every layer raises these; the CLI maps them once to exit codes
(``ecfs.cli``) and the FUSE layer once to errno. Each class carries the
errno a POSIX caller expects, in the style of python-rbd's make_ex table.
"""
from __future__ import annotations

import errno


class EcfsError(Exception):
    """Base of every error ecfs reports to a user."""

    errno = errno.EIO
    exit_code = 1


class InvalidArgument(EcfsError):
    errno = errno.EINVAL
    exit_code = 22


class NotFound(EcfsError):
    errno = errno.ENOENT
    exit_code = 2


class Exists(EcfsError):
    errno = errno.EEXIST
    exit_code = 17


class Busy(EcfsError):
    errno = errno.EBUSY
    exit_code = 16


class ReadOnly(EcfsError):
    errno = errno.EROFS
    exit_code = 30


class NoSpace(EcfsError):
    errno = errno.ENOSPC
    exit_code = 28


class TooBig(EcfsError):
    errno = errno.EFBIG
    exit_code = 27


class StoreError(EcfsError):
    """The store itself is missing, damaged or of a newer format."""

    errno = errno.EIO
    exit_code = 3


class DataUnavailable(EcfsError):
    """Fewer than K shards of a stripe can be read: data is unreadable now."""

    errno = errno.EIO
    exit_code = 5


class Inconsistent(EcfsError):
    """scrub/fsck found inconsistencies that remain."""

    errno = errno.EIO
    exit_code = 4


class OutputError(EcfsError):
    """The command's output could not be written (stdout or an output file):
    a full disk, a closed terminal, an I/O error. Exit code 74 (EX_IOERR)."""

    errno = errno.EIO
    exit_code = 74


class TimedOut(EcfsError):
    """A peer (an image's lock owner) did not answer in time."""

    errno = errno.ETIMEDOUT
    exit_code = 110


class Unreachable(Busy):
    """Nobody answers at a lock owner's address (it may be closing)."""


class NotOwner(Busy):
    """The process asked no longer holds the lock (ask the new holder)."""


class Fenced(EcfsError):
    """This process's exclusive lock was broken: it may not write any more."""

    errno = errno.ESHUTDOWN
    exit_code = 108
