"""Reference statistics of a dataset's real images, saved beside its manifest.

``ref-stats-<features>.pt`` holds the Gaussian (mu, Sigma) of all reference features for the
Frechet distance, a subset of the features for precision/recall, and the Frechet distance
between two interleaved halves of the real images (what a perfect model would get at half the
sample count). It records the feature weights' fingerprint and the manifest's, so stale
statistics are recomputed rather than silently compared.
"""

from __future__ import annotations

import io
import pickle
import posixpath
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

import torch

from cmray.data.manifest import Manifest, manifest_url, shard_urls
from cmray.eval.featurizer import ShardTask
from cmray.eval.frechet import RunningGaussian, frechet_distance
from cmray.storage import url_to_fs, write_bytes_atomic

FORMAT = "cmray-ref-stats/1"


@dataclass
class RefStats:
    features: str
    weights_fingerprint: str
    manifest_fingerprint: str
    count: int
    mu: torch.Tensor
    sigma: torch.Tensor
    pr_features: torch.Tensor
    split_half: float
    requested: int
    skipped: int = 0

    def to_bytes(self) -> bytes:
        buffer = io.BytesIO()
        torch.save({"format": FORMAT, **asdict(self)}, buffer)
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> RefStats:
        raw = torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
        if not isinstance(raw, dict) or raw.pop("format", None) != FORMAT:
            raise ValueError(f"not a {FORMAT} file")
        try:
            return cls(**raw)
        except TypeError as exc:  # written by another version of cmray
            raise ValueError(f"unreadable {FORMAT} file: {exc}") from None


def ref_stats_url(manifest: str, features: str) -> str:
    """``ref-stats-<features>.pt`` in the directory of the dataset's manifest."""
    return posixpath.join(posixpath.dirname(manifest_url(manifest)), f"ref-stats-{features}.pt")


def shard_tasks(manifest: Manifest, at: str, count: int) -> list[ShardTask]:
    """The first ``count`` images in shard order (all of them if the set is smaller)."""
    tasks, left = [], count
    for url, shard in zip(shard_urls(manifest, manifest_url(at)), manifest.shards, strict=True):
        if left <= 0:
            break
        tasks.append(ShardTask(url, min(left, shard.count)))
        left -= shard.count
    return tasks


def keep_first(kept: list[torch.Tensor], part: torch.Tensor, limit: int) -> None:
    """Append the rows of ``part`` that keep ``kept`` at no more than ``limit`` rows in all."""
    kept.append(part[: max(0, limit - sum(len(k) for k in kept))])


def summarize(
    results: Iterable[dict[str, Any]],
    identity: dict[str, str],
    manifest: Manifest,
    requested: int,
    keep: int,
) -> RefStats:
    """Fold featurized shards into :class:`RefStats`: alternate batches form the two halves."""
    halves, kept, skipped = (RunningGaussian(), RunningGaussian()), [], 0
    for result in results:
        pool = result["pool"]
        skipped += result["counts"].get("decode_errors", 0)
        # Interleaved, not first/second half: shards keep their source's order (LSUN keys,
        # digits by writer), and halves from different parts of it would differ by more.
        halves[0].add(pool[0::2])
        halves[1].add(pool[1::2])
        keep_first(kept, pool, keep)
    both = halves[0].merged(halves[1])
    return RefStats(
        features=identity["kind"],
        weights_fingerprint=identity["weights_fingerprint"],
        manifest_fingerprint=manifest.fingerprint,
        count=both.count,
        mu=both.stats()[0],
        sigma=both.stats()[1],
        pr_features=torch.cat(kept).half(),
        split_half=frechet_distance(*halves[0].stats(), *halves[1].stats()),
        requested=min(requested, manifest.count),
        skipped=skipped,
    )


def save_ref_stats(stats: RefStats, manifest: str) -> str:
    url = ref_stats_url(manifest, stats.features)
    write_bytes_atomic(url, stats.to_bytes())
    return url


def load_ref_stats(manifest: str, features: str) -> RefStats | None:
    """The saved statistics; None when there are none, or none this version can read."""
    fs, path = url_to_fs(ref_stats_url(manifest, features))
    if not fs.exists(path):
        return None
    with fs.open(path, "rb") as fh:
        data = fh.read()
    try:
        return RefStats.from_bytes(data)
    except (ValueError, RuntimeError, pickle.UnpicklingError):
        return None


def stale_reason(
    stats: RefStats, identity: dict[str, str], manifest: Manifest, count: int
) -> str | None:
    """Why saved statistics do not fit this evaluation, or None when they do."""
    if stats.weights_fingerprint != identity["weights_fingerprint"]:
        return f"they were made with other {stats.features} weights"
    if stats.manifest_fingerprint != manifest.fingerprint:
        return "they were made for another version of the shards"
    if stats.requested != min(count, manifest.count):
        return f"they hold {stats.requested} images, not {min(count, manifest.count)}"
    return None
