"""What one Ray Train launch costs before any training: a TorchTrainer whose workers only
report once, on a local Ray, timed in wall seconds and in the machine's busy core-seconds.

The baseline is one fresh Python process importing ``ray.train.torch`` (what each Ray Train
worker imports); the ratio says how many such processes' worth of CPU a launch costs. This is
the floor under every Ray Train test and every Tune trial, so it bounds the suite's time.
Linux only (``/proc/stat``); run it on an otherwise idle machine.

    python benchmarks/train_launch.py --launches 3 --workers 2
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
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
            wall, cpu = measured(lambda i=i: launch(args.workers, storage, f"launch{i}"))
            costs.append((wall, cpu))
            print(f"launch {i}: {wall:.1f} s wall, {cpu:.1f} core-s", flush=True)
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
