"""Typed settings of the data path: shard preparation and the training stream."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from cmray.config import ConfigError, param


@dataclass
class PrepareConfig:
    """``pipelines/prepare_data.py``: one source to shards plus ``manifest.json`` at ``out``."""

    source: str = param(
        "digits", help="lmdb:PATH (LSUN export), folder:PATH, digits, or fashion-mnist[:PATH]"
    )
    out: str = param("", help="output directory or URL (s3://bucket/prefix, gs://...)")
    resolution: int = param(
        256, help="R: short side to R with BOX, then a central R x R crop", ge=1, le=8192
    )
    name: str = param("data", help="shard file prefix: <name>-000000.tar")
    encoding: Literal["png", "webp", "webp_lossless", "jpeg"] = param(
        "png", help="shard payload codec; png and webp_lossless keep every pixel"
    )
    quality: int = param(95, help="webp/jpeg quality", ge=1, le=100)
    resample: Literal["box", "bicubic", "lanczos", "nearest"] = param(
        "box", help="resize filter; the reference uses box"
    )
    shard_count: int = param(10_000, help="at most this many samples per shard", ge=1)
    shard_size_mb: float = param(
        512.0,
        help="target shard size; the count per shard is planned from probed image sizes",
        gt=0,
    )
    workers: int = param(
        0, help="parallel Ray tasks (0: one per CPU; -1: no Ray, in-process)", ge=-1
    )
    overwrite: bool = param(False, help="delete this dataset's shards and manifest first")

    def __post_init__(self) -> None:
        if not self.out:
            raise ConfigError("out is empty; give a directory or URL for the shards", key="out")
        if not self.name or any(c in self.name for c in "/\\.- "):
            raise ConfigError(
                f"name {self.name!r} must be non-empty with no '/', '.', '-' or spaces", key="name"
            )


@dataclass
class StreamConfig:
    """How a training worker reads shards: split, shuffled, flipped, in equal batches."""

    manifest: str = param("", help="URL of the dataset's manifest.json")
    batch_size: int = param(
        32, help="images per global batch, over all ranks (each rank takes its share)", ge=1
    )
    num_workers: int = param(2, help="DataLoader processes per rank (0: read in-process)", ge=0)
    shuffle_buffer: int = param(
        1000, help="samples held for shuffling in each loader process", ge=1
    )
    resampled: bool = param(
        True, help="draw shards with replacement so every rank gets the same number of batches"
    )
    samples_per_epoch: int = param(
        0, help="resampled epoch length in samples over all ranks (0: the dataset size)", ge=0
    )
    flip: bool = param(True, help="random horizontal flip")
    streams: int = param(
        0,
        help="V, the epoch's shard streams; with the batch size they fix which examples each "
        "step sees at any worker count (0: 8, or the shard count if fewer and not resampled; "
        "a multiple of the worker counts reads no stream twice)",
        ge=0,
    )
    seed: int = param(0, help="with the epoch, fixes shard order, shuffle and flips")
    retries: int = param(5, help="retries of a transient storage error before giving up", ge=0)
