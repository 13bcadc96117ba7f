"""Source -> prepared images -> WebDataset tar shards at any fsspec URL, in parallel and resumable.

Layout at ``out``::

    <name>-000000.tar ...   complete shards only (each appears atomically)
    _progress/plan.json     the plan this run follows (settings, chunks, fingerprint)
    _progress/<shard>.json  one record per finished shard: count, bytes, sha256
    manifest.json           written last; its presence means the dataset is complete

A re-run with the same settings resumes by skipping shards that have a record; a shard without
one is rewritten under the same name, so samples are never duplicated. Different settings on a
non-empty ``out`` are refused rather than mixed.
"""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
import tempfile
from dataclasses import dataclass
from typing import Any

import webdataset as wds

from cmray.config import ConfigError
from cmray.data.config import PrepareConfig
from cmray.data.manifest import (
    MANIFEST_NAME,
    Manifest,
    manifest_url,
    read_manifest,
)
from cmray.data.preprocess import encode_image, extension, open_image, prepare_image
from cmray.data.sources import Chunk, Source
from cmray.storage import join_url, put_file_atomic, url_to_fs, write_bytes_atomic

PROGRESS_DIR = "_progress"
TAR_BLOCK = 512
# Per sample: three members (image, json, cls), each a header block, the small two one block.
TAR_OVERHEAD_BYTES = 5 * TAR_BLOCK
PROBE_IMAGES = 16


@dataclass(frozen=True)
class Plan:
    """Which source records go into which shard, and the settings that shape every byte."""

    settings: dict[str, Any]
    chunks: list[Chunk]

    @property
    def fingerprint(self) -> str:
        text = json.dumps({"settings": self.settings, "chunks": self.chunks}, sort_keys=True)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]

    def shard_name(self, index: int) -> str:
        return f"{self.settings['name']}-{index:06d}.tar"


def _settings(cfg: PrepareConfig, source: Source) -> dict[str, Any]:
    keys = ("name", "resolution", "encoding", "quality", "resample")
    return {"source": source.spec, **{k: getattr(cfg, k) for k in keys}}


def encode_record(payload: Any, cfg: PrepareConfig) -> bytes:
    """One source image to shard bytes; raises on an image that cannot be decoded."""
    img = open_image(payload) if isinstance(payload, bytes) else payload
    return encode_image(prepare_image(img, cfg.resolution, cfg.resample), cfg.encoding, cfg.quality)


def samples_per_shard(source: Source, cfg: PrepareConfig) -> int:
    """The count bound, lowered so a shard stays near ``shard_size_mb`` at probed image sizes."""
    sizes = []
    for _, payload, _ in source.head(PROBE_IMAGES):
        try:
            sizes.append(len(encode_record(payload, cfg)))
        except Exception:  # a bad image is skipped later; here it just isn't probed
            continue
    if not sizes:
        return cfg.shard_count
    # The largest probe plus 10% is conservative, so shards land at or under the target size.
    payload = -(-int(1.1 * max(sizes)) // TAR_BLOCK) * TAR_BLOCK
    per_sample = payload + TAR_OVERHEAD_BYTES
    # The archive's end marker and its padding to whole 10 KiB records come once per shard.
    usable = cfg.shard_size_mb * 2**20 - 2 * tarfile.RECORDSIZE
    return max(1, min(cfg.shard_count, int(usable / per_sample)))


def make_plan(source: Source, cfg: PrepareConfig) -> Plan:
    # Probing first means one pass over the keys (LSUN: 3M) instead of one per bound.
    per_shard = samples_per_shard(source, cfg)
    chunks = source.chunks(per_shard)
    if not chunks:
        raise ConfigError(f"source {source.spec!r} holds no images", key="source")
    return Plan(settings=dict(_settings(cfg, source), per_shard=per_shard), chunks=chunks)


# ----------------------------------------------------------------------- one shard (a Ray task)


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_tar(source: Source, chunk: Chunk, cfg: PrepareConfig, tar_path: str) -> dict[str, Any]:
    ext = extension(cfg.encoding)
    count, skipped, max_label = 0, [], -1
    with open(tar_path, "wb") as fh, wds.TarWriter(fh, mtime=0, format=tarfile.USTAR_FORMAT) as tar:
        for offset, (key, payload, label) in enumerate(source.read(chunk)):
            try:
                data = encode_record(payload, cfg)
            except Exception as exc:  # any undecodable image is skipped, not fatal
                skipped.append(f"{key}: {type(exc).__name__}: {exc}"[:200])
                continue
            # Keys number the source order, so they are unique and stable across re-runs.
            sample = {
                "__key__": f"{chunk['start'] + offset:09d}",
                ext: data,
                "json": json.dumps({"source_key": key}).encode("utf-8"),
            }
            if label is not None:
                sample["cls"] = str(label).encode("ascii")
                max_label = max(max_label, label)
            tar.write(sample)
            count += 1
    return {
        "count": count,
        "skipped": len(skipped),
        "skipped_examples": skipped[:10],
        "classes": max_label + 1,
    }


def convert_shard(source: Source, chunk: Chunk, name: str, cfg: PrepareConfig) -> dict[str, Any]:
    """Write one shard, then its progress record; the shard is never visible half-written."""
    fs, out_path = url_to_fs(cfg.out)
    fd, tar_path = tempfile.mkstemp(suffix=".tar", prefix=f"{name}.")
    os.close(fd)
    try:
        record = _write_tar(source, chunk, cfg, tar_path)
        record.update(name=name, bytes=os.path.getsize(tar_path), sha256=_sha256(tar_path))
        put_file_atomic(tar_path, fs, f"{out_path.rstrip('/')}/{name}")
    finally:
        os.unlink(tar_path)
    progress = join_url(cfg.out, PROGRESS_DIR, name.replace(".tar", ".json"))
    write_bytes_atomic(progress, json.dumps(record).encode("utf-8"))
    return record


# ----------------------------------------------------------------------------- resume / refuse


def _dataset_files(cfg: PrepareConfig) -> list[str]:
    fs, root = url_to_fs(cfg.out)
    if not fs.exists(root):
        return []
    names = [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(root, detail=False)]
    return [
        n
        for n in names
        if n in (MANIFEST_NAME, PROGRESS_DIR)
        or (n.startswith(f"{cfg.name}-") and n.endswith(".tar"))
    ]


def delete_dataset(cfg: PrepareConfig) -> None:
    fs, root = url_to_fs(cfg.out)
    for name in _dataset_files(cfg):
        fs.rm(f"{root.rstrip('/')}/{name}", recursive=True)


def finished_records(cfg: PrepareConfig, plan: Plan) -> dict[str, dict[str, Any]]:
    """Records of shards a previous run finished under this plan; refuses a different plan."""
    fs, root = url_to_fs(cfg.out)
    plan_path = f"{root.rstrip('/')}/{PROGRESS_DIR}/plan.json"
    existing = _dataset_files(cfg)
    if not fs.exists(plan_path):
        if existing:
            raise ConfigError(
                f"{cfg.out} already holds shards named {cfg.name}-*.tar from "
                "another run; pass --overwrite or choose another --out",
                key="out",
            )
        return {}
    previous = json.loads(fs.cat_file(plan_path))
    if previous["fingerprint"] != plan.fingerprint:
        raise ConfigError(
            f"{cfg.out} holds an unfinished run with different settings "
            f"({previous['settings']}); pass --overwrite or choose another --out",
            key="out",
        )
    records = {}
    for path in fs.glob(f"{root.rstrip('/')}/{PROGRESS_DIR}/{cfg.name}-*.json"):
        record = json.loads(fs.cat_file(path))
        records[record["name"]] = record
    return records


def check_finished(cfg: PrepareConfig, plan: Plan) -> Manifest | None:
    """The finished dataset if ``out`` already holds this very plan's; refuses another one."""
    fs, path = url_to_fs(manifest_url(cfg.out))
    if not fs.exists(path):
        return None
    manifest = read_manifest(cfg.out)
    if manifest.fingerprint != plan.fingerprint:
        raise ConfigError(
            f"{cfg.out} already holds a finished dataset made with different "
            "settings; pass --overwrite or choose another --out",
            key="out",
        )
    return manifest
