"""What the benchmark scripts share: device timing fences and the header describing the machine."""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

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


def peak_mib() -> float:
    """This process's peak resident memory so far. Linux's VmHWM, not getrusage's ru_maxrss,
    which a child inherits from the parent that forked it."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024  # kB
    raise RuntimeError("no VmHWM in /proc/self/status: this benchmark needs Linux")


def child_json(script: str, *args: str) -> dict:
    """Run ``script --child ARGS`` in a fresh process (its own peak memory) and return the JSON
    of its last line; a failure ends the benchmark with the child's error."""
    done = subprocess.run(
        [sys.executable, script, "--child", *args], capture_output=True, text=True
    )
    if done.returncode:
        raise SystemExit(f"{' '.join(args)} failed: {done.stderr.strip()[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])
