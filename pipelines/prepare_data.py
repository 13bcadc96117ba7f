"""Convert images into WebDataset shards and a manifest at any fsspec URL.

    python pipelines/prepare_data.py --source lmdb:/data/bedroom_train_lmdb \\
        --out s3://bucket/lsun/bedroom256 --resolution 256
    python pipelines/prepare_data.py --source digits --out runs/data/digits32 --resolution 32
    python pipelines/prepare_data.py --config configs/prepare_lsun_bedroom256.yaml

Sources: ``lmdb:PATH`` (an official LSUN export), ``folder:PATH`` (recursive), ``digits``
(scikit-learn's bundled handwritten digits, no download), ``fashion-mnist[:PATH]`` (the
official idx.gz files: Debian's dataset-fashion-mnist, PATH, or downloaded once; the class
labels go into each sample's ``.cls``). Shards are converted by Ray tasks, one per CPU of the
local Ray or of the cluster named by RAY_ADDRESS (``--workers -1``: no Ray).
Re-running the same command resumes an interrupted run; the manifest is written last.
"""

from __future__ import annotations

import argparse
import sys
import time

from cmray.config import add_config_args, config_from_args, exit_on_config_error
from cmray.data.config import PrepareConfig
from cmray.data.prepare import prepare

FLAGS = ("source", "out", "resolution", "name", "encoding", "quality", "resample", "shard_count",
         "shard_size_mb", "workers")  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_config_args(parser)  # a YAML file of these settings; the flags below beat it
    parser.add_argument("--source", help="lmdb:PATH, folder:PATH, digits or fashion-mnist[:PATH]")
    parser.add_argument("--out", help="directory or URL for shards + manifest")
    parser.add_argument("--resolution", type=int, help="R: output is R x R")
    parser.add_argument("--name", help="shard prefix (default: data)")
    parser.add_argument("--encoding", help="png (default), webp, webp_lossless or jpeg")
    parser.add_argument("--quality", type=int, help="webp/jpeg quality (default 95)")
    parser.add_argument("--resample", help="box (default, as the reference), bicubic, lanczos")
    parser.add_argument("--shard-count", type=int, help="max samples per shard (default 10000)")
    parser.add_argument("--shard-size-mb", type=float, help="target shard size (default 512)")
    parser.add_argument("--workers", type=int, help="Ray tasks at once (0: all CPUs; -1: no Ray)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing dataset")
    return parser


@exit_on_config_error
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    flags = {k: getattr(args, k) for k in FLAGS if getattr(args, k) is not None}
    if args.overwrite:
        flags["overwrite"] = True
    cfg = config_from_args(PrepareConfig, args, flags)
    start = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - start:7.1f}s] {message}", flush=True)

    prepare(cfg, log)
    return 0


if __name__ == "__main__":
    sys.exit(main())
