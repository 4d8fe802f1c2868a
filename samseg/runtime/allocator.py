"""glibc malloc tuning for CPU inference: the one place samseg sets it (issue #18).

SAM-2's per-prompt decoder activations are tens of MB. Above glibc's mmap threshold (128 KiB at start,
raised dynamically up to 32 MiB as blocks are freed) every such tensor is mmapped, first-touch faulted page
by page and unmapped again on free: at 16 prompts per chunk that was ~7 M minor faults and 10-11 s of
*system* CPU per 1024-prompt image on 2 cores. Below the threshold the blocks come from the heap and are
reused without faults, provided the heap top is not trimmed back to the kernel after every chunk.

`tune_allocator()` fixes both with `mallopt` at run time, so it holds however the process was started
(worker, `samseg segment`, `samseg up`, an image, a notebook) without relying on environment variables,
which glibc reads only once, before `main`. Setting M_MMAP_THRESHOLD explicitly also switches off glibc's
dynamic threshold, whose slow settling made the fault count relapse between images.

It is called by `samseg.runtime.build.build_model`, i.e. by every path that loads the model, and is a no-op
(returning False) off glibc, when disabled by settings, or when `MALLOC_MMAP_THRESHOLD_` is already set in
the environment (an operator's explicit choice wins). Cost: freed memory at the heap top is kept for reuse,
so a worker's RSS stays near its high-water mark (for tiny at 1024x768: a few hundred MB) instead of
shrinking between images.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import threading

import structlog

log = structlog.get_logger(__name__)

# glibc <malloc.h>
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3

# 32 MiB is glibc's ceiling for M_MMAP_THRESHOLD on 64-bit (HEAP_MAX_SIZE / 2); blocks above it are still
# mmapped, which is why the CPU chunk of prompts is kept small (4 prompts: ~16 MB per activation).
MMAP_THRESHOLD = 32 * 1024 * 1024
# mallopt takes an int: 1 GiB of free heap top is kept before glibc gives memory back.
TRIM_THRESHOLD = 1024 * 1024 * 1024

_lock = threading.Lock()
_applied: dict[int, bool] = {}  # pid -> outcome: mallopt settings are per process (inherited by fork)


def tune_allocator(enabled: bool = True) -> bool:
    """Apply the thresholds to this process once; True if they are in effect (now or from before)."""
    if not enabled:
        return False
    pid = os.getpid()
    with _lock:
        if pid in _applied:
            return _applied[pid]
        _applied[pid] = result = _apply()
        return result


def _apply() -> bool:
    if "MALLOC_MMAP_THRESHOLD_" in os.environ or "MALLOC_TRIM_THRESHOLD_" in os.environ:
        log.info("allocator_tuning_skipped", reason="MALLOC_*_ environment variables set")
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS, Windows): nothing to tune
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    ok = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    log.info("allocator_tuned", ok=ok, mmap_threshold=MMAP_THRESHOLD, trim_threshold=TRIM_THRESHOLD)
    return ok
