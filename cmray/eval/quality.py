"""Sample quality measured inside a training run: the figure a search's early stopping reads.

:class:`QualityProbe` lives on rank 0 of a run. It draws one-step samples from the model being
trained, always from the same noise, and scores them with the evaluation's feature network
against the reference statistics saved beside the dataset's manifest. The driver makes sure
those statistics exist before any worker starts (:func:`ensure_ref_stats`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from cmray.eval.config import EvalConfig, QualityConfig
from cmray.eval.evaluate import chunks, compute_ref_stats
from cmray.eval.featurizer import Featurizer, SampleTask
from cmray.eval.frechet import RunningGaussian, frechet_distance
from cmray.eval.reference import RefStats, load_ref_stats, ref_stats_url
from cmray.models import ModelConfig


def _eval_config(cfg: QualityConfig, manifest: str, workers: int, use_gpu: bool) -> EvalConfig:
    return EvalConfig(
        manifest=manifest,
        features=cfg.features,
        weights=cfg.weights,
        num_samples=cfg.num_samples,
        batch_size=cfg.batch_size,
        model_batch=cfg.model_batch,
        seed=cfg.seed,
        workers=workers,
        use_gpu=use_gpu,
    )


def ensure_ref_stats(
    cfg: QualityConfig, manifest: str, workers: int = 0, log: Callable[[str], None] = print
) -> RefStats:
    """The dataset's reference statistics for ``cfg.features``: loaded when they fit, else
    computed (on Ray actors unless ``workers`` is -1) and saved beside the manifest."""
    return compute_ref_stats(_eval_config(cfg, manifest, workers, use_gpu=False), log, False)


class QualityProbe:
    """Scores a model's one-step samples: FID, or the digits proxy's Frechet distance."""

    def __init__(self, cfg: QualityConfig, manifest: str, device: torch.device) -> None:
        ecfg = _eval_config(cfg, manifest, workers=-1, use_gpu=device.type == "cuda")
        self.featurizer = Featurizer(ecfg, with_model=False)
        ref = load_ref_stats(manifest, cfg.features)
        if ref is None:
            raise FileNotFoundError(
                f"no reference statistics at {ref_stats_url(manifest, cfg.features)}; "
                f"make them with: cmray eval ref-stats --set manifest={manifest} "
                f"--set features={cfg.features}"
            )
        fingerprint = self.featurizer.identity()["weights_fingerprint"]
        if ref.weights_fingerprint != fingerprint:
            raise ValueError(
                f"{ref_stats_url(manifest, cfg.features)} was made with other "
                f"{cfg.features} weights; remake it with cmray eval ref-stats"
            )
        self.ref, self.cfg = ref, cfg
        self.name: str = self.featurizer.net.frechet_name

    @torch.no_grad()
    def __call__(self, model: nn.Module, model_cfg: ModelConfig) -> dict[str, float]:
        """``{name: Frechet distance}`` of ``quality.num_samples`` one-step samples."""
        was_training = model.training
        model.eval()
        self.featurizer.use_model(model, model_cfg)
        gaussian = RunningGaussian()
        for chunk, count in chunks(self.cfg.num_samples, self.cfg.batch_size):
            gaussian.add(self.featurizer.samples(SampleTask(chunk, count))["pool"])
        model.train(was_training)
        return {self.name: frechet_distance(*gaussian.stats(), self.ref.mu, self.ref.sigma)}
