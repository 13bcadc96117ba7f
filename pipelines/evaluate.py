"""Score a model's samples: FID (or the digits proxy), Inception Score, precision and recall.

    python pipelines/evaluate.py --config configs/eval_lsun_bedroom256.yaml \\
        --set model=s3://bucket/runs/cd/checkpoint_... --set out=runs/eval/cd
    python pipelines/evaluate.py --config configs/eval_digits.yaml     # the CPU demo's proxy

Generation and featurization are spread over Ray actors (one per GPU with use_gpu); set
RAY_ADDRESS or submit this as a Ray job to use a cluster. Writes eval.json and samples.png.
The same command is ``cmray eval run``; ``cmray eval ref-stats`` makes the reference statistics.
"""

from __future__ import annotations

import sys

from cmray.cli import main as cmray_main


def main(argv: list[str] | None = None) -> int:
    return cmray_main(["eval", "run", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
