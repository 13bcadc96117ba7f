"""Typed settings of sample-quality evaluation (``pipelines/evaluate.py``, ``cmray eval``)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Literal

from cmray.config import ConfigError, param
from cmray.models import MODEL_BATCH

# The Frechet figure each feature network gives: FID is only ever Inception's.
FRECHET_NAMES = {"inception": "fid", "digits": "fd_digits", "fashion": "fd_fashion"}


@dataclass
class SamplingConfig:
    """Which samplers are scored: one step, and multistep (Algorithm 1) on a Karras grid."""

    steps: int = param(2, help="also score this many steps (1: one-step only)", ge=1, le=16)
    indices: list[int] = param(
        default_factory=list,
        help="the official sampler's ts on the N-point grid, e.g. [0, 17, 39]; "
        "empty: found by the greedy ternary search",
    )
    N: int = param(
        0, help="Karras grid points for the taus (0: the run's CD N, or CT's s1 + 1)", ge=0
    )
    search_samples: int = param(
        10_000, help="samples scored per candidate during the ternary search", ge=2
    )

    def __post_init__(self) -> None:
        if not self.indices:
            return
        if len(self.indices) != self.steps + 1:
            raise ConfigError(
                f"sampling.indices {self.indices} has {len(self.indices)} entries; "
                f"{self.steps} steps need {self.steps + 1} (0, the intermediate ones, N - 1)",
                key="sampling.indices",
            )
        if self.indices[0] != 0 or any(b <= a for a, b in itertools.pairwise(self.indices)):
            raise ConfigError(
                f"sampling.indices {self.indices} must start at 0 and increase",
                key="sampling.indices",
            )


@dataclass
class QualityConfig:
    """A sample-quality figure measured during training (what a search's early stopping reads).

    One-step samples from the first EMA copy, always from the same noise, scored against the
    reference statistics beside ``data.manifest``: comparable across N, mu and the metric d,
    which the loss is not.
    """

    every: int = param(0, help="measure every K steps, and at the end (0: never)", ge=0)
    features: Literal["inception", "digits", "fashion"] = param(
        "inception",
        help="inception: FID; digits, fashion: the shipped digits or Fashion-MNIST classifier "
        "(CPU proxies)",
    )
    weights: str = param("", help="feature network weights (empty: as in evaluation)")
    num_samples: int = param(1000, help="one-step samples per measurement", ge=2)
    batch_size: int = param(250, help="samples generated and featurized at once", ge=1)
    model_batch: int = param(
        MODEL_BATCH,
        help="images per network call when sampling (GPU memory; samples do not change)",
        ge=1,
    )
    seed: int = param(0, help="noise seed; the same noise at every measurement")


@dataclass
class EvalConfig:
    """Score a trained model's samples against a dataset's reference statistics."""

    model: str = param("", help="checkpoint directory or URL, or a local run directory")
    manifest: str = param("", help="the real images' dataset; reference statistics sit beside")
    features: Literal["inception", "digits", "fashion"] = param(
        "inception",
        help="inception: FID's Inception-v3 (comparable with papers); digits, fashion: the "
        "shipped digits or Fashion-MNIST classifier (CPU proxies, not FID)",
    )
    weights: str = param(
        "",
        help="feature network weights: local path or fsspec URL "
        "(empty: the torch hub cache for inception, the shipped file for digits and fashion)",
    )
    num_samples: int = param(50_000, help="generated samples scored per sampler", ge=2)
    ref_count: int = param(
        50_000, help="real images in the reference statistics (all, if the set is smaller)", ge=2
    )
    pr_count: int = param(
        10_000, help="features per side for precision/recall (k-NN manifolds)", ge=4
    )
    pr_k: int = param(3, help="k of the k-NN manifolds", ge=1)
    batch_size: int = param(250, help="images per task (generation and featurization)", ge=1)
    model_batch: int = param(
        MODEL_BATCH,
        help="images per network call when sampling (GPU memory; samples do not change)",
        ge=1,
    )
    sampling: SamplingConfig = param(
        default_factory=SamplingConfig, help="one-step and multistep sampling"
    )
    seed: int = param(0, help="noise seed; results do not depend on the number of workers")
    draws: int = param(
        1,
        help="draws of noise each figure is the mean of (its spread beside it); the ternary "
        "search and the images use the first",
        ge=1,
    )
    workers: int = param(
        0,
        help="Ray actors (0: one per GPU with use_gpu, else one per CPU; -1: no Ray, in-process)",
        ge=-1,
    )
    use_gpu: bool = param(False, help="one GPU per actor")
    cpus_per_worker: float = param(1.0, help="CPUs reserved per actor", gt=0)
    out: str = param("", help="output directory for eval.json and samples.png")

    def __post_init__(self) -> None:
        if not self.manifest:
            raise ConfigError("manifest is empty; give the real images' dataset", key="manifest")
