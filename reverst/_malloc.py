"""glibc malloc settings for the long-running processes (``reverstd``, the tunnel clients).

glibc serves a request of ``M_MMAP_THRESHOLD`` bytes or more with its own ``mmap`` and
gives it back on ``free``. By default that threshold is dynamic: each time such a block is
freed, the threshold rises to its size (up to 32 MB). A tunnel moving bulk data frees big
buffers all the time (qh3's stream buffers, joined runs of stream data, socket reads), so
the threshold climbs and later buffers of those sizes come from the main heap, which
fragments and only shrinks from its top. Fixing the threshold keeps big buffers out of
the heap: in ``bench/run.py`` the ``expose`` client's peak RSS on a 10 MB GET at four
connections went from 93–98 MB to 76–79 MB.

Everything here is a no-op where the C library is not glibc.
"""

from __future__ import annotations

import ctypes
import functools
import os

#: mallopt() parameter number of M_MMAP_THRESHOLD (glibc's malloc.h)
M_MMAP_THRESHOLD = -3
#: blocks of this size and larger are mapped on their own (glibc's default starts at 128 KB
#: and grows; measured alike at 128 KB, 256 KB and 1 MB, so the largest: fewer page faults)
MMAP_THRESHOLD = 1024 * 1024


@functools.lru_cache(maxsize=1)
def _glibc() -> ctypes.CDLL | None:
    try:
        if not os.confstr("CS_GNU_LIBC_VERSION"):
            return None
        return ctypes.CDLL("libc.so.6")
    except (AttributeError, ValueError, OSError):  # no confstr name, not glibc, no such library
        return None


def fix_mmap_threshold(size: int = MMAP_THRESHOLD) -> bool:
    """Make ``size`` the fixed mmap threshold of this process; True when glibc took it.

    An operator's own ``MALLOC_MMAP_THRESHOLD_`` in the environment wins: it is left alone.
    """
    libc = _glibc()
    if libc is None or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    return bool(libc.mallopt(M_MMAP_THRESHOLD, size))


def trim() -> bool:
    """Give the freed top of the heap back to the OS (``malloc_trim(0)``); True if glibc did."""
    libc = _glibc()
    return bool(libc is not None and libc.malloc_trim(0))
