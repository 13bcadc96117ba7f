"""The sample-quality figure measured during training (what a search's ASHA reads)."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch

from cmray.eval.config import QualityConfig
from cmray.train.loop import run_local


def _digits_copy(digits16: str, tmp_path: Path) -> str:
    """The shards without any reference statistics another test left beside them."""
    out = tmp_path / "d16"
    shutil.copytree(digits16, out, ignore=shutil.ignore_patterns("ref-stats-*"))
    return str(out)


def test_a_probe_needs_reference_statistics(digits16: str, tmp_path: Path) -> None:
    from cmray.eval.quality import QualityProbe

    data = _digits_copy(digits16, tmp_path)
    with pytest.raises(FileNotFoundError, match="cmray eval ref-stats"):
        QualityProbe(QualityConfig(features="digits"), data, torch.device("cpu"))


@pytest.mark.slow
def test_training_reports_the_figure_at_quality_every(digits16: str, tmp_path: Path) -> None:
    from test_train import tiny_config

    from cmray.eval.quality import QualityProbe
    from cmray.train.loop import load_model

    data = _digits_copy(digits16, tmp_path)
    cfg = tiny_config(data, steps=4, checkpoint_every=4, log_every=1)
    cfg.quality.every, cfg.quality.features, cfg.quality.num_samples = 2, "digits", 64
    reports: list[dict[str, float]] = []
    run_local(cfg, tmp_path / "run", log=lambda _: None, on_metrics=reports.append)
    scored = {int(r["step"]): r["fd_digits"] for r in reports if "fd_digits" in r}
    assert sorted(scored) == [2, 4] and all(math.isfinite(v) and v > 0 for v in scored.values())
    assert (Path(data) / "ref-stats-digits.pt").exists()  # made before training started

    # The same model and noise give the same figure, and the model's mode is left alone.
    model, train_cfg = load_model(str(tmp_path / "run" / "checkpoints"))
    probe = QualityProbe(cfg.quality, data, torch.device("cpu"))
    model.train()
    first = probe(model, train_cfg)["fd_digits"]
    assert model.training and probe(model, train_cfg)["fd_digits"] == first
