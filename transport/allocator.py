"""Keep glibc from returning freed heap memory to the kernel after every 64 KiB frame.

Every Noise frame allocates a fresh 64 KiB buffer, and every socket read a 256 KiB one. With glibc's
defaults, freeing them shrinks the heap (trim threshold 128 KiB) and the next allocation faults the
same pages back in: measured on this project's 2-core machines, that costs ~35 % of the transport's
CPU per byte (0.078 -> 0.049 CPU-s per 64 MiB on each side). Raising the trim and mmap thresholds keeps
a few MiB of freed heap for reuse. It is process-wide, idempotent, and a no-op where glibc is absent.

The price is memory that stays after a burst: an attack that parked streams on 32 connections left a daemon
18-46 MB larger after it ended (`bench.hostile`). So the Host gives the freed heap back every
TRIM_INTERVAL_S (`give_back_freed_memory`: glibc's malloc_trim, which also releases free pages in the
middle of the heap): 14 ms to release 195 MB here, 0.02 ms when there is nothing to release, and a
transfer in flight faults its few MiB of frames back in once per interval, not once per frame.
"""

import ctypes
import ctypes.util
import logging
import sys

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
# Free heap kept before trimming: several windows' worth of frames in flight (a 16 MiB stream window).
TRIM_THRESHOLD = 64 * 1024 * 1024
# Allocations below this come from the heap, not from a fresh mmap (which faults on every use): covers
# uvloop's 256 KiB reads and our 1 MiB write steps with room to spare. glibc caps it at 32 MiB.
MMAP_THRESHOLD = 4 * 1024 * 1024

TRIM_INTERVAL_S = 5.0

_done = False
_libc: ctypes.CDLL | None = None


def keep_freed_memory() -> bool:
    """Apply the thresholds once per process; True when glibc accepted them."""
    global _done
    if _done:
        return True
    _done = True
    if not sys.platform.startswith("linux"):
        return False
    libc = _glibc()
    if libc is None:
        return False
    mallopt = libc.mallopt
    ok = bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)) and bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    log.debug("glibc allocator thresholds %s", "raised" if ok else "refused")
    return ok


def give_back_freed_memory() -> bool:
    """Return the freed heap to the kernel now (glibc's malloc_trim); False where glibc is absent."""
    libc = _glibc()
    return libc is not None and bool(libc.malloc_trim(0))


def _glibc() -> ctypes.CDLL | None:
    global _libc
    if _libc is None and sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            libc.mallopt, libc.malloc_trim  # noqa: B018 - both must exist (glibc): musl lacks malloc_trim
        except (OSError, AttributeError):  # musl or another libc: nothing to tune
            return None
        _libc = libc
    return _libc
