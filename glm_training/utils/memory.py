"""Peak memory of each training step: CUDA allocator peaks on GPU, the process's peak RSS on CPU.

`memory_stats()` returns the peak since its previous call and starts a new window, so the trainer
logs one figure per step. On CPU the peak resident set (VmHWM) is reset through
/proc/self/clear_refs (Linux >= 4.0); where that is not possible the figure is the peak of the
whole process so far (getrusage).
"""

from __future__ import annotations

import resource
import sys
from pathlib import Path

import torch

GB = 1024 ** 3
_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_kib(field: str) -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def current_rss_bytes() -> int:
    kib = _status_kib("VmRSS")
    if kib is not None:
        return kib * 1024
    return peak_rss_bytes()


def peak_rss_bytes() -> int:
    """Peak resident set since the last `reset_peak_rss()` (or the process start)."""
    kib = _status_kib("VmHWM")
    if kib is not None:
        return kib * 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


def reset_peak_rss() -> bool:
    """Start a new peak-RSS window; False where the OS does not allow it."""
    try:
        _CLEAR_REFS.write_text("5")  # "5": reset the peak RSS to the current RSS
        return True
    except OSError:
        return False


def memory_stats(device: torch.device | str | None = None, reset: bool = True) -> dict[str, float]:
    """Peak memory since the previous call, in GiB: `memory/peak_allocated_gb` and
    `memory/peak_reserved_gb` on CUDA, `memory/peak_rss_gb` on CPU (and the current RSS)."""
    device = torch.device(device) if device is not None else (
        torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu"))
    if device.type == "cuda":
        stats = {"memory/peak_allocated_gb": torch.cuda.max_memory_allocated(device) / GB,
                 "memory/peak_reserved_gb": torch.cuda.max_memory_reserved(device) / GB}
        if reset:
            torch.cuda.reset_peak_memory_stats(device)
        return stats
    stats = {"memory/peak_rss_gb": peak_rss_bytes() / GB, "memory/rss_gb": current_rss_bytes() / GB}
    if reset:
        reset_peak_rss()
    return stats
