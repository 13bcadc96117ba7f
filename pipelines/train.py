"""Train a consistency model (CD or CT) or an EDM teacher on Ray Train.

    python pipelines/train.py --config configs/lsun_bedroom256_cd_lpips.yaml [--set loop.steps=1000]
    python pipelines/train.py --config configs/digits_ct.yaml --local     # one process, no Ray

The config is validated before Ray starts. Re-running the same command (same run.name and
run.storage_path) continues from the newest checkpoint. On a cluster, set RAY_ADDRESS or submit
this script as a Ray job; otherwise a local Ray with the workers' CPUs is started.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from cmray.config import add_config_args, config_from_args, exit_on_config_error
from cmray.train.config import TrainConfig


def _local_device(cfg: TrainConfig) -> str:
    """``--local`` trains on the GPU when the config asks for one and one is visible."""
    import torch

    if not cfg.run.use_gpu:
        return "cpu"
    if torch.cuda.is_available():
        return "cuda"
    print("run.use_gpu is set but no CUDA device is visible: training on the CPU")
    return "cpu"


def _start_ray(cfg: TrainConfig) -> None:
    from cmray.cluster import ray_init

    ray_init(max(int(cfg.run.max_workers * cfg.run.cpus_per_worker + 0.999), 1))


@exit_on_config_error
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_config_args(parser)
    parser.add_argument("--local", action="store_true", help="train in this process, no Ray")
    args = parser.parse_args(argv)
    cfg = config_from_args(TrainConfig, args)  # every mistake surfaces here, before Ray
    start = time.perf_counter()
    if args.local:
        from cmray.train.loop import PreemptedError, run_local
        from cmray.train.worker import preflight

        preflight(cfg)
        out = Path(cfg.run.location)
        device = _local_device(cfg)
        try:
            run_local(
                cfg,
                out,
                log=lambda m: print(f"[{time.perf_counter() - start:7.1f}s] {m}"),
                device=device,
            )
        except PreemptedError as stop:
            print(f"SIGTERM: {stop}; run the same command again to continue", file=sys.stderr)
            return 128 + 15  # the shell's code for a SIGTERM-ended process
        print(f"checkpoints in {out / 'checkpoints'}")
        return 0
    from cmray.train.worker import absolute_paths, launch, preflight

    preflight(absolute_paths(cfg))  # the data and teacher exist, before Ray starts
    _start_ray(cfg)
    result = launch(cfg)
    elapsed = time.perf_counter() - start
    if not result.metrics:  # resumed a run that had already reached loop.steps
        print(
            f"[{elapsed:7.1f}s] {cfg.run.name} had already finished; newest checkpoint "
            f"{result.checkpoint.path if result.checkpoint else 'none'}"
        )
        return 0
    print(
        f"[{elapsed:7.1f}s] finished at step {result.metrics['step']}; loss "
        f"{result.metrics['loss']:.4g}; checkpoint {result.checkpoint.path}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
