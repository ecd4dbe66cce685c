"""glibc's mmap threshold, fixed by reverstd and the tunnel clients (reverst._malloc)."""

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(not hasattr(os, "confstr") or not os.confstr("CS_GNU_LIBC_VERSION"),
                                reason="glibc only")

# Frees a 4 MB mapped block (glibc's dynamic threshold then rises to 4 MB), allocates
# 2 MB and prints how many new mapped blocks that took: 1 when it was mapped on its own,
# 0 when it came from the heap.
PROBE = r"""
import ctypes, sys
from reverst import _malloc

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                                                "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
print(_malloc.fix_mmap_threshold() if sys.argv[1] == "fix" else None)
big = bytes(4 << 20)
del big
before = libc.mallinfo2().hblks
mid = bytes(2 << 20)
print(libc.mallinfo2().hblks - before)
"""


def probe(mode: str, **env) -> list[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    done = subprocess.run([sys.executable, "-c", PROBE, mode], env={**environ, **env}, capture_output=True,
                          text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


def test_without_fixing_a_freed_big_block_moves_the_threshold_up():
    assert probe("leave") == ["None", "0"]  # glibc's default: 2 MB then comes from the heap


def test_fixed_threshold_keeps_big_buffers_out_of_the_heap():
    assert probe("fix") == ["True", "1"]


def test_an_operators_own_setting_wins():
    # MALLOC_MMAP_THRESHOLD_ fixes the threshold itself (at 8 MB here): left as it is
    assert probe("fix", MALLOC_MMAP_THRESHOLD_=str(8 << 20)) == ["False", "0"]

