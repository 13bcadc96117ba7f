"""Shards -> batches for one training rank: split, shuffled, flipped, scaled, equal in number.

Follow one epoch on rank r of W with L loader processes:
1. ``rank_shards``: non-resampled, a seeded permutation of the shards (the same on every rank),
   then every W-th from r, then every L-th from the loader id, so each shard is read once per
   epoch; resampled, each loader draws shards with replacement from its own seeded stream.
2. Each shard is opened through webdataset's ``gopen``; ``register_fsspec_opener`` routes every
   fsspec protocol (``s3://``, ``gs://``, ...) there through ``RetryingReader``.
3. Samples pass a shuffle buffer, are decoded (a failure is skipped and counted), flipped, and
   batched; batches are scaled to [-1, 1] once, as float32 [B, 3, R, R].
4. Resampled mode yields exactly ``batches_per_epoch`` batches on every rank, so DDP never
   waits on a rank that ran out of data.

Every random choice uses ``random.Random(f"{seed}/{rank}/{epoch}/{loader}/{purpose}")``, so the
stream is a function of (seed, rank, epoch) and the loader count.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import itertools
import logging
import random
import time
from collections.abc import Callable, Iterator
from typing import IO, Any

import fsspec
import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset import tariterators

from cmray.data.config import StreamConfig
from cmray.data.manifest import Manifest, manifest_url, read_manifest, shard_urls
from cmray.data.preprocess import open_image
from cmray.storage import url_to_fs

log = logging.getLogger("cmray.data")
# The package re-exports the function ``gopen`` under the module's name, hiding the module.
gopen_module = importlib.import_module("webdataset.gopen")
NOT_TRANSIENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)
MAX_LOGGED_ERRORS = 10
_BUFFER_BYTES = 1 << 20


# ------------------------------------------------------------------------- opening, with retries


def is_transient(exc: BaseException) -> bool:
    """Connection resets, timeouts and 5xx-style I/O errors; not a missing or forbidden object."""
    return isinstance(exc, (OSError, TimeoutError)) and not isinstance(exc, NOT_TRANSIENT)


class RetryingReader(io.RawIOBase):
    """A read-only stream that reopens at its current offset after a transient error."""

    def __init__(
        self,
        open_at: Callable[[int], IO[bytes]],
        retries: int = 5,
        backoff_s: float = 0.2,
        on_retry: Callable[[BaseException], None] | None = None,
    ) -> None:
        super().__init__()
        self._open_at, self._retries, self._backoff_s = open_at, retries, backoff_s
        self._on_retry = on_retry
        self._fh: IO[bytes] | None = None
        self._pos = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        for attempt in range(self._retries + 1):
            try:
                if self._fh is None:
                    self._fh = self._open_at(self._pos)
                data = self._fh.read(len(buffer))
                buffer[: len(data)] = data
                self._pos += len(data)
                return len(data)
            except Exception as exc:
                if not is_transient(exc) or attempt == self._retries:
                    raise
                self._drop()
                if self._on_retry is not None:
                    self._on_retry(exc)
                time.sleep(self._backoff_s * 2**attempt)
        raise AssertionError("unreachable")

    def _drop(self) -> None:
        if self._fh is not None:
            with contextlib.suppress(Exception):  # closing a broken connection may itself fail
                self._fh.close()
            self._fh = None

    def close(self) -> None:
        self._drop()
        super().close()


def fsspec_open_at(url: str) -> Callable[[int], IO[bytes]]:
    """A function opening ``url`` through fsspec, positioned at a byte offset."""

    def open_at(offset: int) -> IO[bytes]:
        fs, path = url_to_fs(url)
        fh = fs.open(path, "rb")
        if offset:
            fh.seek(offset)
        return fh

    return open_at


def gopen_fsspec(
    url: str,
    mode: str = "rb",
    bufsize: int = 8192,
    retries: int = 5,
    on_retry: Callable[[BaseException], None] | None = None,
    **_: Any,
) -> IO[bytes]:
    """webdataset ``gopen`` handler for any fsspec protocol (read only)."""
    if mode != "rb":
        raise ValueError(f"cmray's fsspec opener reads only; mode {mode!r} is not 'rb'")
    raw = RetryingReader(fsspec_open_at(url), retries=retries, on_retry=on_retry)
    return io.BufferedReader(raw, buffer_size=max(bufsize, _BUFFER_BYTES))


def register_fsspec_opener() -> None:
    """Make webdataset open ``s3://``, ``gs://`` and every other fsspec protocol via fsspec."""
    native = {"file", "local", "pipe"}
    for protocol in fsspec.available_protocols():
        if protocol not in native:
            gopen_module.gopen_schemes[protocol] = gopen_fsspec


register_fsspec_opener()


# --------------------------------------------------------------------------- shard assignment


def seeded_rng(seed: int, rank: int, epoch: int, loader: int, purpose: str) -> random.Random:
    # A str seed is hashed with SHA-512 by ``random``, so it is stable across processes.
    return random.Random(f"{seed}/{rank}/{epoch}/{loader}/{purpose}")


def rank_shards(
    urls: list[str], rank: int, world: int, loader: int, loaders: int, epoch: int, seed: int
) -> list[str]:
    """This (rank, loader)'s shards for one non-resampled epoch: disjoint, together all."""
    order = list(urls)
    random.Random(f"{seed}/{epoch}/shards").shuffle(order)  # same permutation on every rank
    return order[rank::world][loader::loaders]


def resampled_shards(urls: list[str], rng: random.Random) -> Iterator[str]:
    while True:
        yield rng.choice(urls)


def check_enough_shards(shards: int, world: int, loaders: int, resampled: bool) -> None:
    """Non-resampled reading needs a shard for every (rank, loader); resampling does not."""
    if not resampled and shards < world * loaders:
        raise ValueError(
            f"{shards} shards cannot feed {world} ranks x {loaders} loader processes without "
            "idling some; set data.resampled=true, lower data.num_workers, or write more, "
            "smaller shards (--shard-count)"
        )


# ------------------------------------------------------------------------------ one loader


class _Counters:
    """Per-loader fault counts; they travel to the main process with each batch."""

    def __init__(self) -> None:
        self.counts = dict.fromkeys(
            ("samples", "decode_errors", "shard_errors", "short_shards", "retries"), 0
        )
        self.in_shard = 0

    def skip(self, kind: str, exc: BaseException) -> bool:
        self.counts[kind] += 1
        if self.counts[kind] <= MAX_LOGGED_ERRORS:
            log.warning("skipped (%s): %s", kind, exc)
        return True  # webdataset handlers: True means "continue with the next item"

    def retried(self, exc: BaseException) -> None:
        self.counts["retries"] += 1
        log.warning("retrying after a transient storage error: %s", exc)


def _open_shards(
    urls: Iterator[str], expected: dict[str, int], counters: _Counters, retries: int
) -> Iterator[dict]:
    for url in urls:
        try:
            stream = gopen_module.gopen(url, retries=retries, on_retry=counters.retried)
        except Exception as exc:  # a missing shard is skipped like a bad one
            counters.skip("shard_errors", exc)
            continue
        counters.in_shard = 0
        with stream:
            yield {"url": url, "stream": stream}
        # Resumed only once every sample of this shard has passed ``_raw_samples``. A truncated
        # tar often ends without an error, so the manifest's count is what exposes it.
        if counters.in_shard < expected[url]:
            short = f"{url} gave {counters.in_shard} of {expected[url]} samples (truncated?)"
            counters.skip("short_shards", ValueError(short))


def _raw_samples(
    urls: Iterator[str], expected: dict[str, int], counters: _Counters, retries: int
) -> Iterator[dict]:
    def on_shard_error(exc: BaseException) -> bool:
        return counters.skip("shard_errors", exc)

    shards = _open_shards(urls, expected, counters, retries)
    files = tariterators.tar_file_expander(shards, handler=on_shard_error)
    for sample in tariterators.group_by_keys(files, handler=on_shard_error):
        counters.in_shard += 1
        yield sample


def decode_sample(sample: dict, ext: str, resolution: int) -> tuple[np.ndarray, int]:
    """uint8 [R, R, 3] pixels and the class label (-1 when the set has none)."""
    if ext not in sample:
        raise ValueError(f"sample {sample.get('__key__')} has no .{ext} payload")
    pixels = np.asarray(open_image(sample[ext]).convert("RGB"))
    if pixels.shape != (resolution, resolution, 3):
        raise ValueError(f"sample {sample['__key__']} is {pixels.shape}, not {resolution}^2 RGB")
    return pixels, int(sample["cls"]) if "cls" in sample else -1


def collate(pixels: list[np.ndarray], labels: list[int], keys: list[str]) -> dict[str, Any]:
    """Stack and scale to [-1, 1] once per batch: float32 [B, 3, R, R]."""
    x = torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2)
    image = x.to(torch.float32, memory_format=torch.contiguous_format).div_(127.5).sub_(1.0)
    return {"image": image, "label": torch.tensor(labels, dtype=torch.long), "key": keys}


class ShardDataset(IterableDataset):
    """The batches of one (rank, epoch); each DataLoader process takes its own share."""

    def __init__(
        self,
        cfg: StreamConfig,
        manifest: Manifest,
        urls: list[str],
        rank: int,
        world: int,
        epoch: int,
        batches: int | None,
    ) -> None:
        super().__init__()
        self.cfg, self.manifest, self.urls = cfg, manifest, urls
        self.expected = {url: s.count for url, s in zip(urls, manifest.shards, strict=True)}
        self.rank, self.world, self.epoch, self.batches = rank, world, epoch, batches

    def _loader_batches(self, loader: int, loaders: int) -> int | None:
        if self.batches is None:
            return None
        return self.batches // loaders + (loader < self.batches % loaders)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        loader, loaders = (info.id, info.num_workers) if info is not None else (0, 1)
        counters = _Counters()
        batches = self._batches(loader, loaders, counters)
        for batch in batches:
            yield dict(batch, stats=(loader, dict(counters.counts)))
        yield {"stats": (loader, dict(counters.counts))}  # counts seen after the last batch

    def _shard_iter(self, loader: int, loaders: int) -> Iterator[str]:
        cfg, rng = self.cfg, seeded_rng(self.cfg.seed, self.rank, self.epoch, loader, "shards")
        if cfg.resampled:
            # Bounded, so a dataset of nothing but broken shards ends in an error, not a hang.
            per_shard = max(1, self.manifest.count // len(self.urls))
            bound = 10 * (self._loader_batches(loader, loaders) or 0) * cfg.batch_size // per_shard
            return itertools.islice(resampled_shards(self.urls, rng), bound + 10 * len(self.urls))
        args = (self.rank, self.world, loader, loaders, self.epoch, cfg.seed)
        return iter(rank_shards(self.urls, *args))

    def _batches(self, loader: int, loaders: int, counters: _Counters) -> Iterator[dict]:
        cfg, m = self.cfg, self.manifest
        want = self._loader_batches(loader, loaders)
        if want == 0:
            return
        samples = wds.filters._shuffle(
            _raw_samples(self._shard_iter(loader, loaders), self.expected, counters, cfg.retries),
            bufsize=cfg.shuffle_buffer,
            initial=cfg.shuffle_buffer,
            rng=seeded_rng(cfg.seed, self.rank, self.epoch, loader, "shuffle"),
        )
        flips = seeded_rng(cfg.seed, self.rank, self.epoch, loader, "flip")
        pixels, labels, keys, made = [], [], [], 0
        for sample in samples:
            try:
                x, y = decode_sample(sample, m.extension, m.resolution)
            except Exception as exc:  # any undecodable sample is skipped
                counters.skip("decode_errors", exc)
                continue
            counters.counts["samples"] += 1
            pixels.append(x[:, ::-1] if cfg.flip and flips.random() < 0.5 else x)
            labels.append(y)
            keys.append(sample["__key__"])
            if len(pixels) == cfg.batch_size:
                yield collate(pixels, labels, keys)
                pixels, labels, keys, made = [], [], [], made + 1
                if made == want:
                    return
        if want is not None:
            raise RuntimeError(f"rank {self.rank} loader {loader} ran out of samples")
        if pixels:  # non-resampled: the last, partial batch, so every sample is seen once
            yield collate(pixels, labels, keys)


# ------------------------------------------------------------------------------ one rank


def batches_per_epoch(samples: int, world: int, batch_size: int) -> int:
    """Resampled epoch length per rank: whole batches only, the same on every rank."""
    return samples // (world * batch_size)


class ShardStream:
    """Training batches for one rank; ``set_epoch(e)`` then iterate, once per epoch.

    ``stats`` totals what the loaders skipped or retried (over all epochs so far), so a run can
    report a bad shard instead of silently training on less data.
    """

    def __init__(self, cfg: StreamConfig, rank: int = 0, world_size: int = 1) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")
        self.cfg, self.rank, self.world, self.epoch = cfg, rank, world_size, 0
        self.manifest = read_manifest(cfg.manifest)
        self.urls = shard_urls(self.manifest, manifest_url(cfg.manifest))
        check_enough_shards(len(self.urls), world_size, max(1, cfg.num_workers), cfg.resampled)
        self.batches: int | None = None
        if cfg.resampled:
            samples = cfg.samples_per_epoch or self.manifest.count
            self.batches = batches_per_epoch(samples, world_size, cfg.batch_size)
            if self.batches == 0:
                raise ValueError(
                    f"an epoch of {samples} samples gives no batch of "
                    f"{cfg.batch_size} on each of {world_size} ranks; lower "
                    "data.batch_size or raise data.samples_per_epoch"
                )
        self._done: dict[str, int] = {}
        self._epoch_stats: dict[int, dict[str, int]] = {}

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        if self.batches is None:
            raise TypeError("a non-resampled stream has no fixed length")
        return self.batches

    def __iter__(self) -> Iterator[dict[str, Any]]:
        dataset = ShardDataset(
            self.cfg, self.manifest, self.urls, self.rank, self.world, self.epoch, self.batches
        )
        workers = self.cfg.num_workers
        loader = DataLoader(
            dataset,
            batch_size=None,
            num_workers=workers,
            prefetch_factor=4 if workers else None,
            pin_memory=False,
        )
        self._epoch_stats = {}
        try:
            for item in loader:
                loader_id, counts = item.pop("stats")
                self._epoch_stats[loader_id] = counts
                if "image" in item:
                    yield item
        finally:
            for counts in self._epoch_stats.values():
                for key, value in counts.items():
                    self._done[key] = self._done.get(key, 0) + value
            self._epoch_stats = {}

    @property
    def stats(self) -> dict[str, int]:
        total = dict(self._done)
        for counts in self._epoch_stats.values():
            for key, value in counts.items():
                total[key] = total.get(key, 0) + value
        return total


def train_rank_and_world() -> tuple[int, int]:
    """(world rank, world size) inside a Ray Train worker; (0, 1) anywhere else."""
    try:
        import ray.train

        context = ray.train.get_context()
        return context.get_world_rank(), context.get_world_size()
    except Exception:  # outside Ray Train there is simply no context
        return 0, 1
