"""Hands the memory a round's phase freed back to the OS before the next phase starts, and (for benchmarks)
measures each phase's peak.

glibc keeps freed heap memory for reuse, and torch's tensors of a few MiB come from that heap once glibc's
mmap threshold has risen past them: after an inner step, an outer step and an evaluation the worker held
2.5 models of gpt2-small freed but mapped, which the next phase's different sizes did not fit into, so its
peak stacked on top of them. `malloc_trim` returns the free pages: at most 36 ms a call with gpt2-small
or base, and the inner steps that follow took the same time (2.13 against 2.06 s, 4.78 against 4.81 s).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import os
from collections.abc import Callable, Iterator
from pathlib import Path

PHASE_PEAKS_ENV = "SHOAL_WORKER_PHASE_PEAKS"


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim, or None where the C library has none (musl, macOS)."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        trim = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def release_free_memory() -> None:
    """Returns the C heap's free pages to the OS, where the C library can; a no-op elsewhere."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


class PhasePeaks:
    """The resident set's peak (VmHWM) in each phase of a round, for the round's `eval` event: which phase
    decides the worker's peak. Only where PHASE_PEAKS_ENV is "1" (benchmarks set it): the peak is reset
    through /proc/self/clear_refs as each phase begins, so that the process's own VmHWM, which monitoring
    tools read, then tells only the current phase's. Elsewhere, and where /proc is read-only, `peaks` stays
    empty."""

    def __init__(self) -> None:
        self.peaks: dict[str, int] = {}  # phase -> MiB, the highest since the last `take`
        self._on = os.environ.get(PHASE_PEAKS_ENV) == "1" and _reset_peak()

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Measures the peak from now to the phase's end (what a background thread allocates meanwhile,
        such as the checkpoint writer, counts in it)."""
        if not self._on:
            yield
            return
        _reset_peak()
        try:
            yield
        finally:
            peak = _peak_mib()
            if peak is not None:
                self.peaks[name] = max(self.peaks.get(name, 0), peak)

    def take(self) -> dict[str, int]:
        """The peaks since the last call, and a fresh start."""
        peaks, self.peaks = self.peaks, {}
        return peaks


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _peak_mib() -> int | None:
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) // 1024
    return None
