"""World-size independence, on real DDP ranks (gloo, one process each) without Ray: the same
global batch, examples and noise at 1, 2 or 3 ranks, and a checkpoint that resumes on another
rank count. Ray's part (preemption notices, elastic worker groups) is in test_train_ray."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import free_port

from cmray.config import from_dict, to_dict
from cmray.train.config import TrainConfig

# Float reduction order differs between 1 and W ranks (DDP sums per-rank gradients; one process
# sums the whole batch in its kernels), so runs agree to rounding, not bit for bit.
LOSS_RTOL, WEIGHT_ATOL = 1e-4, 1e-5


def elastic_config(manifest: str) -> dict:
    from test_train import tiny_config

    cfg = tiny_config(manifest, steps=4, checkpoint_every=2, log_every=1)
    cfg.net.dropout = 0.0  # dropout masks are drawn per rank
    cfg.data.batch_size = 8  # the global batch: 8, 4 + 4, or 2 + 3 + 3 on three ranks
    cfg.data.samples_per_epoch = 24  # 3 batches an epoch: the run crosses an epoch
    return to_dict(cfg)


def train_rank(
    rank: int, world: int, port: int, config: dict, out: str, resume: str, steps: int
) -> None:
    """One rank of a run to ``steps``: checkpoints every 2 steps under ``out``, optionally
    starting from the checkpoint ``resume``; rank 0 saves its per-step losses and weights."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from cmray.data.stream import ShardStream
    from cmray.train import state as ckpt
    from cmray.train.loop import Hooks, build_trainer, run_loop
    from cmray.train.state import unwrap

    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
        )
    cfg = from_dict(TrainConfig, config)
    cfg.loop.steps = steps
    wrap = DistributedDataParallel if world > 1 else (lambda m: m)
    trainer = build_trainer(cfg, torch.device("cpu"), rank, world, wrap=wrap)
    if resume:
        ckpt.load_checkpoint(trainer.state, resume, rank)
    losses: dict[int, float] = {}

    def report(metrics: dict[str, float], save: bool) -> None:
        losses[int(metrics["step"])] = metrics["loss"]
        assert metrics["world_size"] == world
        assert metrics["global_batch"] == cfg.data.batch_size
        if save:
            path = Path(out) / ckpt.checkpoint_name(trainer.state.step)
            ckpt.save_checkpoint(trainer.state, path, rank, world)

    run_loop(trainer, ShardStream(cfg.data, rank, world), Hooks(report))
    if rank == 0:
        weights = unwrap(trainer.state.online).state_dict()
        torch.save({"losses": losses, "weights": weights}, Path(out) / "rank0.pt")
    if world > 1:
        dist.destroy_process_group()


def run(world: int, config: dict, out: Path, resume: str = "", steps: int = 4) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    args = (world, free_port(), config, str(out), resume, steps)
    if world == 1:
        train_rank(0, *args)
    else:
        torch.multiprocessing.spawn(train_rank, args, nprocs=world)
    return torch.load(out / "rank0.pt", weights_only=True)


def assert_same_run(a: dict, b: dict) -> None:
    assert a["losses"].keys() == b["losses"].keys()
    for step, loss in a["losses"].items():
        assert b["losses"][step] == pytest.approx(loss, rel=LOSS_RTOL), step
    for key, value in a["weights"].items():
        torch.testing.assert_close(b["weights"][key], value, rtol=0, atol=WEIGHT_ATOL)


def test_the_optimisation_is_the_same_at_one_two_and_three_ranks(
    digits16: str, tmp_path: Path
) -> None:
    """The global batch splits 8, 4 + 4 and 2 + 3 + 3 (unequal shares, weighted so DDP's mean is
    the global mean); the examples and their noise are the same, so are the losses and weights."""
    config = elastic_config(digits16)
    one = run(1, config, tmp_path / "w1")
    assert len(one["losses"]) == 4
    assert_same_run(one, run(2, config, tmp_path / "w2"))
    assert_same_run(one, run(3, config, tmp_path / "w3"))
    # Not a tolerance wide enough to hide anything: another seed's run is far outside it.
    other = run(1, {**config, "loop": {**config["loop"], "seed": 1}}, tmp_path / "seed1")
    with pytest.raises(AssertionError):
        assert_same_run(one, other)


def test_a_checkpoint_resumes_on_another_rank_count(digits16: str, tmp_path: Path) -> None:
    """Two ranks to step 2, then one rank from that checkpoint to step 4: the same steps 3 and
    4 as the run that stayed on one rank (the examples, the noise and the global batch)."""
    config = elastic_config(digits16)
    whole = run(1, config, tmp_path / "whole")
    run(2, config, tmp_path / "two", steps=2)
    resumed = run(1, config, tmp_path / "one", resume=str(tmp_path / "two" / "step-000000002"))
    assert sorted(resumed["losses"]) == [3, 4]
    for step in (3, 4):
        assert resumed["losses"][step] == pytest.approx(whole["losses"][step], rel=LOSS_RTOL)
    for key, value in whole["weights"].items():
        torch.testing.assert_close(resumed["weights"][key], value, rtol=0, atol=WEIGHT_ATOL)
