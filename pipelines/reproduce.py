"""Reproduce the paper's claims in miniature: a teacher, every method, one table.

    python pipelines/reproduce.py --suite digits|fashion|ring [--out DIR] [--set KEY=VALUE ...]
    python pipelines/reproduce.py --config configs/reproduce_digits.yaml

Trains an EDM teacher on the bundled digits until its 35-NFE figure levels off, then CD (l2,
pseudo-Huber), CT, iCT, ECT, sCT and sCD from the same budget as one Ray Tune grid search,
scores every row and the teacher the same way, and writes results.json, table.md,
samples.png and nfe.png into the study's directory. ``--suite fashion`` runs the same on
Fashion-MNIST (scored by the shipped Fashion-MNIST classifier, the test images against the
training set as the floor); ``--suite ring`` on the 2D ring of Gaussians, scored by the energy
distance. Re-running the same command resumes.
"""

from __future__ import annotations

import argparse
import sys
import time

from cmray.config import add_config_args, config_from_args, exit_on_config_error
from cmray.experiments.reproduce_config import ReproduceConfig

SUITES = {
    "digits": "configs/reproduce_digits.yaml",
    "fashion": "configs/reproduce_fashion.yaml",
    "ring": "configs/reproduce_ring.yaml",
}


@exit_on_config_error
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_config_args(parser)
    parser.add_argument("--suite", choices=sorted(SUITES), help="the study's shipped config")
    parser.add_argument("--out", help="the study's directory (default: the config's out)")
    args = parser.parse_args(argv)
    if args.config is None:
        args.config = SUITES[args.suite or "digits"]
    cfg = config_from_args(ReproduceConfig, args, {"out": args.out} if args.out else None)
    start = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - start:7.1f}s] {message}", flush=True)

    if cfg.suite == "ring":
        from cmray.experiments.reproduce_ring import run_ring_study as run
    else:
        from cmray.experiments.reproduce import run_study as run
    run(cfg, log)
    log(f"study done in {(time.perf_counter() - start) / 60:.1f} min: {cfg.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
