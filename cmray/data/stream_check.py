"""Stream a dataset on Ray Train workers without training: the data path's smoke test.

Each rank reads its share for some epochs and all-reduces once per batch, exactly where a DDP
step would; unequal batch counts would hang here rather than hours into a run. Rank 0 reports
every rank's batch count, images/s and fault counts.

    python -m cmray.data.stream_check --manifest s3://bucket/lsun/bedroom256 --workers 8
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from typing import Any

from cmray.config import from_dict, to_dict
from cmray.data.config import StreamConfig


def stream_worker(config: dict[str, Any]) -> None:
    """Ray Train loop: stream ``epochs`` epochs, then report per-rank results from rank 0."""
    import ray.train
    import ray.train.torch
    import torch
    import torch.distributed as dist

    from cmray.data.stream import ShardStream

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    # With GPUs the process group is NCCL, which reduces only CUDA tensors.
    device = ray.train.torch.get_device()
    stream = ShardStream(from_dict(StreamConfig, config["data"]), rank, world, device=device)
    batches, images, start = 0, 0, time.perf_counter()
    for epoch in range(config["epochs"]):
        stream.set_epoch(epoch)
        for batch in stream:
            total = batch["image"].sum().reshape(1)
            dist.all_reduce(total)  # a rank short of batches would leave the others waiting here
            batches, images = batches + 1, images + len(batch["key"])
    stats = stream.stats
    mine = [batches, images, images / (time.perf_counter() - start), *stats.values()]
    gathered = [torch.zeros(len(mine), dtype=torch.float64, device=device) for _ in range(world)]
    dist.all_gather(gathered, torch.tensor(mine, dtype=torch.float64, device=device))
    names = ["batches", "images", "images_per_s", *stats]
    per_rank = [dict(zip(names, row.cpu().tolist(), strict=True)) for row in gathered]
    # Ray Train V2 keeps only metrics that come with a checkpoint, so rank 0 attaches a tiny one.
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = ray.train.Checkpoint.from_directory(tmp) if rank == 0 else None
        ray.train.report({"ranks": json.dumps(per_rank)}, checkpoint=checkpoint)


def check_stream(
    cfg: StreamConfig,
    workers: int,
    epochs: int = 1,
    use_gpu: bool = False,
    storage_path: str | None = None,
) -> list[dict[str, float]]:
    """Run ``stream_worker`` on ``workers`` Ray Train workers; per-rank results."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    trainer = TorchTrainer(
        stream_worker,
        train_loop_config={"data": to_dict(cfg), "epochs": epochs},
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu),
        run_config=RunConfig(name=f"stream-check-{int(time.time())}", storage_path=storage_path),
    )
    return json.loads(trainer.fit().metrics["ranks"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--manifest", required=True, help="dataset or manifest.json URL")
    parser.add_argument("--workers", type=int, default=2, help="Ray Train workers")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=64, help="the global batch")
    parser.add_argument("--loaders", type=int, default=2, help="DataLoader processes per rank")
    parser.add_argument("--gpu", action="store_true", help="one GPU per worker")
    args = parser.parse_args(argv)
    cfg = StreamConfig(manifest=args.manifest, batch_size=args.batch_size, num_workers=args.loaders)
    for rank, row in enumerate(check_stream(cfg, args.workers, args.epochs, args.gpu)):
        print(f"rank {rank}: " + ", ".join(f"{k} {v:g}" for k, v in row.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
