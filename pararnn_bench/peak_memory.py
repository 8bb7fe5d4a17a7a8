"""Peak memory of one call above what was in use when it started, per backend.

- torch CUDA: the caching allocator's peak statistics.
- MLX: ``mx.get_peak_memory`` (CPU and GPU).
- torch CPU: torch keeps no CPU statistics, so the process's peak resident set (Linux
  ``VmHWM``, reset through ``/proc/self/clear_refs``) minus the resident set at the
  start. glibc is first told to serve every block over 64 KiB with its own mmap and
  to give freed memory back at once, so freed tensors leave the resident set and
  the next call's peak is its own. That setting stays for the rest of the process and makes
  large allocations slower, so a benchmark takes its timings before its first such measurement.
"""

from __future__ import annotations

import ctypes
import gc
import sys
from collections.abc import Callable
from functools import lru_cache

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


@lru_cache(maxsize=1)
def _libc():
    """glibc, told once to serve blocks over 64 KiB by mmap and to give freed memory back at once."""
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(_M_MMAP_THRESHOLD, 64 * 1024)
    libc.mallopt(_M_TRIM_THRESHOLD, 0)
    return libc


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def process_peak_supported() -> str | None:
    """None where the torch CPU measurement works; else why not."""
    if not sys.platform.startswith("linux"):
        return "torch CPU peak memory needs Linux (/proc/self/clear_refs); measured on torch CUDA and MLX only"
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError as error:
        return f"cannot reset the peak resident set ({error})"
    return None


def process_peak(fn: Callable[[], object]) -> int:
    """Bytes the process's resident set rose above its level at the start while ``fn`` ran.

    The fused CPU ops' pool of reusable outputs is emptied first, so what a call needs counts in its peak.
    """
    from pararnn_torch.fused import release_cpu_outputs

    libc = _libc()
    gc.collect()
    release_cpu_outputs()
    # free memory parked in glibc's per-thread arenas (torch's worker threads allocate there) stays resident,
    # so a later call reusing it would not show in the resident set: hand it back first
    libc.malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # peak resident set := current resident set
    start = _status_kb("VmRSS")
    fn()
    return max(0, _status_kb("VmHWM") - start) * 1024


def mlx_peak(fn: Callable[[], object]) -> int:
    import mlx.core as mx

    gc.collect()
    mx.clear_cache()
    start = mx.get_active_memory()
    mx.reset_peak_memory()
    fn()
    return max(0, mx.get_peak_memory() - start)


def cuda_peak(fn: Callable[[], object]) -> int:
    import torch

    gc.collect()
    torch.cuda.synchronize()
    start = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return max(0, torch.cuda.max_memory_allocated() - start)


def peak_for(backend) -> Callable[[Callable[[], object]], int] | str:
    """The measuring function for a pararnn_bench backend, or why it cannot measure."""
    if backend.framework == "mlx":
        return mlx_peak
    if backend.device.type == "cuda":
        return cuda_peak
    reason = process_peak_supported()
    return reason if reason else process_peak
