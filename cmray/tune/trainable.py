"""The Ray Tune side of a search (the one module that imports ray.tune): the function
trainable that launches each trial's ``TorchTrainer``, the search space, ASHA and the Tuner.

A trial's Train run is named after its Tune trial ID and kept under the search's directory, so
a trial that Tune restarts (a failed trial retried, or the whole search restored after the
driver died) finds its own checkpoints and continues, and so does its MLflow run. Reports reach
Tune through a callback that forwards only those carrying the quality figure ASHA reads.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import ray.tune
from ray.tune.integration.ray_train import TuneReportCallback

from cmray.config import to_dict
from cmray.tune.config import SearchParam, SearchPlan, TuneConfig, trial_name


class QualityReport(TuneReportCallback):
    """Tune needs the metric in every result it gets; the reports between quality measurements
    (the loss every log_every steps) stay with Ray Train and MLflow."""

    def __init__(self, metric: str) -> None:
        super().__init__()
        self.metric = metric

    def after_report(self, run_context: Any, metrics: list, checkpoint: Any) -> None:
        if metrics and self.metric in metrics[0]:
            super().after_report(run_context, metrics, checkpoint)


def run_trial(config: dict[str, Any], plan: SearchPlan) -> None:
    """Tune's function trainable: build this trial's config and run its TorchTrainer."""
    from cmray.train.worker import absolute_paths, make_toy_trainer, make_trainer

    trial_id = ray.tune.get_context().get_trial_id()
    name, params = trial_name(trial_id), config["params"]
    tracking = dataclasses.replace(plan.cfg.tracking, parent_run=plan.parent_run)
    callbacks = [QualityReport(plan.metric)]
    if plan.cfg.experiment == "toy2d":
        job = {
            "toy": to_dict(plan.trial_config(params)),
            "trial": to_dict(plan.cfg.trial_settings(params)),
            "tracking": to_dict(tracking),
            "name": name,
            "run_key": plan.trial_run_key(trial_id),
            "teacher": plan.teacher_path,
        }
        trainer = make_toy_trainer(job, plan.trials_path, plan.trial_cpus, callbacks)
    else:
        cfg = plan.trial_config(params)
        cfg.run.name, cfg.run.storage_path, cfg.tracking = name, plan.trials_path, tracking
        trainer = make_trainer(absolute_paths(cfg), callbacks)
    trainer.fit()


def _domain(p: SearchParam) -> Any:
    if p.kind == "grid":
        return ray.tune.grid_search(list(p.values))
    if p.kind == "choice":
        return ray.tune.choice(list(p.values))
    if p.kind == "randint":
        return ray.tune.randint(int(p.low), int(p.high))
    sample = ray.tune.loguniform if p.kind == "loguniform" else ray.tune.uniform
    return sample(p.low, p.high)


def param_space(cfg: TuneConfig) -> dict[str, Any]:
    """Tune's search space: ``{"params": {dotted key: domain}}``."""
    return {"params": {p.key: _domain(p) for p in cfg.space}}


def _scheduler(plan: SearchPlan) -> Any:
    from ray.tune.schedulers import ASHAScheduler

    s = plan.cfg.scheduler
    if not s.enabled:
        return None
    return ASHAScheduler(
        time_attr="step",
        max_t=plan.max_t,
        grace_period=min(s.grace_period, plan.max_t),
        reduction_factor=s.reduction_factor,
    )


def make_tuner(plan: SearchPlan, concurrency: int) -> tuple[Any, bool]:
    """A fresh Tuner, or the saved search restored when one exists at the same place; and
    whether it was restored."""
    from ray.tune.search import BasicVariantGenerator

    from cmray.train.worker import ray_storage

    # A trial's own process only waits on its TorchTrainer, whose workers hold the CPUs and
    # GPUs. Tune refuses an empty request, and any CPU share would leave a worker's CPU short,
    # so trials ask for a sliver of the head node instead (where the search's driver runs).
    trainable = ray.tune.with_resources(
        ray.tune.with_parameters(run_trial, plan=plan),
        {"CPU": 0, "node:__internal_head__": 0.001},
    )
    storage_path, storage_fs = ray_storage(plan.cfg.run.storage_path)
    path = f"{storage_path.rstrip('/')}/{plan.cfg.run.name}"
    if ray.tune.Tuner.can_restore(path, storage_filesystem=storage_fs):
        restored = ray.tune.Tuner.restore(
            path, trainable, resume_errored=True, storage_filesystem=storage_fs
        )
        return restored, True
    tuner = ray.tune.Tuner(
        trainable,
        param_space=param_space(plan.cfg),
        tune_config=ray.tune.TuneConfig(
            metric=plan.metric,
            mode="min",
            scheduler=_scheduler(plan),
            # The generator holds the concurrency limit: Tune ignores max_concurrent_trials
            # when handed a generator instance.
            search_alg=BasicVariantGenerator(
                random_state=plan.cfg.seed, max_concurrent=concurrency
            ),
            num_samples=plan.cfg.num_samples,
            trial_dirname_creator=lambda trial: trial_name(trial.trial_id),
        ),
        run_config=ray.tune.RunConfig(
            name=plan.cfg.run.name,
            storage_path=storage_path,
            storage_filesystem=storage_fs,
            failure_config=ray.tune.FailureConfig(max_failures=plan.cfg.run.max_failures),
            verbose=1,
        ),
    )
    return tuner, False
