"""Time and peak memory of one callable, on CPU or CUDA.

Memory is the peak of bytes allocated by torch while the callable runs, above what was live when it
started (inputs, parameters, anything the caller holds):

* CUDA: the caching allocator's own statistics (``reset_peak_memory_stats`` then
  ``max_memory_allocated`` minus ``memory_allocated`` before the call).
* CPU: torch 2.13 keeps no statistics for its CPU allocator, so the callable runs under
  ``torch.profiler.profile(profile_memory=True)``, which receives a signed event from c10's CPU
  allocator for every allocation and free (tensors made by eager ops, autograd, inductor's generated
  code and third-party libraries built on torch alike); the running sum of those events, in time
  order, gives the live bytes, and its maximum is the peak. Memory that does not come from torch's
  allocator (numpy arrays, oneDNN scratch space) is not seen; :func:`peak_rss_bytes` covers that
  where it matters (the metrics benchmark).

The profiled run is separate from the timed runs, so the profiler's overhead never enters a time.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import statistics
import time
from typing import Callable

import torch

# Kineto logs a line at every profiler start and stop (below level 6); one profiled run per
# measurement would bury the progress output.
os.environ.setdefault("KINETO_LOG_LEVEL", "6")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(
    fn: Callable[[], object], device: torch.device, repeats: int, setup: Callable[[], None]
) -> list[float]:
    """Wall time of ``repeats`` calls of ``fn``, each after an untimed ``setup()``."""
    times = []
    for _ in range(repeats):
        setup()
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return times


def summarize(times: list[float]) -> dict:
    return {
        "median_s": statistics.median(times),
        "min_s": min(times),
        "max_s": max(times),
        "repeats": len(times),
    }


_BACKWARD_MARK = "benchmarks.backward"


def peak_bytes(
    forward: Callable[[], object], backward: Callable[[object], object], device: torch.device
) -> tuple[int, int]:
    """Peak bytes torch allocates above what was live before, during ``out = forward()`` and
    during the whole of ``forward()`` then ``backward(out)``: one run gives both.

    Tensors freed during the call that were allocated before it do not lower the count: the
    profiler ignores frees of blocks it did not see allocated, and CUDA's baseline is taken here.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        out = forward()
        torch.cuda.synchronize(device)
        peak_forward = torch.cuda.max_memory_allocated(device) - base
        backward(out)
        del out
        torch.cuda.synchronize(device)
        return peak_forward, torch.cuda.max_memory_allocated(device) - base
    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True
    ) as prof:
        out = forward()
        with torch.profiler.record_function(_BACKWARD_MARK):
            backward(out)
        del out
    events = list(prof.profiler.kineto_results.events())
    (split,) = [e.start_ns() for e in events if e.name() == _BACKWARD_MARK]
    memory = [e for e in events if e.name() == "[memory]"]
    # Sorting is stable: events of one thread stay in the order the allocator reported them.
    memory.sort(key=lambda e: e.start_ns())
    live = peak = peak_forward = 0
    for e in memory:
        live += e.nbytes()
        peak = max(peak, live)
        if e.start_ns() < split:
            peak_forward = peak
    return peak_forward, peak


def _malloc_trim() -> None:
    """Hand freed heap pages back to the OS, so that reused pages do not hide new allocations."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise OSError(f"{field} not in /proc/self/status")


def peak_rss_bytes(fn: Callable[[], object]) -> int | None:
    """Rise of the process's resident-set high-water mark while ``fn()`` runs (Linux only).

    Counts every allocator (numpy, faiss, oneDNN) but only pages actually touched, after the
    high-water mark is reset through ``/proc/self/clear_refs``. ``None`` where that is unavailable.
    """
    gc.collect()
    _malloc_trim()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = _status_kib("VmRSS")
    except OSError:
        return None
    fn()
    return max(0, _status_kib("VmHWM") - base)


def mem_available() -> int | None:
    """``MemAvailable`` of /proc/meminfo in bytes: what can be allocated without swapping."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def is_out_of_memory(err: BaseException) -> bool:
    if isinstance(err, torch.OutOfMemoryError | MemoryError):
        return True
    text = str(err).lower()
    return "out of memory" in text or "can't allocate memory" in text


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
