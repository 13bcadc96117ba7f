"""What one evaluation worker does: generate samples for a task, or read a shard, and featurize.

No Ray here: :mod:`cmray.eval.runner` runs a :class:`Featurizer` in-process or as Ray actors.
A task's result depends only on the task (its noise is seeded by the chunk index), so figures
do not change with the number of workers, and a task retried after a worker died gives the same
answer.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from cmray.config import to_dict
from cmray.core.sampling import class_labels, in_batches, sample_edm_heun, sample_multistep
from cmray.core.seeds import rank_seed
from cmray.data.manifest import read_manifest
from cmray.data.stream import shard_batches
from cmray.eval.config import EvalConfig
from cmray.eval.features import load_feature_net, weights_fingerprint
from cmray.models import ModelConfig, load_model


@dataclass(frozen=True)
class SampleTask:
    """Generate ``count`` samples of chunk ``chunk``: a consistency model's with taus (empty:
    one step), or an EDM teacher's with its Heun sampler on ``points`` sigmas (``points`` > 0)."""

    chunk: int
    count: int
    taus: tuple[float, ...] = ()
    keep_images: int = 0  # how many uint8 samples to send back (for the grid)
    points: int = 0


@dataclass(frozen=True)
class ShardTask:
    """Featurize the first ``limit`` images of the shard at ``url``."""

    url: str
    limit: int


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] samples to uint8 pixels, truncating as the official sampler does before FID."""
    return ((x + 1) * 127.5).clamp(0, 255).to(torch.uint8)


def chunk_noise(
    seed: int, chunk: int, shape: tuple[int, ...]
) -> tuple[torch.Tensor, torch.Generator]:
    """x_T's unit noise for a chunk, and the generator for its later steps; both on the CPU, so
    a chunk's samples are the same on any device and any worker."""
    z = torch.randn(shape, generator=torch.Generator().manual_seed(rank_seed(seed, chunk, "z")))
    steps = torch.Generator().manual_seed(rank_seed(seed, chunk, "steps"))
    return z, steps


@contextmanager
def ieee_convolutions() -> Iterator[None]:
    """Convolutions in full float32, not cuDNN's default TF32, which rounds their inputs to
    10 mantissa bits (about 1e-3): reference statistics are often made on CPU actors.

    Through torch's per-operator ``fp32_precision`` where it has one (2.9 on): its legacy
    ``allow_tf32`` can raise once the new settings are in use, and is overridden by them.
    """
    conv = getattr(torch.backends.cudnn, "conv", None)
    if conv is not None and hasattr(conv, "fp32_precision"):
        owner, name, ieee = conv, "fp32_precision", "ieee"
    else:
        owner, name, ieee = torch.backends.cudnn, "allow_tf32", False
    before = getattr(owner, name)
    setattr(owner, name, ieee)
    try:
        yield
    finally:
        setattr(owner, name, before)


class Featurizer:
    """A feature network, and the model when samples are wanted, on this worker's device.

    ``threads`` sets torch's CPU threads, for a process the featurizer owns (a Ray actor). It
    stays None in a process that also does other work, such as a training run's quality probe,
    whose threads are the run's to choose.
    """

    def __init__(self, cfg: EvalConfig, with_model: bool, threads: int | None = None) -> None:
        self.cfg = cfg
        cuda = cfg.use_gpu and torch.cuda.is_available()
        self.device = torch.device("cuda" if cuda else "cpu")
        if threads is not None and not cuda:
            torch.set_num_threads(threads)
        self.net = load_feature_net(cfg.features, cfg.weights).to(self.device)
        self.model: nn.Module | None = None
        self.model_cfg: ModelConfig | None = None
        if with_model:
            import cmray.tracking  # noqa: F401 - registers MLflow model URIs as model sources

            self.model, self.model_cfg = load_model(cfg.model, self.device)
        self.manifest = read_manifest(cfg.manifest)

    def use_model(self, model: nn.Module, model_cfg: ModelConfig) -> None:
        """Sample from ``model`` (described by ``model_cfg``), e.g. the one a run is training."""
        self.model, self.model_cfg = model, model_cfg

    def identity(self) -> dict[str, str]:
        """Which feature network this is (kind, weights fingerprint) and its figures' names."""
        return {
            "kind": self.cfg.features,
            "weights_fingerprint": weights_fingerprint(self.net),
            "description": self.net.description,
            "frechet": self.net.frechet_name,
            "score": self.net.score_name,
        }

    def model_config(self) -> dict[str, Any]:
        """The evaluated model's config (its kind, noise range and grid), as a dict."""
        if self.model_cfg is None:
            raise RuntimeError("this featurizer was built without a model")
        return to_dict(self.model_cfg)

    @torch.no_grad()
    def featurize(self, batches: Iterable[torch.Tensor]) -> dict[str, torch.Tensor]:
        """Pool features and logits of uint8 batches, on the CPU in float32."""
        pools, logits = [], []
        for images in batches:
            with ieee_convolutions():
                pool, logit = self.net(images.to(self.device))
            pools.append(pool.float().cpu())
            logits.append(logit.float().cpu())
        if not pools:
            return {"pool": torch.empty(0, 0), "logits": torch.empty(0, 0)}
        return {"pool": torch.cat(pools), "logits": torch.cat(logits)}

    @torch.no_grad()
    def samples(self, task: SampleTask) -> dict[str, torch.Tensor]:
        if self.model is None or self.model_cfg is None:
            raise RuntimeError("this featurizer was built without a model")
        net, noise = self.model_cfg.net, self.model_cfg.noise
        shape = (task.count, net.in_channels, net.resolution, net.resolution)
        z, steps = chunk_noise(self.cfg.seed, task.chunk, shape)
        # Classes drawn uniformly, as the reference's sampler does, from a generator of their own.
        draw = torch.Generator().manual_seed(rank_seed(self.cfg.seed, task.chunk, "classes"))
        labels = class_labels(net.num_classes, task.count, None, draw)
        model = in_batches(self.model, self.cfg.model_batch, _on(labels, self.device))
        if task.points:
            if self.model_cfg.is_consistency:
                raise ValueError(f"{self.cfg.model} is a consistency model, not an EDM teacher")
            args = (task.points, noise.sigma_min, noise.sigma_max, noise.rho)
            x = sample_edm_heun(model, z.to(self.device), *args, clip=(-1.0, 1.0)).x
        else:
            args = (task.taus, steps, self.model_cfg.boundary, noise.sigma_max)
            x = sample_multistep(model, z.to(self.device), *args, clip=(-1.0, 1.0)).x
        images = to_uint8(x)
        features = self.featurize(images.split(self.cfg.batch_size))
        return {**features, "images": images[: task.keep_images].cpu()}

    def reals(self, task: ShardTask) -> dict[str, Any]:
        counts: dict[str, int] = {}
        batches = shard_batches(task.url, self.manifest, self.cfg.batch_size, task.limit, counts)
        return {**self.featurize(batches), "counts": counts}


def _on(labels: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    return None if labels is None else labels.to(device)
