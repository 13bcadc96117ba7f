r"""Search hyperparameters (N, mu, the metric d, the learning rate) with Ray Tune and ASHA.

    python pipelines/tune.py --config configs/tune_toy2d.yaml
    python pipelines/tune.py --config configs/tune_digits_ct.yaml --set num_samples=8
    ray job submit --working-dir . -- \
        python pipelines/tune.py --config configs/tune_lsun_bedroom256_cd.yaml

Each trial is a Ray Train run started from the trial's function trainable. Running the same
command again after the driver died resumes the search (Tuner.restore). The table of trials
and the best config are printed and written to RUN.STORAGE_PATH/RUN.NAME/.
"""

from __future__ import annotations

import argparse
import sys
import time

from cmray.config import add_config_args, config_from_args, exit_on_config_error
from cmray.tune.config import TuneConfig


@exit_on_config_error
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_config_args(parser)
    args = parser.parse_args(argv)
    cfg = config_from_args(TuneConfig, args)
    start = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - start:7.1f}s] {message}", flush=True)

    from cmray.tune.config import plan_search
    from cmray.tune.search import format_table, run_search

    plan = plan_search(cfg)  # the base config and every bound of the space, before Ray starts
    outcome = run_search(plan, log)
    print(format_table(outcome.rows))
    if outcome.best is None:
        log("no trial reported a quality figure")
        return 1
    where = f"{cfg.run.storage_path.rstrip('/')}/{cfg.run.name}"
    log(f"best trial {outcome.best['trial']}: {cfg.experiment} config in {where}/best_config.yaml")
    if outcome.champion:
        log(f"its model: models:/{cfg.tracking.registry_name}@champion")
    log(f"all trials: {where}/results.csv")
    return 0


if __name__ == "__main__":
    sys.exit(main())
