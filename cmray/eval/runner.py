"""Run featurizer tasks in this process or on a pool of Ray actors, in task order.

Each actor loads the model and the feature network once (staging weights from their URL on its
own node, as training does for LPIPS), then serves many tasks. Results come back in task order
so the running sums are the same whatever the pool size. A dead actor is restarted by Ray and
its task retried; tasks are deterministic, so a retry changes nothing.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch

from cmray.eval.config import EvalConfig
from cmray.eval.featurizer import Featurizer, SampleTask, ShardTask
from cmray.progress import Progress

Task = SampleTask | ShardTask


def _method(task: Task) -> str:
    return "samples" if isinstance(task, SampleTask) else "reals"


def _images(task: Task) -> int:
    return task.count if isinstance(task, SampleTask) else task.limit


def actor_count(cfg: EvalConfig, resources: dict[str, float]) -> int:
    """``cfg.workers``, or as many actors as the cluster holds (GPUs, or CPUs per actor)."""
    if cfg.workers > 0:
        return cfg.workers
    if cfg.use_gpu:
        gpus = int(resources.get("GPU", 0))
        if gpus < 1:
            raise ValueError("use_gpu is set but the Ray cluster has no GPU; unset use_gpu")
        return gpus
    return max(1, int(resources.get("CPU", 1) // cfg.cpus_per_worker))


class Runner:
    """Featurizers in-process (``workers = -1``) or as Ray actors; use as a context manager."""

    def __init__(self, cfg: EvalConfig, with_model: bool) -> None:
        self.cfg, self.with_model = cfg, with_model
        self.local: Featurizer | None = None
        self.actors: list[Any] = []
        self._identity: dict[str, str] | None = None
        self._threads = 0

    def __enter__(self) -> Runner:
        # Every featurizer runs on the same thread count, in-process or not, so that figures
        # do not depend on where they were computed.
        threads = max(1, int(self.cfg.cpus_per_worker))
        if self.cfg.workers == -1:
            # In-process, e.g. a local training run making its reference statistics: the
            # process's own thread count comes back on exit.
            self._threads = torch.get_num_threads()
            self.local = Featurizer(self.cfg, self.with_model, threads)
            return self
        import ray

        from cmray.cluster import ray_init

        count = actor_count(self.cfg, ray_init())
        actor = ray.remote(
            num_cpus=self.cfg.cpus_per_worker,
            num_gpus=1 if self.cfg.use_gpu else 0,
            max_restarts=2,
            max_task_retries=2,
        )(Featurizer)
        self.actors = [actor.remote(self.cfg, self.with_model, threads) for _ in range(count)]
        return self

    def __exit__(self, *exc: object) -> None:
        if self.local is not None:
            torch.set_num_threads(self._threads)
            self.local = None
        if self.actors:
            import ray

            for handle in self.actors:
                ray.kill(handle)
            self.actors = []

    def identity(self) -> dict[str, str]:
        """The feature network's kind, fingerprint and figure names (asked once: the
        fingerprint hashes every weight)."""
        if self._identity is None:
            self._identity = self._call("identity")
        return self._identity

    def model_config(self) -> dict[str, Any]:
        return self._call("model_config")

    def _call(self, method: str) -> Any:
        if self.local is not None:
            return getattr(self.local, method)()
        import ray

        return ray.get(getattr(self.actors[0], method).remote())

    def run(self, tasks: Sequence[Task], desc: str) -> Iterator[dict[str, Any]]:
        """Each task's result, in order, with progress in images on stderr."""
        total = sum(_images(t) for t in tasks)
        with Progress(total, desc) as bar:
            for task, result in zip(tasks, self._results(tasks), strict=True):
                bar.update(_images(task))
                yield result

    def _results(self, tasks: Sequence[Task]) -> Iterator[dict[str, Any]]:
        if self.local is not None:
            for task in tasks:
                yield getattr(self.local, _method(task))(task)
            return
        from ray.util import ActorPool

        pool = ActorPool(self.actors)
        yield from pool.map(lambda a, t: getattr(a, _method(t)).remote(t), list(tasks))
