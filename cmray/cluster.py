"""Joining or starting Ray for the drivers that fan work out as tasks or actors."""

from __future__ import annotations

import atexit
import logging
import os
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any


def ray_init(num_cpus: int | None = None, log: Callable[[str], None] = print) -> dict[str, float]:
    """Join the cluster named by RAY_ADDRESS, or start a local Ray with ``num_cpus`` CPUs (all,
    when None or 0). Returns the cluster's total resources. Joining a cluster frees the
    reservations that Ray leaked there (:func:`reclaim_orphaned_groups`), at once and then
    every RECLAIM_EVERY_S while the driver runs (:class:`Reclaimer`)."""
    import ray

    if not ray.is_initialized():
        if os.environ.get("RAY_ADDRESS"):
            ray.init(log_to_driver=True)
            if reclaim_orphaned_groups(log) is not None:
                Reclaimer(log)
        else:
            # "local": a new instance, never one another process happens to have running
            # (plain ray.init() joins the newest local cluster it finds).
            ray.init(address="local", num_cpus=num_cpus or None)
            announce_local_cluster()
    return ray.cluster_resources()


def capacity(resources: dict[str, float]) -> dict[str, float]:
    """The most the cluster can hold: an autoscaling cluster's node types at their max counts
    (the config its autoscaler publishes, which Ray Data reads too), or what is up now where
    that is more (a fixed cluster publishes none). A search sized by the nodes up at its start
    would run one trial on an autoscaling cluster that starts with its head alone."""
    import ray

    try:
        most = ray._private.state.state.get_max_resources_from_cluster_config() or {}
    except Exception:  # no autoscaler state in this Ray: the nodes up now are the cluster
        most = {}
    keys = set(resources) | set(most)
    return {k: max(float(resources.get(k, 0.0)), float(most.get(k, 0))) for k in keys}


def use_cluster_token() -> bool:
    """Send the cluster's token when RAY_AUTH_MODE is unset and this machine has one
    (RAY_AUTH_TOKEN, the file RAY_AUTH_TOKEN_PATH names, or ~/.ray/auth_token, which ``ray
    start`` writes): a default ``ray start`` head requires it of every client. Call before the
    first Ray client of the process, which reads the mode once."""
    mode = os.environ.get("RAY_AUTH_MODE")
    if mode is not None:
        return mode.lower() == "token"
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    if os.environ.get("RAY_AUTH_TOKEN") or path.is_file():
        os.environ["RAY_AUTH_MODE"] = "token"
        return True
    return False


def announce_local_cluster() -> None:
    """Record this cluster as the machine's current one, as ``ray start`` does.

    Ray Train's placement-group cleaner asks the State API (through the dashboard, hence
    ray[default]) whether a run's controller died, e.g. a trial that ASHA stopped. The State
    API finds the cluster through RAY_ADDRESS or this record, which ray.init() leaves alone:
    after any earlier ``ray start`` it names a dead cluster, the query fails, and the stopped
    run's CPUs and GPUs stay reserved for good.
    """
    import ray
    from ray._private import utils
    from ray._private.utils import write_ray_address  # what `ray start` calls

    # Replacing the record of an earlier cluster is the point, not news: its INFO line
    # ("Overwriting previous Ray address") stays out of the log.
    quiet = logging.getLogger(utils.__name__)
    level = quiet.level
    quiet.setLevel(logging.WARNING)
    try:
        write_ray_address(ray.get_runtime_context().gcs_address)
    finally:
        quiet.setLevel(level)


_ENDED_JOB = frozenset({"SUCCEEDED", "FAILED", "STOPPED"})


def orphaned_groups(groups: Iterable[Any], jobs: Iterable[Any], actors: Iterable[Any]) -> list[str]:
    """The placement groups, among the State API's ``groups``, that nothing can use or free:
    not detached, made by a job listed as ended, and with no detached actor of that job alive
    (one may own groups it still uses). The job's other actors do not count: Ray ends them
    with the job, and one that the dying job asked for last can stay pending for ever, as the
    leaked group's would-be worker did. ``groups``: those not yet removed; ``actors``: those
    not dead (both filtered by the State API query)."""
    ended = {j.job_id for j in jobs if j.job_id and str(j.status).split(".")[-1] in _ENDED_JOB}
    ended -= {a.job_id for a in actors if a.is_detached is not False}  # unknown: kept
    return [g.placement_group_id for g in groups if not g.is_detached and g.creator_job_id in ended]


def reclaim_orphaned_groups(log: Callable[[str], None] = print) -> list[str] | None:
    """Remove the placement groups that Ray leaked on this cluster; returns their IDs, or None
    when the State API cannot be asked (no dashboard), which ``log`` is told.

    Ray removes a job's placement groups when the job ends, but a group that one of the job's
    actors asks for while the job is being torn down (a Train controller restarting its worker
    group just as a killed search driver's job ends) is registered after that cleanup and
    keeps its CPUs and GPUs reserved until the cluster stops: the next search waits for ever.
    """
    try:
        removed = _orphans()
    except Exception as exc:  # no dashboard, hence no State API: nothing can be checked
        log(f"note: could not look for leaked placement groups ({type(exc).__name__}: {exc})")
        return None
    for group_id in removed:
        remove_group(group_id)
        log(f"freed placement group {group_id}: left reserved by a job that has ended")
    return removed


def _orphans() -> list[str]:
    from ray.util import state

    ask = {"limit": 10_000, "timeout": 10, "raise_on_missing_output": False}
    groups = state.list_placement_groups(filters=[("state", "!=", "REMOVED")], **ask)
    if not groups:
        return []
    jobs = state.list_jobs(**ask)
    actors = state.list_actors(filters=[("state", "!=", "DEAD")], detail=True, **ask)
    return orphaned_groups(groups, jobs, actors)


RECLAIM_EVERY_S = 10.0


class Reclaimer:
    """:func:`reclaim_orphaned_groups` every ``every_s`` on a daemon thread while the driver is
    connected. The check at the start is not enough: a search resumed at once after its driver
    was killed passes it before the dead job's leak is registered, seconds later, and would
    then wait for ever on the CPUs the leak holds."""

    def __init__(self, log: Callable[[str], None], every_s: float = RECLAIM_EVERY_S) -> None:
        self.log, self.every_s, self.rounds = log, every_s, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="cmray-reclaim", daemon=True)
        self._thread.start()
        atexit.register(self.stop)  # runs before Ray's own exit handler: no call into a closed Ray

    def _loop(self) -> None:
        import ray

        while not self._stop.wait(self.every_s) and ray.is_initialized():
            if reclaim_orphaned_groups(self.log) is None:
                return  # the State API went away (it said so once): the cluster is going
            self.rounds += 1

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=15)


def remove_group(group_id: str) -> None:
    """Remove a placement group by its hex ID (as the State API lists it), whoever made it."""
    import ray
    from ray.util.placement_group import PlacementGroup

    ray.util.remove_placement_group(PlacementGroup(ray.PlacementGroupID.from_hex(group_id)))
