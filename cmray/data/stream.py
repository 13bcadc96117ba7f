"""Shards -> batches for one training rank: its share of every global batch, whatever the
number of ranks.

Follow one epoch on rank r of W with L loader processes:
1. The epoch is ``V`` streams (``cmray.data.plan``): non-resampled, stream v reads every V-th
   shard of a seeded permutation, so each shard is read once per epoch; resampled, stream v
   draws shards with replacement from its own seeded sequence. Global batch b takes a fixed
   number of samples from every stream; rank r keeps one contiguous range of its positions and
   reads only the streams that feed it, split among its L loader processes.
2. Each shard is opened through webdataset's ``gopen``; ``register_fsspec_opener`` routes every
   fsspec protocol (``s3://``, ``gs://``, ...) there through ``RetryingReader`` (reopens at
   the offset after a transient error) and ``PrefetchReader`` (reads ahead in a thread); the
   next shard is opened while the current one is read.
3. Samples pass their stream's shuffle buffer; the rank's are decoded (a failure is skipped
   and counted), flipped, and batched as uint8, the others passed over undecoded; each batch
   is moved to the training device and scaled to [-1, 1] there.
4. Every rank yields the same number of batches, so DDP never waits on a rank out of data.

Every random choice uses ``random.Random(f"{seed}/{epoch}/{stream}/{purpose}")``, so the
sequence of examples is a function of (seed, epoch, V, batch size): not of the rank count, nor
of the loader count.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import itertools
import logging
import queue
import random
import tarfile
import threading
import time
from collections.abc import Callable, Iterator
from typing import IO, Any

import fsspec
import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset import tariterators

from cmray.data.config import StreamConfig
from cmray.data.manifest import Manifest, manifest_url, read_manifest, shard_urls
from cmray.data.plan import EpochPlan
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


class PrefetchReader(io.RawIOBase):
    """Reads ``raw`` ahead in a background thread, a few blocks deep.

    Object-store reads are latency-bound; fetching the next blocks while the current ones are
    decoded (PIL releases the GIL while decoding) keeps S3 streaming close to local-disk speed.
    """

    def __init__(self, raw: IO[bytes], block_bytes: int = 4 << 20, depth: int = 4) -> None:
        super().__init__()
        self._raw, self._block_bytes = raw, block_bytes
        self._blocks: queue.Queue = queue.Queue(maxsize=depth)
        self._pending = memoryview(b"")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._fill, daemon=True)
        self._thread.start()

    def _fill(self) -> None:
        try:
            while not self._stop.is_set():
                block = self._raw.read(self._block_bytes)
                self._put(block)
                if not block:
                    return
        except BaseException as exc:  # handed to the reading thread, which raises it
            self._put(exc)

    def _put(self, item: bytes | BaseException) -> None:
        while not self._stop.is_set():
            try:
                self._blocks.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if not self._pending:
            item = self._blocks.get()
            if isinstance(item, BaseException):
                raise item
            if not item:
                self._blocks.put(item)  # keep answering EOF
                return 0
            self._pending = memoryview(item)
        n = min(len(buffer), len(self._pending))
        buffer[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        return n

    def close(self) -> None:
        if not self.closed:
            self._stop.set()
            self._thread.join(timeout=10)
            self._raw.close()
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
    raw = PrefetchReader(RetryingReader(fsspec_open_at(url), retries=retries, on_retry=on_retry))
    return io.BufferedReader(raw, buffer_size=max(bufsize, _BUFFER_BYTES))


def register_fsspec_opener() -> None:
    """Make webdataset open ``s3://``, ``gs://`` and every other fsspec protocol via fsspec."""
    native = {"file", "local", "pipe"}
    for protocol in fsspec.available_protocols():
        if protocol not in native:
            gopen_module.gopen_schemes[protocol] = gopen_fsspec


register_fsspec_opener()


# --------------------------------------------------------------------------- shard assignment


def stream_rng(seed: int, epoch: int, stream: int, purpose: str) -> random.Random:
    # A str seed is hashed with SHA-512 by ``random``, so it is stable across processes.
    return random.Random(f"{seed}/{epoch}/{stream}/{purpose}")


def stream_shards(urls: list[str], stream: int, streams: int, epoch: int, seed: int) -> list[str]:
    """Stream ``stream``'s shards for one non-resampled epoch: disjoint, together all."""
    order = list(urls)
    random.Random(f"{seed}/{epoch}/shards").shuffle(order)  # one permutation per epoch
    return order[stream::streams]


def shard_counts(manifest: Manifest, urls: list[str]) -> dict[str, int]:
    """Each shard URL's sample count, from the manifest."""
    return {url: s.count for url, s in zip(urls, manifest.shards, strict=True)}


def resampled_shards(urls: list[str], rng: random.Random) -> Iterator[str]:
    while True:
        yield rng.choice(urls)


def stream_count(cfg: StreamConfig, shards: int) -> int:
    """V, the epoch's streams: ``data.streams``, or by default 8 (at most one per shard when
    not resampled: each stream needs a shard of its own)."""
    return cfg.streams or (8 if cfg.resampled else min(8, shards))


def check_enough_shards(shards: int, streams: int, resampled: bool) -> None:
    """Non-resampled reading needs a shard for every stream; resampling does not."""
    if not resampled and shards < streams:
        raise ValueError(
            f"{shards} shards cannot feed data.streams = {streams} without leaving some "
            f"empty; set data.streams <= {shards}, data.resampled=true, or write more, smaller "
            "shards (--shard-count)"
        )


# ------------------------------------------------------------------------------ one loader


class _Counters:
    """Per-loader fault counts; they travel to the main process with each batch."""

    def __init__(self, counts: dict[str, int] | None = None) -> None:
        kinds = ("samples", "decode_errors", "shard_errors", "short_shards", "retries")
        self.counts = counts if counts is not None else dict.fromkeys(kinds, 0)
        self.in_shard = 0

    def for_stream(self) -> _Counters:
        """Counters adding to the same totals, with their own place in their own shard: a
        loader reads several streams at once."""
        return _Counters(self.counts)

    def skip(self, kind: str, exc: BaseException) -> bool:
        self.counts[kind] += 1
        if self.counts[kind] <= MAX_LOGGED_ERRORS:
            log.warning("skipped (%s): %s", kind, exc)
        return True  # webdataset handlers: True means "continue with the next item"

    def retried(self, exc: BaseException) -> None:
        self.counts["retries"] += 1
        log.warning("retrying after a transient storage error: %s", exc)


def _try_open(urls: Iterator[str], counters: _Counters, retries: int) -> tuple[str, IO] | None:
    for url in urls:
        try:
            return url, gopen_module.gopen(url, retries=retries, on_retry=counters.retried)
        except Exception as exc:  # a missing shard is skipped like a bad one
            counters.skip("shard_errors", exc)
    return None


def _open_shards(
    urls: Iterator[str], expected: dict[str, int], counters: _Counters, retries: int
) -> Iterator[dict]:
    upcoming = _try_open(urls, counters, retries)
    try:
        while upcoming is not None:
            url, stream = upcoming
            # Open the next shard before reading this one: a remote stream starts prefetching
            # at once, so the next shard's first bytes arrive while this one is decoded.
            upcoming = _try_open(urls, counters, retries)
            counters.in_shard = 0
            with stream:
                yield {"url": url, "stream": stream}
            # Resumed only once every sample of this shard has passed ``_raw_samples``. A
            # truncated tar often ends without an error, so the manifest's count exposes it.
            if counters.in_shard < expected[url]:
                short = f"{url} gave {counters.in_shard} of {expected[url]} samples (truncated?)"
                counters.skip("short_shards", ValueError(short))
    finally:  # an epoch that stops early must not leave the look-ahead stream reading
        if upcoming is not None:
            upcoming[1].close()


def tar_members(stream: IO[bytes]) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of each regular file in an uncompressed tar stream.

    Headers are parsed by the standard library (``TarInfo.frombuf``, which checks checksums);
    each payload is one ``read``. tarfile's stream mode reassembles 10 KiB reads instead, which
    cost more per image than the rest of the stream together.
    """
    while True:
        header = stream.read(tarfile.BLOCKSIZE)
        if not header or header == tarfile.NUL * tarfile.BLOCKSIZE:
            return
        if len(header) < tarfile.BLOCKSIZE:
            raise tarfile.ReadError("truncated tar header")
        info = tarfile.TarInfo.frombuf(header, "utf-8", "surrogateescape")
        if info.type in (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.GNUTYPE_LONGNAME):
            raise tarfile.ReadError(f"{info.name}: pax/GNU headers are not in cmray shards")
        data = stream.read(info.size)
        if len(data) < info.size:
            raise tarfile.ReadError(f"{info.name}: truncated ({len(data)} of {info.size} bytes)")
        stream.read(-info.size % tarfile.BLOCKSIZE)
        if info.isreg():
            yield info.name, data


def _tar_files(shards: Iterator[dict], on_error: Callable[[BaseException], bool]) -> Iterator[dict]:
    """webdataset's file records with an end-of-shard marker, as ``group_by_keys`` expects."""
    for shard in shards:
        try:
            for name, data in tar_members(shard["stream"]):
                yield {"fname": name, "data": data, "__url__": shard["url"]}
        except Exception as exc:  # the rest of a broken shard is skipped; the next one is read
            on_error(exc)
        yield {}


def _raw_samples(
    urls: Iterator[str], expected: dict[str, int], counters: _Counters, retries: int
) -> Iterator[dict]:
    def on_shard_error(exc: BaseException) -> bool:
        return counters.skip("shard_errors", exc)

    files = _tar_files(_open_shards(urls, expected, counters, retries), on_shard_error)
    for sample in tariterators.group_by_keys(files, handler=on_shard_error):
        counters.in_shard += 1
        yield sample


def decode_sample(
    sample: dict, ext: str, resolution: int, flip: bool = False
) -> tuple[np.ndarray, int]:
    """uint8 [R, R, 3] pixels, mirrored if ``flip``, and the class label (-1 when none)."""
    if ext not in sample:
        raise ValueError(f"sample {sample.get('__key__')} has no .{ext} payload")
    img = open_image(sample[ext])
    if img.mode != "RGB":
        img = img.convert("RGB")
    if img.size != (resolution, resolution):
        raise ValueError(f"sample {sample['__key__']} is {img.size}, not {resolution}^2")
    if flip:  # in PIL, so the array stays contiguous and batching is a plain copy
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return np.asarray(img), int(sample["cls"]) if "cls" in sample else -1


def collate(pixels: list[np.ndarray], labels: list[int], keys: list[str]) -> dict[str, Any]:
    """Stack into uint8 [B, 3, R, R] in channels_last layout, the HWC pixels' own order.

    Scaling to float happens later, on the training device (``to_unit_range``): shipping uint8
    between processes and to the GPU moves 4x fewer bytes, and the float pass over 25 MB per
    batch of 32 at 256^2 would otherwise cost the loader about a sixth of its decode time.
    """
    image = torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2)
    return {"image": image, "label": torch.tensor(labels, dtype=torch.long), "key": keys}


def to_unit_range(x: torch.Tensor) -> torch.Tensor:
    """uint8 pixels to float32 in [-1, 1]: x * 2/255 - 1, keeping the memory layout."""
    # Convert, then scale in place: uint8 * float with type promotion is ~8x slower on CPU.
    return x.float().mul_(2.0 / 255.0).sub_(1.0)


class ShardDataset(IterableDataset):
    """One rank's share of the batches of one epoch (``plan``), from batch ``start`` on.

    Each DataLoader process reads some of the rank's streams and yields one item per batch:
    its samples of that batch with their positions, which the rank puts together in order.
    """

    def __init__(
        self,
        cfg: StreamConfig,
        manifest: Manifest,
        urls: list[str],
        plan: EpochPlan,
        rank: int,
        world: int,
        epoch: int,
        start: int = 0,
    ) -> None:
        super().__init__()
        self.cfg, self.manifest, self.urls, self.plan = cfg, manifest, urls, plan
        self.expected = shard_counts(manifest, urls)
        self.rank, self.world, self.epoch, self.start = rank, world, epoch, start
        self.streams = plan.rank_streams(rank, world, start)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        loader, loaders = (info.id, info.num_workers) if info is not None else (0, 1)
        counters = _Counters()
        for batch in self._batches(self.streams[loader::loaders], counters):
            yield dict(batch, stats=(loader, dict(counters.counts)))
        yield {"stats": (loader, dict(counters.counts))}  # counts seen after the last batch

    def _shard_iter(self, stream: int) -> Iterator[str]:
        cfg, streams = self.cfg, self.plan.streams
        if cfg.resampled:
            rng = stream_rng(cfg.seed, self.epoch, stream, "shards")
            # Bounded, so a dataset of nothing but broken shards ends in an error, not a hang.
            per_shard = max(1, self.manifest.count // len(self.urls))
            need = self.plan.taken(stream, self.plan.batches) // per_shard
            return itertools.islice(resampled_shards(self.urls, rng), 10 * need + 10 * streams)
        return iter(stream_shards(self.urls, stream, streams, self.epoch, cfg.seed))

    def _samples(self, stream: int, counters: _Counters) -> Iterator[tuple[dict, bool]]:
        """Stream ``stream``'s samples in order, each with its flip, from its first."""
        cfg, counters = self.cfg, counters.for_stream()
        samples = wds.filters._shuffle(
            _raw_samples(self._shard_iter(stream), self.expected, counters, cfg.retries),
            bufsize=cfg.shuffle_buffer,
            initial=cfg.shuffle_buffer,
            rng=stream_rng(cfg.seed, self.epoch, stream, "shuffle"),
        )
        flips = stream_rng(cfg.seed, self.epoch, stream, "flip")
        for sample in samples:
            yield sample, cfg.flip and flips.random() < 0.5

    def _batches(self, streams: list[int], counters: _Counters) -> Iterator[dict]:
        plan, m = self.plan, self.manifest
        readers = {v: self._samples(v, counters) for v in streams}
        for v in streams:  # resuming: pass over delivered samples without decoding them
            for _ in itertools.islice(readers[v], plan.taken(v, self.start)):
                pass
        for b in range(self.start, plan.batches):
            pixels, labels, keys, positions = [], [], [], []
            for take in plan.takes(b, self.rank, self.world):
                if take.stream not in readers:
                    continue
                got = list(itertools.islice(readers[take.stream], take.count))
                if len(got) < take.count and self.cfg.resampled:
                    raise RuntimeError(f"stream {take.stream} of epoch {self.epoch} ran out")
                for index, (sample, flip) in enumerate(got, start=take.first):
                    if not take.keep_from <= index < take.keep_to:
                        continue
                    try:
                        x, y = decode_sample(sample, m.extension, m.resolution, flip)
                    except Exception as exc:  # any undecodable sample is skipped
                        counters.skip("decode_errors", exc)
                        continue
                    counters.counts["samples"] += 1
                    pixels.append(x)
                    labels.append(y)
                    keys.append(sample["__key__"])
                    positions.append(take.position + index - take.keep_from)
            part = collate(pixels, labels, keys) if pixels else {"key": []}
            yield {**part, "position": torch.tensor(positions, dtype=torch.long)}


def shard_batches(
    url: str,
    manifest: Manifest,
    batch_size: int,
    limit: int | None = None,
    counts: dict[str, int] | None = None,
    retries: int = 5,
) -> Iterator[torch.Tensor]:
    """The first ``limit`` images of one shard, in stored order, as uint8 [B, 3, R, R] batches.

    Faults are skipped and tallied into ``counts`` as the training stream does (bad samples,
    short shards), so one bad image does not sink an evaluation.
    """
    counters = _Counters()
    expected = {url: next(s.count for s in manifest.shards if url.endswith("/" + s.name))}
    pixels: list[np.ndarray] = []
    delivered = 0
    for sample in _raw_samples(iter([url]), expected, counters, retries):
        if limit is not None and delivered + len(pixels) == limit:
            break
        try:
            pixels.append(decode_sample(sample, manifest.extension, manifest.resolution)[0])
        except Exception as exc:  # undecodable: skipped and counted, as in training
            counters.skip("decode_errors", exc)
        if len(pixels) == batch_size:
            yield collate(pixels, [], [])["image"].contiguous()
            delivered, pixels = delivered + len(pixels), []
    if pixels:
        yield collate(pixels, [], [])["image"].contiguous()
    counters.counts["samples"] = delivered + len(pixels)
    if counts is not None:
        counts.update(counters.counts)


# ------------------------------------------------------------------------------ one rank


def merge_parts(parts: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The loaders' parts of one batch as one batch in position order (None: all empty)."""
    parts = [p for p in parts if len(p["position"])]
    if not parts:
        return None
    position = torch.cat([p["position"] for p in parts])
    order = position.argsort(stable=True)
    keys = [k for p in parts for k in p["key"]]
    image = torch.cat([p["image"] for p in parts])[order]
    return {
        "image": image.contiguous(memory_format=torch.channels_last),
        "label": torch.cat([p["label"] for p in parts])[order],
        "key": [keys[i] for i in order.tolist()],
        "position": position[order],
    }


class ShardStream:
    """Training batches for one rank; ``set_epoch(e)`` then iterate, once per epoch.

    Each batch is ``{"image": float32 [n, 3, R, R] in [-1, 1] on device (channels_last),
    "label": int64 [n] (-1 without classes), "key": list of sample keys, "position": int64 [n]
    (the samples' places in the global batch), "global_size": the global batch's count}``:
    this rank's share of global batch b of the epoch's :class:`EpochPlan`.

    ``stats`` totals what the loaders skipped or retried (over all epochs so far), so a run can
    report a bad shard instead of silently training on less data.
    """

    def __init__(
        self,
        cfg: StreamConfig,
        rank: int = 0,
        world_size: int = 1,
        device: torch.device | str = "cpu",
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")
        self.cfg, self.rank, self.world, self.epoch, self.start_batch = cfg, rank, world_size, 0, 0
        self.device = torch.device(device)
        self.manifest = read_manifest(cfg.manifest)
        self.urls = shard_urls(self.manifest, manifest_url(cfg.manifest))
        self.streams = stream_count(cfg, len(self.urls))
        check_enough_shards(len(self.urls), self.streams, cfg.resampled)
        self.plan = self._plan(0)
        if self.plan.size(0) < world_size:
            raise ValueError(
                f"a global batch of {self.plan.size(0)} samples leaves some of {world_size} "
                "ranks without any; raise data.batch_size"
            )
        if cfg.resampled and self.plan.batches == 0:
            samples = cfg.samples_per_epoch or self.manifest.count
            raise ValueError(
                f"an epoch of {samples} samples gives no global batch of {cfg.batch_size}; "
                "lower data.batch_size or raise data.samples_per_epoch"
            )
        if self.streams % world_size and rank == 0:
            log.info(
                "data.streams = %d is not a multiple of %d ranks: some streams are read by two "
                "ranks (the examples are the same; the reading is not shared)",
                self.streams,
                world_size,
            )
        self._done: dict[str, int] = {}
        self._epoch_stats: dict[int, dict[str, int]] = {}

    def _plan(self, epoch: int) -> EpochPlan:
        cfg, V = self.cfg, self.streams
        if cfg.resampled:
            samples = cfg.samples_per_epoch or self.manifest.count
            return EpochPlan.resampled(V, cfg.batch_size, samples)
        counts = shard_counts(self.manifest, self.urls)
        shards = [stream_shards(self.urls, v, V, epoch, cfg.seed) for v in range(V)]
        return EpochPlan.exact([sum(counts[u] for u in s) for s in shards], cfg.batch_size)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """The next iteration yields ``epoch`` from its batch ``start_batch`` (for a resume).

        Skipped samples are read but not decoded, so a resume is exact at any world size.
        """
        if not 0 <= start_batch < len(self):
            raise ValueError(f"start_batch {start_batch} is outside 0..{len(self) - 1}")
        self.epoch, self.start_batch = epoch, start_batch
        self.plan = self._plan(epoch)

    def __len__(self) -> int:
        """Global batches per epoch: the same on every rank, at every world size."""
        return self.plan.batches

    def dataset(self) -> ShardDataset:
        """This epoch's loader-side dataset: the rank's parts of each batch, plus fault counts."""
        args = (self.plan, self.rank, self.world, self.epoch, self.start_batch)
        return ShardDataset(self.cfg, self.manifest, self.urls, *args)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        dataset = self.dataset()
        workers = self.cfg.num_workers
        loader = DataLoader(
            dataset,
            batch_size=None,
            num_workers=workers,
            prefetch_factor=4 if workers else None,
            pin_memory=self.device.type == "cuda",
            # A DataLoader draws worker seeds from the global torch RNG unless given its own;
            # that draw would shift the training step's dropout masks after a resume.
            generator=torch.Generator().manual_seed(self.cfg.seed),
        )
        self._epoch_stats = {}
        parts, b = [], self.start_batch
        try:
            # The DataLoader takes one item from each process in turn: one part of each batch.
            for item in loader:
                loader_id, counts = item.pop("stats")
                self._epoch_stats[loader_id] = counts
                if "position" not in item:
                    continue
                parts.append(item)
                if len(parts) < max(1, workers):
                    continue
                batch, parts = merge_parts(parts), []
                if batch is not None:
                    image = batch["image"].to(self.device, non_blocking=True)
                    yield dict(batch, image=to_unit_range(image), global_size=self.plan.size(b))
                b += 1
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
