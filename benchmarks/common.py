"""What the benchmark scripts share: device timing fences and the header describing the machine."""

from __future__ import annotations

import datetime
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


def start(device: str, threads: int | None) -> torch.device:
    """Every benchmark's start: torch's CPU threads (2 on a CPU unless given) and a first line
    with the date and the load average."""
    where = torch.device(device)
    if threads is None and where.type == "cpu":
        threads = 2
    if threads is not None:
        torch.set_num_threads(threads)
    print(f"date: {datetime.datetime.now().isoformat(timespec='seconds')}; load {load_average()}")
    return where
