"""glibc's malloc for CPU stages: keep freed memory for the next micro-batch and step.

[Note: CPU allocator]
A CPU stage allocates its activations and gradients from malloc, afresh every micro-batch
and step (``zero_grad(set_to_none=True)`` frees the gradients between steps). With glibc's
defaults that memory goes back to the OS as soon as it is freed: blocks over the mmap
threshold (128 KiB, raised as big blocks are freed, up to 32 MiB) are unmapped, a heap's free
top is trimmed past twice that, and each worker thread allocates from an arena of its own;
the workers of a call exit with it, so the next call's workers may take each other's arenas.
So every step touches fresh pages, and the kernel zeroes each 4 KiB one on first touch:
measured on the 8 x 1024 MLP of ``benchmarks/training.py``, 2 stages, 4 micro-batches,
~20,000 minor page faults per training step, 72 ms a step against 47 ms without them.

So before a `Pipeline` with CPU stages starts its first worker (and when a CPU rank of
`runtime.distributed` builds its stages), `keep_freed_memory` sets,
process-wide and once: ``M_MMAP_THRESHOLD`` and ``M_TRIM_THRESHOLD`` to `KEEP` (256 MiB: a
freed block up to that size stays in the heap for the next allocation, and a heap keeps up
to that much free memory at its top), and ``M_ARENA_MAX`` to 1 (every thread allocates from
the main arena, so memory one worker frees the next call's workers reuse). These are the
settings of glibc's ``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_`` and
``MALLOC_ARENA_MAX`` environment variables; the cost is that the process's resident memory
stays at its high-water mark instead of shrinking after a step, and that threads share one
arena's lock (torch allocates once per tensor, not per element).

It is left alone where it is not glibc's malloc to tune, or the user chose: not on Linux with
glibc, when ``LD_PRELOAD`` names another allocator (jemalloc, tcmalloc, mimalloc), when any of
those ``MALLOC_*`` variables or a ``glibc.malloc`` tunable (``GLIBC_TUNABLES``) is set, with
``MODELSPLIT_MALLOC=system`` in the environment, or with ``Pipeline(..., malloc="system")``.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys
import threading

__all__ = ["KEEP", "MALLOC_MODES", "check_malloc", "keep_freed_memory", "malloc_tuned"]

log = logging.getLogger(__name__)

#: bytes of freed memory malloc keeps (mmap and trim thresholds)
KEEP = 256 * 1024 * 1024
#: what ``Pipeline(malloc=...)`` takes: tune glibc's malloc ("keep") or leave it ("system")
MALLOC_MODES = ("keep", "system")

# mallopt's parameter numbers (glibc's malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
_USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_ARENA_MAX")
_OTHER_ALLOCATORS = ("jemalloc", "tcmalloc", "mimalloc", "hoard", "snmalloc")

_lock = threading.Lock()
_state: dict[str, bool | str] = {}


def malloc_tuned() -> bool:
    """Whether `keep_freed_memory` changed malloc's settings in this process."""
    return bool(_state.get("tuned", False))


def check_malloc(mode: str) -> None:
    """ValueError unless ``mode`` is one of `MALLOC_MODES`."""
    if mode not in MALLOC_MODES:
        raise ValueError(f"malloc must be one of {MALLOC_MODES} (got {mode!r})")


def keep_freed_memory(mode: str = "keep") -> bool:
    """Set glibc's malloc to keep freed memory ([Note: CPU allocator]), once per process;
    True if it is (now or already) set. ``mode="system"`` leaves malloc as it is."""
    check_malloc(mode)
    env = os.environ.get("MODELSPLIT_MALLOC", "keep") or "keep"
    if env not in MALLOC_MODES:
        raise ValueError(
            f"the environment variable MODELSPLIT_MALLOC must be one of {MALLOC_MODES} (got "
            f"{env!r}): 'system' leaves glibc's malloc as it is"
        )
    if mode == "system" or env == "system":
        return malloc_tuned()
    with _lock:
        if "tuned" in _state:
            return malloc_tuned()
        why = _why_not()
        if why:
            log.debug("malloc left as it is: %s", why)
            _state.update(tuned=False, why=why)
            return False
        libc = ctypes.CDLL(None)
        settings = ((_M_MMAP_THRESHOLD, KEEP), (_M_TRIM_THRESHOLD, KEEP), (_M_ARENA_MAX, 1))
        ok = all([libc.mallopt(param, value) == 1 for param, value in settings])  # each one
        _state.update(tuned=ok, why="" if ok else "mallopt refused a setting")
        if ok:
            log.info(
                "malloc set to keep up to %d MiB of freed memory in one arena for CPU stages "
                "(MODELSPLIT_MALLOC=system leaves it alone)",
                KEEP >> 20,
            )
        else:
            log.warning("malloc left partly as it was: glibc's mallopt refused a setting")
        return ok


def _why_not() -> str:
    """Why malloc is not ours to tune here ('' if it is)."""
    if not sys.platform.startswith("linux"):
        return f"not Linux ({sys.platform})"
    try:
        libc = ctypes.CDLL(None)
        version = libc.gnu_get_libc_version
    except (OSError, AttributeError):
        return "not glibc"
    version.restype = ctypes.c_char_p
    if not version() or not hasattr(libc, "mallopt"):
        return "not glibc"
    preload = os.environ.get("LD_PRELOAD", "").lower()
    other = [name for name in _OTHER_ALLOCATORS if name in preload]
    if other:
        return f"LD_PRELOAD brings {other[0]}"
    chosen = [name for name in _USER_SETTINGS if name in os.environ]
    if "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        chosen.append("GLIBC_TUNABLES")
    if chosen:
        return f"the environment sets {chosen[0]}"
    return ""
