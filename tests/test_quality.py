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


def test_a_probe_leaves_the_runs_threads_alone(digits16: str, tmp_path: Path) -> None:
    """The statistics and the probe are made inside a training process (``run_local``):
    torch's thread count is the run's, before and after."""
    from cmray.eval.quality import QualityProbe, ensure_ref_stats

    data, cfg = _digits_copy(digits16, tmp_path), QualityConfig(features="digits")
    threads = torch.get_num_threads()
    torch.set_num_threads(threads + 2)  # not the featurizer's cpus_per_worker (1)
    try:
        ensure_ref_stats(cfg, data, workers=-1, log=lambda _: None)  # computed
        assert torch.get_num_threads() == threads + 2
        ensure_ref_stats(cfg, data, workers=-1, log=lambda _: None)  # loaded
        assert torch.get_num_threads() == threads + 2
        QualityProbe(cfg, data, torch.device("cpu"))
        assert torch.get_num_threads() == threads + 2
    finally:
        torch.set_num_threads(threads)


@pytest.mark.slow
def test_training_reports_the_figure_at_quality_every(digits16: str, tmp_path: Path) -> None:
    from test_train import tiny_config

    from cmray.eval.quality import QualityProbe
    from cmray.models import load_model

    data = _digits_copy(digits16, tmp_path)
    cfg = tiny_config(data, steps=4, checkpoint_every=4, log_every=1)
    cfg.quality.every, cfg.quality.features, cfg.quality.num_samples = 2, "digits", 64
    reports: list[dict[str, float]] = []
    run_local(cfg, tmp_path / "run", log=lambda _: None, on_metrics=reports.append)
    scored = {int(r["step"]): r["fd_digits"] for r in reports if "fd_digits" in r}
    assert sorted(scored) == [2, 4] and all(math.isfinite(v) and v > 0 for v in scored.values())
    assert (Path(data) / "ref-stats-digits.pt").exists()  # made before training started

    # The same model and noise give the same figure, and the model's mode is left alone.
    model, model_cfg = load_model(str(tmp_path / "run" / "checkpoints"))
    probe = QualityProbe(cfg.quality, data, torch.device("cpu"))
    model.train()
    first = probe(model, model_cfg)["fd_digits"]
    assert model.training and probe(model, model_cfg)["fd_digits"] == first
