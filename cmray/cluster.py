"""Joining or starting Ray for the drivers that fan work out as tasks or actors."""

from __future__ import annotations

import os


def ray_init(num_cpus: int | None = None) -> dict[str, float]:
    """Join the cluster named by RAY_ADDRESS, or start a local Ray with ``num_cpus`` CPUs (all,
    when None or 0). Returns the cluster's total resources."""
    import ray

    if not ray.is_initialized():
        if os.environ.get("RAY_ADDRESS"):
            ray.init(log_to_driver=True)
        else:
            # With the dashboard: Ray Train's placement-group cleaner asks the State API whether
            # a run's controller died (a trial stopped early), and without it the run's CPUs and
            # GPUs stay reserved for good.
            # "local": a new instance, never one another process happens to have running
            # (plain ray.init() joins the newest local cluster it finds).
            ray.init(address="local", num_cpus=num_cpus or None)
    return ray.cluster_resources()
