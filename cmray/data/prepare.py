"""The shard-writing driver: plan, resume, fan shards out to Ray tasks, write the manifest last."""

from __future__ import annotations

import collections
import json
import time
from collections.abc import Callable, Iterator
from typing import Any

from cmray.cluster import ray_init
from cmray.data.config import PrepareConfig
from cmray.data.manifest import Manifest, ShardInfo, write_manifest
from cmray.data.preprocess import extension
from cmray.data.sources import Source, parse_source
from cmray.data.writer import (
    PROGRESS_DIR,
    Plan,
    check_finished,
    convert_shard,
    delete_dataset,
    finished_records,
    make_plan,
)
from cmray.progress import Progress
from cmray.storage import join_url, url_to_fs, write_bytes_atomic

Log = Callable[[str], None]


def _convert_inline(
    source: Source, plan: Plan, todo: list[int], cfg: PrepareConfig
) -> Iterator[dict[str, Any]]:
    for i in todo:
        yield convert_shard(source, plan.chunks[i], plan.shard_name(i), cfg)


def _convert_with_ray(
    source: Source, plan: Plan, todo: list[int], cfg: PrepareConfig
) -> Iterator[dict[str, Any]]:
    import ray

    ray_init(cfg.workers)
    cpus = max(1, int(ray.available_resources().get("CPU", 1)))
    # OSError covers transient storage failures; a crashed worker process is retried anyway.
    task = ray.remote(num_cpus=1, max_retries=3, retry_exceptions=[OSError])(convert_shard)
    source_ref, queue, running = ray.put(source), collections.deque(todo), []
    while queue or running:
        # A bounded window keeps the object store small when there are 100k shards to write.
        while queue and len(running) < 2 * cpus:
            i = queue.popleft()
            running.append(task.remote(source_ref, plan.chunks[i], plan.shard_name(i), cfg))
        ready, running = ray.wait(running, num_returns=1)
        yield ray.get(ready[0])


def _manifest(plan: Plan, cfg: PrepareConfig, records: dict[str, dict[str, Any]]) -> Manifest:
    shards = [
        ShardInfo(name=r["name"], count=r["count"], bytes=r["bytes"], sha256=r["sha256"])
        for r in (records[plan.shard_name(i)] for i in range(len(plan.chunks)))
        if r["count"] > 0
    ]
    return Manifest(
        name=cfg.name,
        resolution=cfg.resolution,
        encoding=cfg.encoding,
        extension=extension(cfg.encoding),
        count=sum(s.count for s in shards),
        shards=shards,
        source=plan.settings["source"],
        fingerprint=plan.fingerprint,
        skipped=sum(r["skipped"] for r in records.values()),
        classes=max(r["classes"] for r in records.values()),
    )


def _start_or_resume(cfg: PrepareConfig, plan: Plan, log: Log) -> dict[str, dict[str, Any]]:
    if cfg.overwrite:
        delete_dataset(cfg)
    done = finished_records(cfg, plan)
    if done:
        log(f"resuming: {len(done)} of {len(plan.chunks)} shards already written")
    else:
        plan_json = {"fingerprint": plan.fingerprint, "settings": plan.settings}
        write_bytes_atomic(
            join_url(cfg.out, PROGRESS_DIR, "plan.json"), json.dumps(plan_json).encode("utf-8")
        )
    return done


def prepare(cfg: PrepareConfig, log: Log = print) -> Manifest:
    """Convert ``cfg.source`` into shards at ``cfg.out`` and return the written manifest."""
    source = parse_source(cfg.source)
    plan = make_plan(source, cfg)
    finished = None if cfg.overwrite else check_finished(cfg, plan)
    if finished is not None:
        log(f"{cfg.out} already holds this dataset ({finished.count} images); nothing to do")
        return finished
    records = _start_or_resume(cfg, plan, log)
    todo = [i for i in range(len(plan.chunks)) if plan.shard_name(i) not in records]
    images = sum(plan.chunks[i]["count"] for i in todo)
    log(
        f"{source.spec}: {len(todo)} shards of up to {plan.settings['per_shard']} images "
        f"({images} images) to {cfg.out}"
    )
    convert = _convert_inline if cfg.workers < 0 else _convert_with_ray
    start = time.perf_counter()
    with Progress(images, "shards") as bar:
        for record in convert(source, plan, todo, cfg):
            records[record["name"]] = record
            bar.update(record["count"] + record["skipped"])
            for example in record["skipped_examples"]:
                log(f"skipped an undecodable image: {example}")
    seconds = time.perf_counter() - start
    manifest = _manifest(plan, cfg, records)
    write_manifest(manifest, cfg.out)
    fs, root = url_to_fs(cfg.out)
    fs.rm(f"{root.rstrip('/')}/{PROGRESS_DIR}", recursive=True)
    log(
        f"wrote {manifest.count} images in {len(manifest.shards)} shards "
        f"({images / max(seconds, 1e-9):.1f} img/s); skipped {manifest.skipped}; "
        f"manifest {join_url(cfg.out, 'manifest.json')}"
    )
    return manifest
