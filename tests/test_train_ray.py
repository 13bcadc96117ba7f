"""Training on a real local Ray: two DDP workers, a worker killed mid-run, resume by run name."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cmray.train import state as ckpt
from cmray.train.worker import FAULT_ONCE_ENV, FAULT_STEP_ENV, SAMPLE_FILE, launch

pytestmark = pytest.mark.slow


@pytest.fixture
def kill_file(ray_cluster: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The session's Ray, with this test's runs killing rank 0 once after step 6 (the chaos
    variables travel from the driver to the run's workers)."""
    marker = tmp_path / "killed"
    monkeypatch.setenv(FAULT_STEP_ENV, "6")
    monkeypatch.setenv(FAULT_ONCE_ENV, str(marker))
    return marker


def test_two_workers_survive_a_kill_and_resume_by_name(
    digits16: str, kill_file: Path, tmp_path: Path
) -> None:
    from test_train import tiny_config

    cfg = tiny_config(digits16, steps=8, checkpoint_every=4, log_every=2)
    cfg.run.num_workers, cfg.run.max_failures = 2, 1
    cfg.run.storage_path, cfg.run.name = str(tmp_path), "chaos"
    result = launch(cfg)
    assert kill_file.read_text() == "killed at step 6\n"  # the worker really died once
    assert result.metrics["step"] == 8
    with result.checkpoint.as_directory() as directory:
        assert ckpt.verify_checkpoint(directory) == 8
        markers = sorted(p.name for p in Path(directory).glob("complete-rank*.json"))
        assert markers == ["complete-rank0.json", "complete-rank1.json"]
        assert (Path(directory) / SAMPLE_FILE).stat().st_size > 0
        world = json.loads((Path(directory) / "complete-rank0.json").read_text())["world_size"]
        assert world == 2

    # An uninterrupted run ends with the same weights, bit for bit: the restart lost nothing.
    cfg.run.name = "straight"
    straight = launch(cfg)
    with result.checkpoint.as_directory() as a, straight.checkpoint.as_directory() as b:
        wa = torch.load(Path(a) / ckpt.STATE_FILE, weights_only=True)["online"]
        wb = torch.load(Path(b) / ckpt.STATE_FILE, weights_only=True)["online"]
        assert all(torch.equal(wa[k], wb[k]) for k in wa)

    cfg.run.name, cfg.loop.steps = "chaos", 10  # the same name: continues from 8, not from 0
    again = launch(cfg)
    assert again.metrics["step"] == 10
    assert again.metrics["data_samples"] == 2 * cfg.data.batch_size  # only steps 9 and 10 read
