"""A run submitted to a running cluster with its checkpoints in S3 (moto on loopback) through
Ray's storage_path: its log as a job's log reads, and a rerun resuming from S3."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cmray.config import load_config
from cmray.models import load_model
from cmray.storage import url_to_fs
from cmray.train.config import TrainConfig
from cmray.train.worker import launch

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def test_a_cluster_run_logs_each_line_once_checkpoints_to_s3_and_resumes_from_there(
    ray_cluster: str, s3_bucket: str, digits16: str, tmp_path: Path
) -> None:
    """``pipelines/train.py`` on two workers of the session's Ray (RAY_ADDRESS, as a job runs),
    storing in S3; then the same run, by name, continued in this process from S3."""
    from test_train_configs import run_digits

    sets = {"loop.steps": 4, "loop.log_every": 2, "loop.checkpoint_every": 2}
    sets |= {"run.num_workers": 2, "run.storage_path": f"{s3_bucket}/runs", "run.name": "s3run"}
    result = run_digits(digits16, tmp_path, [], 600, {"RAY_ADDRESS": ray_cluster}, **sets)
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout + result.stderr
    # Ray Train's print() both logs and echoes; cmray's lines bypass it.
    assert out.count("[cmray] step 2/4 ") == 1, out[-3000:]
    # run.log_level (WARNING) hides Ray Train's per-report and worker-group INFO lines.
    assert "Reporting training result" not in out and "Started training worker group" not in out
    # Channels-last weights: DDP's gradient buckets match, so no stride warning.
    assert "Grad strides do not match bucket view strides" not in out
    # Ray's report of its own PreemptionWatcher's restartable arguments stays out too.
    assert "has constructor arguments in the object store" not in out

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

    sets |= {"loop.steps": 6, "data.manifest": f"{digits16}/manifest.json"}
    sets["tracking.enabled"] = False
    cfg = load_config(
        TrainConfig, ROOT / "configs" / "digits_ct.yaml", [f"{k}={v}" for k, v in sets.items()]
    )
    again = launch(cfg)
    assert again.metrics["step"] == 6
    # Resumed at step 4: rank 0 decoded only its half of steps 5 and 6's global batches.
    assert again.metrics["data_samples"] == 2 * cfg.data.batch_size // 2
