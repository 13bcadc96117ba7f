"""The data path on local files: preparation, sources, shard writing, resume, and the stream."""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import DropAfter
from PIL import Image

from cmray.config import ConfigError
from cmray.data import stream as stream_module
from cmray.data.config import PrepareConfig, StreamConfig
from cmray.data.manifest import read_manifest, shard_urls
from cmray.data.plan import EpochPlan
from cmray.data.prepare import prepare
from cmray.data.preprocess import center_crop, encode_image, prepare_image, resize_short_side
from cmray.data.sources import DigitsSource, FolderSource, LmdbSource, parse_source
from cmray.data.stream import (
    PrefetchReader,
    RetryingReader,
    ShardStream,
    stream_shards,
    to_unit_range,
)

ROOT = Path(__file__).resolve().parents[1]


def photo(width: int, height: int, seed: int) -> Image.Image:
    """A real photograph (scikit-learn's bundled sample), cropped to width x height."""
    from sklearn.datasets import load_sample_image

    arr = load_sample_image("china.jpg" if seed % 2 else "flower.jpg")
    top, left = (seed * 7) % (arr.shape[0] - height), (seed * 13) % (arr.shape[1] - width)
    return Image.fromarray(arr[top : top + height, left : left + width])


def make_lsun_lmdb(path: Path, sizes: list[tuple[int, int]], corrupt: int | None = None) -> list:
    """An LMDB laid out like the official LSUN exports: hex-id keys, webp-encoded values."""
    import lmdb

    images = []
    with lmdb.open(str(path), map_size=1 << 28) as env, env.begin(write=True) as txn:
        for i, (w, h) in enumerate(sizes):
            img = photo(w, h, i)
            value = b"not a webp" if i == corrupt else encode_image(img, "webp_lossless")
            key = hashlib.sha1(str(i).encode()).hexdigest().encode("ascii")
            txn.put(key, value)
            images.append((key.decode(), img))
    return sorted(images)  # LMDB iterates in key order


def read_shard_samples(path: Path) -> dict[str, dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            key, ext = member.name.split(".", 1)
            samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return samples


def decode_png(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


@pytest.fixture(scope="module")
def digits32(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("digits") / "d32"
    prepare(
        PrepareConfig(source="digits", out=str(out), resolution=32, shard_count=200, workers=-1),
        log=lambda _: None,
    )
    return out


# ------------------------------------------------------------------------------ preprocessing


def test_box_resize_averages_blocks_and_crop_takes_the_centre() -> None:
    # 4 x 2 image -> short side 1: BOX averages each 2 x 2 block; the crop keeps the middle.
    pixels = np.array([[0, 100, 200, 40], [20, 120, 220, 60]], dtype=np.uint8)
    small = resize_short_side(Image.fromarray(pixels), 1)
    assert small.size == (2, 1)
    np.testing.assert_array_equal(np.asarray(small), [[60, 130]])
    assert np.asarray(center_crop(small, 1)).tolist() == [[60]]


def test_prepare_matches_the_reference_arithmetic() -> None:
    img = photo(341, 256, 0)  # LSUN-like landscape
    out = prepare_image(img, 128)
    scaled = img.resize((round(128 / 256 * 341), 128), resample=Image.Resampling.BOX)
    offset = (scaled.size[0] - 128) // 2
    expected = np.asarray(scaled)[:, offset : offset + 128]
    assert out.size == (128, 128)
    np.testing.assert_array_equal(np.asarray(out), expected)


@pytest.mark.parametrize("encoding", ["png", "webp_lossless"])
def test_lossless_encodings_keep_every_pixel(encoding: str) -> None:
    img = prepare_image(photo(100, 80, 1), 64)
    np.testing.assert_array_equal(decode_png(encode_image(img, encoding)), np.asarray(img))


def test_lossy_encodings_stay_close() -> None:
    img = prepare_image(photo(100, 80, 1), 64)
    for encoding in ("webp", "jpeg"):
        back = decode_png(encode_image(img, encoding, quality=95)).astype(float)
        assert np.abs(back - np.asarray(img, dtype=float)).mean() < 4.0


# ----------------------------------------------------------------------------------- sources


def test_digits_source_is_the_bundled_set() -> None:
    source = DigitsSource()
    assert len(source) == 1797
    records = list(source.read({"start": 10, "count": 3}))
    assert [r[0] for r in records] == ["digits-0010", "digits-0011", "digits-0012"]
    assert records[0][1].size == (8, 8) and records[0][2] == 0  # digit images cycle 0..9
    assert np.asarray(records[0][1]).max() == 255


def test_folder_source_is_recursive_and_ignores_other_files(tmp_path: Path) -> None:
    (tmp_path / "a" / "b").mkdir(parents=True)
    photo(40, 30, 0).save(tmp_path / "z.png")
    photo(40, 30, 1).save(tmp_path / "a" / "b" / "x.JPG")
    (tmp_path / "a" / "notes.txt").write_text("not an image")
    source = FolderSource(str(tmp_path))
    assert source.files() == ["a/b/x.JPG", "z.png"]
    [chunk] = source.chunks(10)
    assert [key for key, _, _ in source.read(chunk)] == ["a/b/x.JPG", "z.png"]


def test_lmdb_source_chunks_cover_the_keys_in_order(tmp_path: Path) -> None:
    made = make_lsun_lmdb(tmp_path / "db", [(40 + i, 32) for i in range(7)])
    source = LmdbSource(str(tmp_path / "db"))
    assert len(source) == 7
    chunks = source.chunks(3)
    assert [c["count"] for c in chunks] == [3, 3, 1]
    keys = [key for chunk in chunks for key, _, _ in source.read(chunk)]
    assert keys == [key for key, _ in made]


@pytest.mark.parametrize("spec", ["bogus", "lmdb:", "folder", "digits:x", "s3://x"])
def test_unknown_source_specs_are_refused(spec: str) -> None:
    with pytest.raises(ConfigError, match="lmdb:PATH, folder:PATH, digits or fashion-mnist"):
        parse_source(spec)


# ------------------------------------------------------------------------------------ writer


def test_lsun_lmdb_converts_with_the_reference_preparation(tmp_path: Path) -> None:
    sizes = [(45, 32), (32, 48), (40, 40), (33, 60), (70, 35)]
    made = make_lsun_lmdb(tmp_path / "db", sizes, corrupt=2)
    corrupt_key = hashlib.sha1(b"2").hexdigest()
    out = tmp_path / "shards"
    cfg = PrepareConfig(
        source=f"lmdb:{tmp_path / 'db'}", out=str(out), resolution=24, shard_count=2, workers=-1
    )
    manifest = prepare(cfg, log=lambda _: None)
    assert (manifest.count, manifest.skipped) == (4, 1)
    assert sum(s.count for s in manifest.shards) == 4
    got = {}
    for shard in manifest.shards:
        for sample in read_shard_samples(out / shard.name).values():
            got[json.loads(sample["json"])["source_key"]] = decode_png(sample["png"])
    expected = {k: np.asarray(prepare_image(img, 24)) for k, img in made if k != corrupt_key}
    assert got.keys() == expected.keys()
    for key, pixels in expected.items():
        np.testing.assert_array_equal(got[key], pixels)


def test_manifest_records_counts_and_checksums(digits32: Path) -> None:
    manifest = read_manifest(str(digits32))
    assert (manifest.count, manifest.resolution, manifest.encoding) == (1797, 32, "png")
    assert manifest.classes == 10
    assert [s.count for s in manifest.shards] == [200] * 8 + [197]
    for shard in manifest.shards:
        data = (digits32 / shard.name).read_bytes()
        assert (len(data), hashlib.sha256(data).hexdigest()) == (shard.bytes, shard.sha256)
    assert not (digits32 / "_progress").exists()


def test_shard_size_bound_lowers_the_count(tmp_path: Path) -> None:
    cfg = PrepareConfig(
        source="digits",
        out=str(tmp_path),
        resolution=32,
        shard_count=1000,
        shard_size_mb=0.2,
        workers=-1,
    )
    manifest = prepare(cfg, log=lambda _: None)
    assert manifest.count == 1797
    assert max(s.count for s in manifest.shards) < 1000
    assert max(s.bytes for s in manifest.shards) <= 0.2 * 2**20


def test_same_settings_again_is_a_no_op_and_different_ones_are_refused(digits32: Path) -> None:
    before = {p.name: p.stat().st_mtime_ns for p in digits32.iterdir()}
    same = PrepareConfig(
        source="digits", out=str(digits32), resolution=32, shard_count=200, workers=-1
    )
    assert prepare(same, log=lambda _: None).count == 1797
    assert {p.name: p.stat().st_mtime_ns for p in digits32.iterdir()} == before
    with pytest.raises(ConfigError, match="different settings"):
        prepare(PrepareConfig(source="digits", out=str(digits32), resolution=16, workers=-1))


def test_foreign_shards_are_refused_and_overwrite_replaces_them(tmp_path: Path) -> None:
    (tmp_path / "data-000000.tar").write_bytes(b"someone else's")
    cfg = PrepareConfig(source="digits", out=str(tmp_path), resolution=8, workers=-1)
    with pytest.raises(ConfigError, match="another run"):
        prepare(cfg)
    cfg.overwrite = True
    assert prepare(cfg, log=lambda _: None).count == 1797


def test_an_interrupted_write_leaves_no_manifest_and_resumes(tmp_path: Path) -> None:
    out = tmp_path / "big"
    cmd = [
        sys.executable,
        str(ROOT / "pipelines" / "prepare_data.py"),
        "--source",
        "digits",
        "--out",
        str(out),
        "--resolution",
        "192",
        "--shard-count",
        "60",
        "--workers",
        "-1",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not list((out / "_progress").glob("data-*.json")) and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = sorted((out / "_progress").glob("data-*.json"))
    assert 1 <= len(finished) < 30, "the run must be killed part-way"
    assert not (out / "manifest.json").exists()
    visible = sorted(p.name for p in out.glob("data-*.tar"))
    assert not [p for p in out.iterdir() if p.suffix == ".part" and not p.name.startswith(".")]

    resumed = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stdout
    manifest = read_manifest(str(out))
    assert manifest.count == 1797 and len(manifest.shards) == 30
    assert set(visible) <= {s.name for s in manifest.shards}
    keys = [k for s in manifest.shards for k in read_shard_samples(out / s.name)]
    assert len(keys) == len(set(keys)) == 1797


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--source", "nope:x", "--resolution", "8"], "source 'nope:x'"),
        (["--source", "digits", "--resolution", "0"], "resolution = 0"),
        (["--source", "digits", "--resolution", "8", "--encoding", "gif"], "encoding = 'gif'"),
        (["--source", "folder:/no/such/dir", "--resolution", "8"], "does not exist"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(tmp_path: Path, args: list[str], message: str) -> None:
    cmd = [
        sys.executable,
        str(ROOT / "pipelines" / "prepare_data.py"),
        "--out",
        str(tmp_path / "o"),
    ]
    result = subprocess.run(cmd + args, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


# ------------------------------------------------------------------------------------ stream


def stream(manifest: Path | str, **overrides: object) -> StreamConfig:
    return StreamConfig(
        **{
            "manifest": str(manifest),
            "batch_size": 16,
            "num_workers": 2,
            "shuffle_buffer": 50,
            **overrides,
        }
    )


def epoch_keys(cfg: StreamConfig, rank: int, world: int, epoch: int = 0) -> list[list[str]]:
    s = ShardStream(cfg, rank, world)
    s.set_epoch(epoch)
    return [batch["key"] for batch in s]


def global_batches(cfg: StreamConfig, world: int, epoch: int = 0, start: int = 0) -> list:
    """Every rank's batches put together: the global batches' keys, checking that the ranks'
    positions tile each batch and that they agree on its size."""
    per_rank = []
    for rank in range(world):
        s = ShardStream(cfg, rank, world)
        s.set_epoch(epoch, start)
        per_rank.append(list(s))
    batches = []
    for parts in zip(*per_rank, strict=True):
        keys = [k for part in parts for k in part["key"]]
        positions = [int(p) for part in parts for p in part["position"]]
        assert positions == list(range(len(keys)))
        assert {part["global_size"] for part in parts} == {len(keys)}
        batches.append(keys)
    return batches


def test_two_ranks_by_two_loaders_read_every_sample_once(digits32: Path) -> None:
    cfg = stream(digits32, resampled=False)
    per_rank = [list(itertools.chain(*epoch_keys(cfg, rank, 2))) for rank in (0, 1)]
    every = per_rank[0] + per_rank[1]
    assert len(every) == len(set(every)) == 1797
    assert set(per_rank[0]).isdisjoint(per_rank[1])


@pytest.mark.parametrize("resampled", [False, True])
def test_the_examples_of_every_step_are_the_same_at_any_world_size(
    digits32: Path, resampled: bool
) -> None:
    """The elastic-training contract: which samples make global batch b, and in what order,
    depends on neither the rank count nor the loader processes; a resume at batch k on two
    ranks continues one rank's sequence; an exact epoch still reads every sample once."""
    cfg = stream(digits32, resampled=resampled, samples_per_epoch=480, num_workers=0)
    one = global_batches(cfg, 1, epoch=1)
    assert global_batches(stream(digits32, resampled=resampled, samples_per_epoch=480), 2, 1) == one
    loaders3 = stream(digits32, resampled=resampled, samples_per_epoch=480, num_workers=3)
    assert global_batches(loaders3, 3, epoch=1) == one
    assert global_batches(cfg, 2, epoch=1, start=4) == one[4:]
    assert global_batches(cfg, 1, epoch=2) != one
    flat = list(itertools.chain(*one))
    if resampled:
        assert [len(b) for b in one] == [16] * (480 // 16)
    else:
        assert len(flat) == len(set(flat)) == 1797
        assert [len(b) for b in one] == [16] * (1797 // 16 - 1) + [16 + 1797 % 16]


def test_epoch_plan_tiles_each_batch_and_reads_a_stream_on_one_rank() -> None:
    plan = EpochPlan.exact([200, 197, 400, 200], batch=64)
    assert plan.batches == 997 // 64
    sizes = [plan.size(b) for b in range(plan.batches)]
    assert sizes == [64] * (plan.batches - 1) + [64 + 997 % 64]  # the last takes what is left
    for world in (1, 2, 3, 4):
        for b in range(plan.batches):
            ranges = [plan.rank_range(b, r, world) for r in range(world)]
            assert ranges[0][0] == 0 and ranges[-1][1] == plan.size(b)
            assert all(ranges[i][1] == ranges[i + 1][0] for i in range(world - 1))
            kept = sum(
                t.keep_to - t.keep_from for r in range(world) for t in plan.takes(b, r, world)
            )
            assert kept == plan.size(b)
    resampled = EpochPlan.resampled(streams=8, batch=64, samples_per_epoch=6400)
    assert resampled.batches == 100 and {resampled.size(b) for b in range(100)} == {64}
    # V a multiple of the world size: each rank reads its own V / W streams, no stream twice.
    for world in (1, 2, 4, 8):
        streams = [resampled.rank_streams(r, world) for r in range(world)]
        assert sorted(itertools.chain(*streams)) == list(range(8))


def test_resampled_ranks_yield_equal_batch_counts(digits32: Path) -> None:
    cfg = stream(digits32, resampled=True, samples_per_epoch=1000, num_workers=3)
    shares = [[len(keys) for keys in epoch_keys(cfg, rank, 2)] for rank in (0, 1)]
    assert [len(s) for s in shares] == [1000 // 16] * 2 == [len(ShardStream(cfg, 0, 2))] * 2
    assert set(shares[0]) == set(shares[1]) == {8}  # half of each global batch of 16


def test_order_is_a_function_of_seed_and_epoch(digits32: Path) -> None:
    cfg = stream(digits32, resampled=False)
    first = epoch_keys(cfg, 0, 2, epoch=3)
    assert epoch_keys(cfg, 0, 2, epoch=3) == first
    assert epoch_keys(cfg, 0, 2, epoch=4) != first
    assert epoch_keys(stream(digits32, resampled=False, seed=1), 0, 2, epoch=3) != first


def test_batches_are_flipped_images_scaled_to_unit_range(digits32: Path) -> None:
    samples = {}
    for shard in read_manifest(str(digits32)).shards:
        samples.update(read_shard_samples(digits32 / shard.name))
    flipped = 0
    for batch in ShardStream(stream(digits32, resampled=False, num_workers=0)):
        assert batch["image"].dtype == torch.float32 and batch["image"].shape[1:] == (3, 32, 32)
        for key, image, label in zip(batch["key"], batch["image"], batch["label"], strict=True):
            pixels = torch.from_numpy(np.array(decode_png(samples[key]["png"]))).permute(2, 0, 1)
            scaled = pixels.float() * (2 / 255) - 1
            is_flipped = not torch.equal(image, scaled)
            torch.testing.assert_close(
                image, scaled.flip(-1) if is_flipped else scaled, rtol=0, atol=1e-6
            )
            flipped += is_flipped
            assert label.item() == int(samples[key]["cls"])
    assert 0.4 < flipped / 1797 < 0.6


def test_corrupt_images_and_truncated_shards_are_skipped_and_counted(
    digits32: Path, tmp_path: Path
) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    manifest = read_manifest(str(digits32))
    for shard in manifest.shards:
        (bad / shard.name).write_bytes((digits32 / shard.name).read_bytes())
    (bad / "manifest.json").write_text(manifest.to_json())
    corrupt_png = b"\x89PNG\r\n\x1a\n" + b"\x00" * 200  # the right magic, then garbage
    first = bad / manifest.shards[0].name
    data = bytearray(first.read_bytes())
    member = data.find(b"000000005.png")  # payload starts one 512-byte header after the name
    size = int(data[member + 124 : member + 135].decode(), 8)
    data[member + 512 : member + 512 + size] = corrupt_png[:size].ljust(size, b"\x00")
    first.write_bytes(bytes(data))
    last = bad / manifest.shards[-1].name
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2 + 100])
    s = ShardStream(stream(bad, resampled=False, num_workers=2))
    keys = [k for batch in s for k in batch["key"]]
    assert s.stats["decode_errors"] == 1 and s.stats["short_shards"] == 1
    assert s.stats["shard_errors"] == 1  # the truncated payload
    assert "000000005" not in keys
    assert 1797 - 197 < len(keys) < 1797 - 1
    assert s.stats["samples"] == len(keys)


def test_too_few_shards_for_the_streams_is_a_clear_error(digits32: Path) -> None:
    with pytest.raises(ValueError, match=r"9 shards cannot feed data\.streams = 12"):
        ShardStream(stream(digits32, resampled=False, streams=12), 0, 4)
    assert len(ShardStream(stream(digits32, resampled=True, streams=12), 0, 4)) > 0


def test_stream_shards_partition_the_permutation() -> None:
    urls = [f"s{i}" for i in range(10)]
    parts = [stream_shards(urls, v, 4, epoch=1, seed=0) for v in range(4)]
    assert sorted(itertools.chain(*parts)) == sorted(urls)
    assert min(len(p) for p in parts) >= 2


def test_retrying_reader_resumes_at_the_offset_after_a_transient_error(tmp_path: Path) -> None:
    payload = os.urandom(300_000)
    (tmp_path / "blob").write_bytes(payload)
    opened, failures = [], [100_000, 250_000]

    def open_at(offset: int) -> io.BufferedReader:
        opened.append(offset)
        fh = open(tmp_path / "blob", "rb")  # noqa: SIM115 - the reader owns and closes it
        fh.seek(offset)
        return DropAfter(fh, failures.pop(0) - offset) if failures else fh

    reader = io.BufferedReader(RetryingReader(open_at, retries=2, backoff_s=0), 64 * 1024)
    assert reader.read() == payload
    assert opened == [0, 100_000, 250_000]  # each reopen starts where the reset happened


def test_prefetch_reader_returns_every_byte_and_surfaces_errors() -> None:
    payload = os.urandom(1_000_003)
    reader = io.BufferedReader(PrefetchReader(io.BytesIO(payload), block_bytes=4096, depth=2))
    assert reader.read() == payload and reader.read() == b""
    reader.close()

    broken = DropAfter(io.BufferedReader(io.BytesIO(payload)), 10_000)
    reader = io.BufferedReader(PrefetchReader(broken, block_bytes=4096))
    with pytest.raises(ConnectionResetError):
        reader.read()


def test_unit_range_maps_0_and_255_to_the_ends() -> None:
    x = torch.tensor([0, 1, 128, 254, 255], dtype=torch.uint8)
    y = to_unit_range(x)
    assert y.dtype == torch.float32 and y[0] == -1 and y[-1] == 1
    torch.testing.assert_close(y, x.double().div(127.5).sub(1).float())


def test_stopping_mid_epoch_closes_the_look_ahead_shard(
    digits32: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    opened = []
    real_gopen = stream_module.gopen_module.gopen

    def recording_gopen(url: str, **kw: object) -> io.BufferedReader:
        opened.append(real_gopen(url, **kw))
        return opened[-1]

    monkeypatch.setattr(stream_module.gopen_module, "gopen", recording_gopen)
    manifest = read_manifest(str(digits32))
    urls = shard_urls(manifest, str(digits32 / "manifest.json"))
    expected = {u: s.count for u, s in zip(urls, manifest.shards, strict=True)}
    shards = stream_module._open_shards(iter(urls), expected, stream_module._Counters(), 0)
    next(shards)
    assert len(opened) == 2 and not any(f.closed for f in opened)  # current + look-ahead
    shards.close()
    assert all(f.closed for f in opened)


@pytest.mark.parametrize(("loaders", "start"), [(0, 5), (2, 3), (2, 4), (3, 7)])
def test_resuming_mid_epoch_yields_the_rest_of_that_epoch(
    digits32: Path, loaders: int, start: int
) -> None:
    cfg = stream(digits32, resampled=True, num_workers=loaders, samples_per_epoch=512)
    s = ShardStream(cfg, 1, 2)
    s.set_epoch(2)
    full = [(b["key"], b["image"]) for b in s]
    s.set_epoch(2, start_batch=start)
    rest = [(b["key"], b["image"]) for b in s]
    assert [k for k, _ in rest] == [k for k, _ in full[start:]]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(rest, full[start:], strict=True))
