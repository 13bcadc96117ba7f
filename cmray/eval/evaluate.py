"""The evaluation driver: reference statistics, one-step and multistep scores, the search.

``compute_ref_stats`` featurizes a dataset's real images once and saves the statistics beside
its manifest. ``evaluate`` scores a model's one-step samples and its multistep samples
(Algorithm 1, taus given or found by the greedy ternary search), then writes ``eval.json`` and
``samples.png`` (the first rows one-step, the last rows multistep, from the same noise).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from cmray.config import from_dict
from cmray.core.sampling import edm_sampler_nfe, taus_from_indices
from cmray.data.manifest import Manifest, read_manifest
from cmray.eval.config import EvalConfig
from cmray.eval.featurizer import SampleTask
from cmray.eval.frechet import RunningGaussian, frechet_distance
from cmray.eval.images import grid_png
from cmray.eval.reference import (
    RefStats,
    keep_first,
    load_ref_stats,
    ref_stats_url,
    save_ref_stats,
    shard_tasks,
    stale_reason,
    summarize,
)
from cmray.eval.runner import Runner
from cmray.eval.scores import inception_score, mean_over_draws, precision_recall
from cmray.eval.search import greedy_indices
from cmray.models import ModelConfig
from cmray.storage import join_url, write_bytes_atomic

Log = Callable[[str], None]
GRID_IMAGES = 32  # per sampler


def chunks(count: int, size: int) -> list[tuple[int, int]]:
    return [(c, min(size, count - start)) for c, start in enumerate(range(0, count, size))]


def reference_stats(
    runner: Runner, cfg: EvalConfig, manifest: Manifest, log: Log, recompute: bool = False
) -> RefStats:
    """The saved statistics if they fit these weights, shards and count; else made and saved.

    Statistics are a deterministic function of those three, so replacing stale ones loses
    nothing, and comparing against them would silently give a wrong figure.
    """
    identity = runner.identity()
    stats = None if recompute else load_ref_stats(cfg.manifest, cfg.features)
    if stats is not None:
        reason = stale_reason(stats, identity, manifest, cfg.ref_count)
        if reason is None:
            return stats
        log(f"recomputing {ref_stats_url(cfg.manifest, cfg.features)}: {reason}")
    tasks = shard_tasks(manifest, cfg.manifest, cfg.ref_count)
    results = runner.run(tasks, "reference images")
    stats = summarize(results, identity, manifest, cfg.ref_count, cfg.pr_count)
    log(f"reference statistics of {stats.count} images: {save_ref_stats(stats, cfg.manifest)}")
    return stats


def compute_ref_stats(cfg: EvalConfig, log: Log = print, recompute: bool = True) -> RefStats:
    """``cmray eval ref-stats``: (re)compute and save a dataset's reference statistics; with
    ``recompute=False``, saved ones that still fit are loaded instead."""
    manifest = read_manifest(cfg.manifest)
    with Runner(cfg, with_model=False) as runner:
        return reference_stats(runner, cfg, manifest, log, recompute=recompute)


@dataclass
class Samples:
    """What a sampler's samples reduce to: their Gaussian, some features, logits, a few images."""

    gaussian: RunningGaussian
    pr_features: torch.Tensor
    logits: torch.Tensor
    images: torch.Tensor
    seconds: float


# Draw d's chunks are numbered from d * DRAW_CHUNKS: other noise from the same seed.
DRAW_CHUNKS = 1_000_000


def sample_features(
    runner: Runner,
    cfg: EvalConfig,
    taus: tuple[float, ...],
    count: int,
    desc: str,
    points: int = 0,
    draw: int = 0,
) -> Samples:
    """Samples of Algorithm 1 with ``taus``, or of an EDM teacher's sampler on ``points``, from
    draw ``draw`` of the noise (0: the seed's first)."""
    first = draw * DRAW_CHUNKS
    tasks = [
        SampleTask(first + c, n, taus, keep_images=GRID_IMAGES if c == 0 else 0, points=points)
        for c, n in chunks(count, cfg.batch_size)
    ]
    gaussian, kept, logits, images = RunningGaussian(), [], [], None
    start = time.perf_counter()
    for result in runner.run(tasks, desc):
        gaussian.add(result["pool"])
        keep_first(kept, result["pool"], cfg.pr_count)
        logits.append(result["logits"])
        images = result["images"] if images is None else images
    elapsed = time.perf_counter() - start
    return Samples(gaussian, torch.cat(kept), torch.cat(logits), images, elapsed)


def figures(samples: Samples, ref: RefStats, names: dict[str, str], k: int) -> dict[str, float]:
    """FID (or the proxy's Frechet distance), the Inception-style score and precision/recall."""
    is_mean, is_std = inception_score(samples.logits, splits=min(10, len(samples.logits)))
    precision, recall = precision_recall(ref.pr_features.float(), samples.pr_features, k)
    return {
        names["frechet"]: frechet_distance(*samples.gaussian.stats(), ref.mu, ref.sigma),
        names["score"]: is_mean,
        names["score"] + "_std": is_std,
        "precision": precision,
        "recall": recall,
    }


def over_draws(
    score: Callable[[int], tuple[dict[str, Any], Samples]], draws: int, frechet: str
) -> tuple[dict[str, Any], Samples]:
    """``score(draw)`` on ``draws`` draws of noise: every figure is the mean over them, the
    Frechet figure's spread and values beside it (``<name>_sd``, ``<name>_draws``); the
    samples are the first draw's."""
    scored = [score(d) for d in range(draws)]
    reports = [report for report, _ in scored]
    means = [k for k, v in reports[0].items() if isinstance(v, float) and k != "samples_per_s"]
    return mean_over_draws(reports, means, [frechet]), scored[0][1]


def grid_size(cfg: EvalConfig, model: ModelConfig) -> int:
    """N of the Karras grid the taus index: configured, else the model's (CD's N, CT's s1 + 1)."""
    if cfg.sampling.N:
        return cfg.sampling.N
    if model.is_consistency and model.N:
        return model.N
    raise ValueError(f"{cfg.model} is an EDM teacher, not a consistency model; evaluate CD/CT runs")


class Evaluation:
    """One evaluation's state: runner, reference, the model's config and the figure names."""

    def __init__(self, runner: Runner, cfg: EvalConfig, ref: RefStats, model: ModelConfig):
        self.runner, self.cfg, self.ref, self.model = runner, cfg, ref, model
        identity = runner.identity()
        self.names = {"frechet": identity["frechet"], "score": identity["score"]}
        self.N = grid_size(cfg, model)

    def taus(self, indices: tuple[int, ...]) -> tuple[float, ...]:
        noise = self.model.noise
        args = (indices, self.N, noise.sigma_min, noise.sigma_max, noise.rho)
        return tuple(taus_from_indices(*args))

    def score(
        self, indices: tuple[int, ...], count: int, desc: str, draw: int = 0
    ) -> tuple[dict, Samples]:
        taus = self.taus(indices)
        samples = sample_features(self.runner, self.cfg, taus, count, desc, draw=draw)
        result = {
            "sampler": f"{len(indices) - 1}-step",
            "nfe": len(indices) - 1,
            "indices": list(indices),
            "taus": list(taus),
            **figures(samples, self.ref, self.names, self.cfg.pr_k),
            "samples": count,
            "samples_per_s": count / samples.seconds,
        }
        return result, samples

    def search(self, log: Log) -> tuple[tuple[int, ...], dict[str, Any]]:
        """Greedy ternary search on the Frechet figure, with the same noise for every candidate."""
        frechet = self.names["frechet"]

        def objective(indices: tuple[int, ...]) -> float:
            result, _ = self.score(indices, self.cfg.sampling.search_samples, f"search {indices}")
            log(f"search: indices {list(indices)} -> {frechet} {result[frechet]:.3f}")
            return result[frechet]

        found = greedy_indices(objective, self.N, self.cfg.sampling.steps)
        report = {
            "N": self.N,
            "metric": frechet,
            "samples": self.cfg.sampling.search_samples,
            "evaluated": [{"indices": list(k), frechet: v} for k, v in found.evaluated.items()],
            "chosen": list(found.indices),
        }
        return found.indices, report


@dataclass
class Scored:
    """An evaluation's report and each sampler's first images (uint8), in the report's order."""

    report: dict[str, Any]
    images: list[torch.Tensor]


def score_model(cfg: EvalConfig, log: Log = print) -> Scored:
    """Score a consistency model's one-step and ``sampling.steps``-step samples."""
    if not cfg.model:
        raise ValueError("evaluation needs model (a checkpoint or run)")
    manifest = read_manifest(cfg.manifest)
    with Runner(cfg, with_model=True) as runner:
        ref = reference_stats(runner, cfg, manifest, log)
        ev = Evaluation(runner, cfg, ref, from_dict(ModelConfig, runner.model_config()))
        results, grids, search = [], [], None
        plans: list[tuple[int, ...]] = [(0, ev.N - 1)]
        if cfg.sampling.steps > 1:
            indices = tuple(cfg.sampling.indices)
            if not indices:
                indices, search = ev.search(log)
            plans.append(indices)
        frechet = runner.identity()["frechet"]
        for indices in plans:
            desc = f"{len(indices) - 1}-step"
            result, samples = over_draws(
                lambda d, i=indices, s=desc: ev.score(i, cfg.num_samples, s, d), cfg.draws, frechet
            )
            results.append(result)
            grids.append(samples.images)
        report = _report(cfg, ref, runner.identity(), results, search)
    return Scored(report, grids)


def score_teacher(cfg: EvalConfig, points: Sequence[int], log: Log = print) -> Scored:
    """Score an EDM teacher with its Heun sampler (EDM Algorithm 2) on each count of ``points``
    Karras sigmas: 18 points are the paper's 35 NFE, 1 point the one-step student's cost."""
    manifest = read_manifest(cfg.manifest)
    with Runner(cfg, with_model=True) as runner:
        ref = reference_stats(runner, cfg, manifest, log)
        identity = runner.identity()
        if from_dict(ModelConfig, runner.model_config()).is_consistency:
            raise ValueError(f"{cfg.model} is a consistency model; score_teacher wants EDM")
        names = {"frechet": identity["frechet"], "score": identity["score"]}
        results, grids = [], []
        for p in points:

            def heun(draw: int, p: int = p) -> tuple[dict[str, Any], Samples]:
                samples = sample_features(
                    runner, cfg, (), cfg.num_samples, f"Heun {p} pts", p, draw
                )
                return {
                    "sampler": f"Heun, {p} point{'s' if p > 1 else ''}",
                    "nfe": edm_sampler_nfe(p),
                    "points": p,
                    **figures(samples, ref, names, cfg.pr_k),
                    "samples": cfg.num_samples,
                    "samples_per_s": cfg.num_samples / samples.seconds,
                }, samples

            result, samples = over_draws(heun, cfg.draws, names["frechet"])
            results.append(result)
            grids.append(samples.images)
        report = _report(cfg, ref, identity, results, None)
    return Scored(report, grids)


def evaluate(cfg: EvalConfig, log: Log = print) -> dict[str, Any]:
    """Score one-step and ``sampling.steps``-step samples; write eval.json and samples.png."""
    if not cfg.model or not cfg.out:
        raise ValueError("evaluation needs model (a checkpoint or run) and out (a directory)")
    scored = score_model(cfg, log)
    write_report(cfg.out, scored)
    return scored.report


def _report(
    cfg: EvalConfig,
    ref: RefStats,
    identity: dict[str, str],
    results: list[dict[str, Any]],
    search: dict[str, Any] | None,
) -> dict[str, Any]:
    return {
        "model": cfg.model,
        "manifest": cfg.manifest,
        "features": identity,
        "reference": {"count": ref.count, "split_half_frechet": ref.split_half},
        "seed": cfg.seed,
        "results": results,
        "search": search,
    }


def write_report(out: str, scored: Scored) -> None:
    """eval.json, and samples.png: each sampler's images in rows, in the report's order."""
    report = (json.dumps(scored.report, indent=2) + "\n").encode()
    write_bytes_atomic(join_url(out, "eval.json"), report)
    grid = torch.cat(scored.images).float().div(127.5).sub(1)
    write_bytes_atomic(join_url(out, "samples.png"), grid_png(grid))


def summary_lines(report: dict[str, Any]) -> list[str]:
    """One line per sampler, for the console."""
    frechet = report["features"]["frechet"]
    lines = []
    for r in report["results"]:
        lines.append(
            f"{r['sampler']} (NFE {r['nfe']}, indices {r['indices']}): {frechet} "
            f"{r[frechet]:.3f}  precision {r['precision']:.3f}  recall {r['recall']:.3f}  "
            f"{r['samples_per_s']:.1f} samples/s"
        )
    split = report["reference"]["split_half_frechet"]
    lines.append(f"reference: {report['reference']['count']} real images; two halves {split:.3f}")
    return lines


def preflight(cfg: EvalConfig, with_model: bool) -> None:
    """Fail before Ray starts when the dataset, the model or the feature weights are missing.

    Weights in the torch hub cache can only be checked here when this machine is the cluster
    (no RAY_ADDRESS); on a cluster each worker stages them and names a missing file itself.
    """
    from cmray.eval.features import stage_inception
    from cmray.models import locate_model
    from cmray.models.files import resolve_source
    from cmray.storage import url_to_fs
    from cmray.weights import WeightsNotFoundError

    read_manifest(cfg.manifest)
    if with_model:
        import cmray.tracking  # noqa: F401 - registers MLflow model URIs as model sources

        locate_model(resolve_source(cfg.model))
    if cfg.weights:
        fs, path = url_to_fs(cfg.weights)
        if not fs.isfile(path):
            raise WeightsNotFoundError(f"feature weights {cfg.weights!r} not found")
    elif cfg.features == "inception" and not os.environ.get("RAY_ADDRESS"):
        stage_inception(None)
