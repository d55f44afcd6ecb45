"""Peak memory of one benchmark cell: torch's CUDA allocator on a GPU, the process's peak RSS on a CPU.

The CPU number is a process-level high-water mark (Linux VmHWM, reset per cell through /proc/self/clear_refs where
the kernel allows), so it bounds the model's footprint from above; ``MEMORY_SCOPES`` says which measurement a cell's
``memory_scope`` names, and every bench.json carries those words.
"""

from __future__ import annotations

import resource
import sys

import torch

# What ``BenchCell.peak_memory_bytes`` means, by ``BenchCell.memory_scope``.
MEMORY_SCOPES = {
    "cuda-allocator": "torch.cuda.max_memory_allocated during the cell, reset at its start: weights, input, "
    "activations and workspace allocated through torch's CUDA allocator (not the CUDA context, not cached blocks)",
    "process-rss-cell": "peak resident set size of the whole benchmark process during the cell (Linux VmHWM, reset "
    "at the cell's start through /proc/self/clear_refs): includes the Python interpreter, every imported library "
    "and every model loaded so far, so it is an upper bound, not the model's own footprint",
    "process-rss-lifetime": "peak resident set size of the whole process since it started (getrusage ru_maxrss; "
    "this platform cannot reset it): a process-level high-water mark, never lower than any earlier cell's",
    "unmeasured": "not measured: this backend allocates GPU memory outside torch's allocator",
}


class PeakMemory:
    """Peak memory of one cell. ``cuda`` is the device whose torch allocator is tracked (torch backends on a GPU);
    otherwise a CPU cell tracks the process's peak RSS and a GPU cell of another library reports None."""

    def __init__(self, cuda: torch.device | None, device: torch.device) -> None:
        self.cuda = cuda
        if cuda is not None:
            self.scope = "cuda-allocator"
        elif device.type == "cuda":
            self.scope = "unmeasured"
        else:
            self.scope = "process-rss-cell" if _reset_rss_peak() else "process-rss-lifetime"

    def reset(self) -> None:
        """Start the measurement window (called after the cell's input is allocated, before warm-up)."""
        if self.cuda is not None:
            torch.cuda.synchronize(self.cuda)
            torch.cuda.reset_peak_memory_stats(self.cuda)
        elif self.scope == "process-rss-cell" and not _reset_rss_peak():
            self.scope = "process-rss-lifetime"

    def peak(self) -> int | None:
        """Peak bytes since ``reset`` (see ``MEMORY_SCOPES[self.scope]``), or None when unmeasured."""
        if self.cuda is not None:
            return int(torch.cuda.max_memory_allocated(self.cuda))
        if self.scope == "unmeasured":
            return None
        if self.scope == "process-rss-cell":
            hwm = _read_vm_hwm()
            if hwm is not None:
                return hwm
            self.scope = "process-rss-lifetime"
        # ru_maxrss is in KiB on Linux and in bytes on macOS.
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(rss if sys.platform == "darwin" else rss * 1024)


def _reset_rss_peak() -> bool:
    # Writing "5" to clear_refs resets the process's peak RSS (VmHWM) to its current RSS (Linux >= 4.0).
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        return False
    return _read_vm_hwm() is not None


def _read_vm_hwm() -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # the kernel reports kB
    except (OSError, ValueError, IndexError):
        return None
    return None
