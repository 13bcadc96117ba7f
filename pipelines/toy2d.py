"""The 2D ring experiment (tutorial Sec. 4): teacher, CD and CT students, table and figures.

    python pipelines/toy2d.py --out runs/toy2d [--config configs/toy2d.yaml] [--set cd.N=18]

Writes DIR/results.json, DIR/config.yaml, DIR/models.pt and the PNG figures.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from cmray.config import add_config_args, config_from_args, exit_on_config_error
from cmray.experiments import toy2d
from cmray.train.toy_config import Toy2DConfig

DEFAULT_CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "toy2d.yaml")


@exit_on_config_error
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_config_args(parser, default_config=DEFAULT_CONFIG)
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (tiny MLPs run best on one)"
    )
    args = parser.parse_args(argv)
    cfg = config_from_args(Toy2DConfig, args)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - start:7.1f}s] {message}", flush=True)

    toy2d.run(cfg, args.out, log)
    log(f"results in {args.out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
