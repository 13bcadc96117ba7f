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
            # "local": a new instance, never one another process happens to have running
            # (plain ray.init() joins the newest local cluster it finds).
            ray.init(address="local", num_cpus=num_cpus or None)
            announce_local_cluster()
    return ray.cluster_resources()


def announce_local_cluster() -> None:
    """Record this cluster as the machine's current one, as ``ray start`` does.

    Ray Train's placement-group cleaner asks the State API (through the dashboard, hence
    ray[default]) whether a run's controller died, e.g. a trial that ASHA stopped. The State
    API finds the cluster through RAY_ADDRESS or this record, which ray.init() leaves alone:
    after any earlier ``ray start`` it names a dead cluster, the query fails, and the stopped
    run's CPUs and GPUs stay reserved for good.
    """
    import ray
    from ray._private.utils import write_ray_address  # what `ray start` calls

    write_ray_address(ray.get_runtime_context().gcs_address)
