"""Keep the server's native memory bounded. Called once, before torch or ONNX Runtime is imported.

Under long QA with varying batch shapes the resident memory grew linearly (0.8 → 3.3 GB in two minutes)
with no plateau; calling the torch backend directly with varying shapes did the same, and it stayed flat
with a small fixed malloc mmap threshold or with oneDNN's primitive cache off (issue 12). Two mechanisms,
bounded here and in the batcher (benchmarks/soak.py shows the plateau):
- glibc malloc: a freed buffer larger than the mmap threshold is returned to the OS, but glibc raises
  that threshold each time such a buffer is freed (up to 32 MiB), after which the per-batch activation
  buffers (MBs, a different size for every batch shape) come from the heap, whose fragments are rarely
  returned; each thread that allocates also gets its own arena. Fixing the threshold (which also turns
  off its dynamic growth) and capping the arenas bounds that.
- oneDNN caches a primitive (with its scratch buffers) per distinct shape: the batcher rounds padded
  lengths to a few buckets, and the cache capacity is capped.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

log = logging.getLogger("moebert.server")

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8  # glibc <malloc.h>
MMAP_THRESHOLD = 256 << 10  # buffers ≥ 256 KiB (batch activations) come from mmap and go back on free
TRIM_THRESHOLD = 32 << 20
ARENA_MAX = 2
ONEDNN_CACHE = "256"  # primitives (default 1024): enough for every bucket × batch-size shape in use


def bound_native_memory() -> None:
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", ONEDNN_CACHE)  # read when oneDNN first runs
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):  # not glibc (musl, macOS): nothing to tune
        return
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    settings = {M_MMAP_THRESHOLD: MMAP_THRESHOLD, M_TRIM_THRESHOLD: TRIM_THRESHOLD, M_ARENA_MAX: ARENA_MAX}
    for param, value in settings.items():
        if os.environ.get(_ENV[param]) is None and mallopt(param, value) != 1:  # the env var wins
            log.warning("mallopt(%d, %d) failed", param, value)


_ENV = {
    M_MMAP_THRESHOLD: "MALLOC_MMAP_THRESHOLD_",
    M_TRIM_THRESHOLD: "MALLOC_TRIM_THRESHOLD_",
    M_ARENA_MAX: "MALLOC_ARENA_MAX",
}
