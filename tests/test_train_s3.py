"""Checkpoints in S3 (moto on loopback) through Ray's storage_path, and resume from them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cmray.models import load_model
from cmray.storage import url_to_fs
from cmray.train.worker import launch

pytestmark = pytest.mark.slow


def test_checkpoints_go_to_s3_and_a_rerun_resumes_from_them(
    ray_cluster: None, s3_bucket: str, digits16: str, tmp_path: Path
) -> None:
    from test_train import tiny_config

    cfg = tiny_config(digits16, steps=4, checkpoint_every=2, log_every=2)
    cfg.run.num_workers, cfg.run.storage_path, cfg.run.name = 2, f"{s3_bucket}/runs", "s3run"
    first = launch(cfg)
    assert first.metrics["step"] == 4
    fs, root = url_to_fs(f"{s3_bucket}/runs/s3run")
    entries = fs.ls(root, detail=True)
    checkpoints = [
        e["name"]
        for e in entries
        if e["type"] == "directory" and e["name"].rsplit("/", 1)[-1].startswith("checkpoint_")
    ]
    assert checkpoints, fs.ls(root, detail=False)
    files = {p.rsplit("/", 1)[-1] for p in fs.ls(sorted(checkpoints)[-1], detail=False)}
    assert {"state.pt", "complete-rank0.json", "complete-rank1.json"} <= files

    # A model read straight from S3 equals the one from a local copy (which is memory-mapped).
    fs.get(sorted(checkpoints)[-1], str(tmp_path / "copy"), recursive=True)
    remote, _ = load_model(f"s3://{sorted(checkpoints)[-1]}")
    local, _ = load_model(str(tmp_path / "copy"))
    for (name, a), b in zip(remote.state_dict().items(), local.state_dict().values(), strict=True):
        assert torch.equal(a, b), name

    cfg.loop.steps = 6
    again = launch(cfg)
    assert again.metrics["step"] == 6
    # Resumed at step 4: rank 0 decoded only its half of steps 5 and 6's global batches.
    assert again.metrics["data_samples"] == 2 * cfg.data.batch_size // 2
