"""What one Ray Train launch costs before any training: a TorchTrainer whose workers only
report once, on a local Ray, timed in wall seconds and in the machine's busy core-seconds.

The baseline is one fresh Python process importing ``ray.train.torch`` (what each Ray Train
worker imports); the ratio says how many such processes' worth of CPU a launch costs. This is
the floor under every Ray Train test and every Tune trial, so it bounds the suite's time.
Linux only (``/proc``); run it on an otherwise idle machine. ``--per-process`` also samples
every process's CPU time during the last launch and prints where it went, by process name
(Ray names its actors' processes ``ray::Class``); a process's last 0.1 s before it exits can
be missed.

    python benchmarks/train_launch.py --launches 3 --workers 2 [--per-process]
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable


def busy_core_seconds() -> float:
    """CPU time the whole machine has spent busy (not idle or waiting on I/O), in seconds."""
    with open("/proc/stat") as fh:
        fields = [int(v) for v in fh.readline().split()[1:]]
    return (sum(fields) - fields[3] - fields[4]) / 100.0


def measured(fn: Callable[[], object]) -> tuple[float, float]:
    """Wall seconds and busy core-seconds of ``fn()``."""
    cpu, wall = busy_core_seconds(), time.perf_counter()
    fn()
    return time.perf_counter() - wall, busy_core_seconds() - cpu


class ProcessClock:
    """CPU seconds of every process on the machine while it runs, sampled from ``/proc``."""

    def __init__(self, every_s: float = 0.1) -> None:
        self.every_s, self.names, self.start, self.last = every_s, {}, {}, {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def __enter__(self) -> ProcessClock:
        self._sample(self.start)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _poll(self) -> None:
        while not self._stop.wait(self.every_s):
            self._sample(self.last)

    def _sample(self, into: dict[int, float]) -> None:
        tick = os.sysconf("SC_CLK_TCK")
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            pid = int(entry)
            try:
                with open(f"/proc/{pid}/stat") as fh:
                    fields = fh.read().rsplit(")", 1)[1].split()
                with open(f"/proc/{pid}/cmdline") as fh:
                    name = fh.read().split("\0")[0]
                # The latest name: a Ray worker starts as python and renames itself ray::Class
                # once it becomes an actor; an exiting process reads empty.
                if name:
                    self.names[pid] = os.path.basename(name) if "/" in name else name
            except OSError:
                continue
            into[pid] = (int(fields[11]) + int(fields[12])) / tick

    def by_name(self) -> list[tuple[float, int, str]]:
        """``(core-seconds, processes, name)``, most first, for what used over 0.1 s."""
        spent: dict[str, float] = collections.defaultdict(float)
        count: collections.Counter[str] = collections.Counter()
        for pid, cpu in self.last.items():
            used = cpu - self.start.get(pid, 0.0)
            if used > 0.1:
                name = self.names.get(pid, "?")
                spent[name] += used
                count[name] += 1
        return sorted(((v, count[k], k) for k, v in spent.items()), reverse=True)


def import_baseline() -> tuple[float, float]:
    command = [sys.executable, "-c", "import ray.train.torch"]
    return measured(lambda: subprocess.run(command, check=True))


def report_once() -> None:
    import ray.train

    ray.train.report({"done": 1})


def launch(workers: int, storage: str, name: str) -> None:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    run = RunConfig(storage_path=storage, name=name)
    TorchTrainer(
        report_once, scaling_config=ScalingConfig(num_workers=workers), run_config=run
    ).fit()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--launches", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--per-process", action="store_true", help="CPU by process, last launch")
    args = parser.parse_args(argv)
    if args.launches < 1 or args.workers < 1:
        parser.error("--launches and --workers must be at least 1")
    import ray

    base_wall, base_cpu = import_baseline()
    print(
        f"baseline: import ray.train.torch in a fresh process, {base_wall:.1f} s wall, "
        f"{base_cpu:.1f} core-s",
        flush=True,
    )
    ray.init(num_cpus=args.workers)
    time.sleep(5)  # let Ray's own start-up settle before the clock runs
    costs = []
    with tempfile.TemporaryDirectory(prefix="cmray-launch-") as storage:
        for i in range(args.launches):
            clock = ProcessClock() if args.per_process and i == args.launches - 1 else None
            with clock or contextlib.nullcontext():
                wall, cpu = measured(lambda i=i: launch(args.workers, storage, f"launch{i}"))
            costs.append((wall, cpu))
            print(f"launch {i}: {wall:.1f} s wall, {cpu:.1f} core-s", flush=True)
            for used, processes, name in clock.by_name() if clock else []:
                print(f"  {used:5.1f} core-s  {processes} x {name}", flush=True)
    actors = sorted({a["ActorClassName"] for a in ray._private.state.actors().values()})
    ray.shutdown()
    wall = sorted(c[0] for c in costs)[len(costs) // 2]
    cpu = sorted(c[1] for c in costs)[len(costs) // 2]
    print(f"actor classes started: {', '.join(actors)}")
    print(
        f"median launch: {wall:.1f} s wall, {cpu:.1f} core-s; ratio {cpu / base_cpu:.1f} "
        f"imports' worth of CPU"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
