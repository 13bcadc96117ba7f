"""What the benchmark scripts share: device timing fences and the header describing the machine."""

from __future__ import annotations

import os
import platform

import torch


def sync(device: torch.device) -> None:
    """Wait for queued CUDA work, so a timer measures the work and not its launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def load_average() -> str:
    """The 1-minute load average: other processes on a small machine skew CPU timings."""
    return f"{os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else "n/a"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    return f"CPU {cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch thread(s)"
