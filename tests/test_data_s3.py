"""The data path against a real S3 API (moto on loopback), written by Ray tasks, read by Ray Train.

s3fs reaches the server through the standard AWS environment, exactly as it reaches AWS.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import DropAfter

from cmray.data.config import PrepareConfig, StreamConfig
from cmray.data.manifest import read_manifest
from cmray.data.prepare import prepare
from cmray.data.preprocess import prepare_image
from cmray.data.sources import DigitsSource
from cmray.data.stream import RetryingReader, ShardStream, fsspec_open_at
from cmray.data.stream_check import check_stream
from cmray.storage import url_to_fs

pytestmark = pytest.mark.slow
RESOLUTION = 32


@pytest.fixture(scope="module")
def s3_digits(ray_cluster: None, s3_endpoint: str) -> str:
    """Digits written to S3 by two Ray tasks."""
    import s3fs

    s3fs.S3FileSystem(skip_instance_cache=True).mkdir("cmray-digits")
    cfg = PrepareConfig(
        source="digits",
        out="s3://cmray-digits/d32",
        resolution=RESOLUTION,
        shard_count=150,
        workers=2,
    )
    manifest = prepare(cfg, log=print)
    assert manifest.count == 1797
    return "s3://cmray-digits/d32/manifest.json"


def collect(cfg: StreamConfig, rank: int, world: int) -> dict[str, torch.Tensor]:
    return {
        k: x
        for b in ShardStream(cfg, rank, world)
        for k, x in zip(b["key"], b["image"], strict=True)
    }


def test_round_trip_keeps_the_count_and_the_pixels(s3_digits: str) -> None:
    fs, _ = url_to_fs(s3_digits)
    manifest = read_manifest(s3_digits)
    assert len(manifest.shards) == 12 and sum(s.count for s in manifest.shards) == 1797
    for shard in manifest.shards[:2]:
        info = fs.info(f"cmray-digits/d32/{shard.name}")
        assert info["size"] == shard.bytes
    cfg = StreamConfig(
        manifest=s3_digits, batch_size=50, num_workers=2, resampled=False, flip=False
    )
    images = collect(cfg, 0, 1)
    assert len(images) == 1797
    source = DigitsSource()
    for index in (0, 17, 900, 1796):
        [(_, img, _)] = source.read({"start": index, "count": 1})
        expected = torch.from_numpy(np.array(prepare_image(img, RESOLUTION))).permute(2, 0, 1)
        scaled = expected.float() * (2 / 255) - 1
        assert torch.equal(images[f"{index:09d}"], scaled)


def test_two_ranks_by_two_loaders_cover_the_epoch_from_s3(s3_digits: str) -> None:
    cfg = StreamConfig(manifest=s3_digits, batch_size=32, num_workers=2, resampled=False)
    keys = [k for rank in (0, 1) for k in collect(cfg, rank, 2)]
    assert len(keys) == len(set(keys)) == 1797
    resampled = StreamConfig(manifest=s3_digits, batch_size=64, num_workers=2)
    counts = [sum(1 for _ in ShardStream(resampled, rank, 2)) for rank in (0, 1)]
    assert counts == [1797 // 64, 1797 // 64]  # a global batch of 64 a step, 32 on each rank


def test_a_dropped_s3_connection_is_retried_at_the_offset(s3_digits: str) -> None:
    url = s3_digits.replace("manifest.json", read_manifest(s3_digits).shards[0].name)
    fs, path = url_to_fs(url)
    real_open, drops = fsspec_open_at(url), [40_000]

    def flaky_open(offset: int):
        fh = real_open(offset)
        return DropAfter(fh, drops.pop() - offset) if drops else fh

    retries = []
    reader = io.BufferedReader(
        RetryingReader(flaky_open, retries=3, backoff_s=0, on_retry=retries.append)
    )
    assert reader.read() == fs.cat_file(path)
    assert len(retries) == 1 and isinstance(retries[0], ConnectionResetError)


def test_ray_train_workers_get_equal_batches(s3_digits: str, tmp_path: Path) -> None:
    cfg = StreamConfig(manifest=s3_digits, batch_size=80, num_workers=1, samples_per_epoch=600)
    ranks = check_stream(cfg, workers=2, epochs=2, storage_path=str(tmp_path))
    assert [r["batches"] for r in ranks] == [2 * (600 // 80)] * 2  # 40 of each global 80
    for r in ranks:
        assert r["images"] == r["samples"] == 2 * 7 * 40
        assert r["decode_errors"] == r["shard_errors"] == r["short_shards"] == 0


def test_webdataset_itself_opens_s3_urls_after_registration(s3_digits: str) -> None:
    import webdataset as wds

    manifest = read_manifest(s3_digits)
    url = s3_digits.replace("manifest.json", manifest.shards[0].name)
    samples = list(wds.WebDataset(url, shardshuffle=False))
    assert len(samples) == manifest.shards[0].count
    assert {"png", "json", "cls"} <= samples[0].keys()
