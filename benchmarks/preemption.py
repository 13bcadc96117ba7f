"""Preemption and elastic resizing on a real multi-node Ray, on this machine's CPUs.

A local cluster (``ray.cluster_utils.Cluster``: a head with no CPUs for workers, and worker
nodes of one CPU each) trains the digits config with two Ray Train workers. At step
``--drain-at`` the node of one rank is drained through Ray's own node-drain call (the one the
autoscaler and ``ray drain-node`` make for a spot reclaim), with a deadline; once the run has
answered, that node is removed, as the cloud would.

Scenarios (``--scenarios``, comma-separated):
- ``straight``: no interruption; the reference run.
- ``unchecked``: the same with ``run.preemption_checkpoint=false``: no per-step question to
  Ray, for the cost of asking.
- ``notice``: cmray's preemption checkpoint: every rank sees the notice the next step,
  checkpoints, and stops; Ray restarts the group on a spare node from that step.
- ``periodic``: the same drain with ``run.preemption_checkpoint=false``: Ray restarts at the
  deadline, from the last periodic checkpoint (the baseline).
- ``elastic``: ``run.num_workers=[1, 2]`` and no spare node: the run continues on one worker
  with the same global batch, and grows back to two when a node is added. From the moment the
  node is added, the one-worker group holds after each step (cmray's ``CMRAY_HOLD_SHRUNK_FILE``)
  until Ray Train has grown it, so the run cannot end before it grows, however many steps
  are left.

Printed per scenario: seconds from the drain call to the first step trained after it, and
steps lost (trained twice); the ratio line compares ``notice`` with ``periodic``. ``--json``
writes every scenario's per-step log (step, world size, loss, time) and its final checkpoint.

    python benchmarks/preemption.py --manifest runs/data/digits16/manifest.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from cmray.config import apply_overrides, from_dict, read_config_file
from cmray.train.config import TrainConfig
from cmray.train.worker import HOLD_ENV

ROOT = Path(__file__).resolve().parents[1]
DRAIN_REASON = "DRAIN_NODE_REASON_PREEMPTION"
RECLAIM_AFTER_S = 2.0


class StepLog:
    """A Ray Train callback (it runs on the controller) appending rank 0's every report to a
    JSON-lines file: the driver's view of which steps were trained, on how many workers."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __call__(self) -> Any:
        from ray.train import UserCallback

        path = self.path

        class Callback(UserCallback):
            def after_report(self, run_context: Any, metrics: list, checkpoint: Any) -> None:
                keys = ("step", "start_step", "world_size", "global_batch", "loss", "preempted")
                line = {k: metrics[0].get(k) for k in keys}
                line |= {"time": time.time(), "checkpoint": checkpoint is not None}
                with open(path, "a") as fh:
                    fh.write(json.dumps(line) + "\n")

        return Callback()


def read_log(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def wait_for(predicate: Any, what: str, running: Any, timeout: float = 600) -> Any:
    """``predicate()``'s first true value, polled while ``running()``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if not running():
            raise RuntimeError(f"the run ended before {what}")
        time.sleep(0.2)
    raise TimeoutError(f"waited {timeout:.0f} s for {what}")


def worker_nodes() -> set[str]:
    """Node ids (hex) hosting a live Ray Train worker."""
    import ray

    return {
        actor["Address"]["NodeID"]
        for actor in ray._private.state.actors().values()
        if actor["ActorClassName"] == "RayTrainWorker" and actor["State"] == "ALIVE"
    }


def drain(gcs_address: str, node_id: str, deadline_s: float) -> None:
    """Ray's own preemption drain of one node (as ``ray drain-node`` and the autoscaler)."""
    import ray
    from ray.core.generated import autoscaler_pb2

    client = ray._raylet.GcsClient(address=gcs_address)
    deadline_ms = int((time.time() + deadline_s) * 1000)
    reason = autoscaler_pb2.DrainNodeReason.Value(DRAIN_REASON)
    accepted, why = client.drain_node(node_id, reason, "cmray preemption drill", deadline_ms)
    if not accepted:
        raise RuntimeError(f"drain of {node_id} refused: {why}")


class Drill:
    """One local multi-node cluster for every scenario; nodes of one CPU each."""

    def __init__(self, nodes: int) -> None:
        import ray
        from ray.cluster_utils import Cluster

        self.cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
        self.nodes = [self.cluster.add_node(num_cpus=1) for _ in range(nodes)]
        self.cluster.wait_for_nodes()
        # A group that asks for more workers than remain gives up after this and asks again
        # for what there is (Ray's default waits 60 s; a real cluster's autoscaler decides).
        env = {"RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "10"}
        ray.init(address=self.cluster.address, runtime_env={"env_vars": env})

    def add_node(self) -> None:
        self.nodes.append(self.cluster.add_node(num_cpus=1))
        self.cluster.wait_for_nodes()

    def resize(self, count: int) -> None:
        """Add or remove worker nodes until there are ``count``."""
        while len(self.nodes) < count:
            self.add_node()
        while len(self.nodes) > count:
            self.remove(self.nodes[-1].node_id)

    def remove(self, node_id: str) -> None:
        node = next(n for n in self.nodes if n.node_id == node_id)
        self.nodes.remove(node)
        self.cluster.remove_node(node)

    def run(self, cfg: TrainConfig, log: Path, interrupt: Any = None) -> dict[str, Any]:
        """Train ``cfg`` to the end while ``interrupt(log, events)`` acts on the cluster from
        this (the main) thread: Ray starts nodes only from a process's main thread."""
        from cmray.train.worker import make_trainer, prepare

        trainer = make_trainer(prepare(cfg), callbacks=[StepLog(log)()])
        events: dict[str, Any] = {}
        outcome: dict[str, Any] = {}

        def fit() -> None:
            try:
                outcome["result"] = trainer.fit()
            except BaseException as exc:  # re-raised in the main thread
                outcome["error"] = exc

        thread = threading.Thread(target=fit, daemon=True)
        thread.start()
        if interrupt is not None:
            interrupt(log, events, thread.is_alive)
        thread.join()
        if "error" in outcome:
            raise outcome["error"]
        return {"log": read_log(log), "checkpoint": outcome["result"].checkpoint.path, **events}

    def preempt(
        self, drain_at: int, deadline_s: float, grow_after: int = 0, hold: Path | None = None
    ) -> Any:
        """At step ``drain_at``, drain one worker's node, and remove it at the deadline, as the
        cloud reclaims it; with ``grow_after``, add a node that many steps after the run has
        resumed (capacity coming back), first creating ``hold`` (the run's HOLD_ENV file)."""

        def interrupt(log: Path, events: dict[str, Any], running: Any) -> None:
            def past(step: int) -> bool:
                return any(e["step"] >= step for e in read_log(log))

            wait_for(lambda: past(drain_at), f"step {drain_at}", running)
            # The actor table can lag the workers' first reports: ask until it lists them.
            node = sorted(wait_for(worker_nodes, "the workers' nodes", running))[-1]
            events["drain_time"] = time.time()
            drain(self.cluster.gcs_address, node, deadline_s)
            # The reclaim: the VM shuts down (SIGTERM to its processes) just after the deadline.
            time.sleep(max(0.0, events["drain_time"] + deadline_s + RECLAIM_AFTER_S - time.time()))
            self.remove(node)
            if grow_after:
                since = events["drain_time"]
                resumed = wait_for(lambda: restart(read_log(log), since), "the restart", running)
                step = resumed["step"] + grow_after
                wait_for(lambda: past(step), f"step {step}", running)
                events["grow_time"] = time.time()
                if hold is not None:
                    hold.touch()
                self.add_node()

        return interrupt


def restart(log: list[dict[str, Any]], since: float) -> dict[str, Any] | None:
    """The first report after ``since`` from a worker group that began after it."""
    before = [e["start_step"] for e in log if e["time"] < since]
    known = set(before)
    return next((e for e in log if e["time"] >= since and e["start_step"] not in known), None)


def resumed_after(
    log: list[dict[str, Any]], since: float, until: float = float("inf")
) -> tuple[float, int]:
    """Seconds from ``since`` to the restarted group's first report, and the steps trained
    twice (reported again by a later group) before ``until``."""
    steps = [e["step"] for e in log if e["time"] < until]
    first = restart(log, since)
    if first is None:
        raise RuntimeError("the run ended before Ray restarted it: give it more steps")
    return first["time"] - since, len(steps) - len(set(steps))


def step_seconds(log: list[dict[str, Any]]) -> float:
    """Median seconds a step between consecutive reports, past the first few (warm-up)."""
    entries = log[3:]
    gaps = sorted(
        (b["time"] - a["time"]) / (b["step"] - a["step"])
        for a, b in itertools.pairwise(entries)
        if b["step"] > a["step"]
    )
    return gaps[len(gaps) // 2]


def make_config(
    args: argparse.Namespace, work: Path, name: str, overrides: list[str], steps: int
) -> TrainConfig:
    data = apply_overrides(read_config_file(args.config), [*args.set, *overrides])
    values = {
        "data.manifest": args.manifest,
        "data.num_workers": 0,  # one CPU a node: the loader reads in the training process
        "run.name": name,
        "run.storage_path": str(work / "runs"),
        "run.cpus_per_worker": 1,
        "run.max_failures": 0,  # a preemption is not a failure: it must not need one
        "loop.steps": steps,
        "loop.log_every": args.log_every,
        "loop.checkpoint_every": args.checkpoint_every,
        "loop.sample_every": 0,
        "tracking.enabled": False,
    }
    data = apply_overrides(data, [f"{k}={v}" for k, v in values.items()])
    return from_dict(TrainConfig, data)


SCENARIOS = {
    "straight": ([], None),
    "unchecked": (["run.preemption_checkpoint=false"], None),
    "notice": ([], "preempt"),
    "periodic": (["run.preemption_checkpoint=false"], "preempt"),
    "elastic": (["run.num_workers=[1,2]", "run.resize_check_s=2"], "grow"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "digits_ct.yaml"))
    parser.add_argument("--manifest", required=True, help="the digits16 manifest")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--scenarios", default="notice,periodic")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--elastic-steps", type=int, default=0, help="elastic (0: --steps)")
    parser.add_argument("--checkpoint-every", type=int, default=20)
    parser.add_argument("--drain-at", type=int, default=30)
    parser.add_argument("--deadline", type=float, default=30.0, help="seconds the drain gives")
    parser.add_argument("--grow-after", type=int, default=4, help="elastic: steps on one")
    parser.add_argument(
        "--log-every",
        type=int,
        default=1,
        help="steps between reports; more than 1 so that Ray Train's one report per poll "
        "does not pace the steps (for straight,unchecked)",
    )
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    scenarios = args.scenarios.split(",")
    unknown = sorted(set(scenarios) - set(SCENARIOS))
    if unknown:
        parser.error(f"--scenarios: unknown {unknown}; accepted: {', '.join(SCENARIOS)}")
    drill = Drill(nodes=2)
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="cmray-preemption-") as tmp:
        work = Path(args.json).parent if args.json else Path(tmp)
        for name in scenarios:
            overrides, kind = SCENARIOS[name]
            steps = args.elastic_steps if name == "elastic" and args.elastic_steps else args.steps
            cfg = make_config(args, work, name, overrides, steps)
            # Two nodes for the two workers, and a spare where the fixed-size group must restart
            # at full size; the elastic run has none, so it must shrink to go on.
            drill.resize(3 if kind == "preempt" else 2)
            interrupt, hold = None, work / f"{name}.hold"
            if kind == "preempt":
                interrupt = drill.preempt(args.drain_at, args.deadline)
            elif kind == "grow":
                interrupt = drill.preempt(args.drain_at, args.deadline, args.grow_after, hold)
            # A rerun into the same folder starts afresh: no old log lines, no run to resume.
            (work / f"{name}.jsonl").unlink(missing_ok=True)
            shutil.rmtree(work / "runs" / name, ignore_errors=True)
            started = time.perf_counter()
            os.environ[HOLD_ENV] = str(hold)  # read as the run starts; the file comes later
            try:
                out = drill.run(cfg, work / f"{name}.jsonl", interrupt)
            finally:
                del os.environ[HOLD_ENV]
                hold.unlink(missing_ok=True)
            out["seconds"] = time.perf_counter() - started
            if "drain_time" in out:
                # A run growing back restarts from its last periodic checkpoint: not counted.
                grown = out.get("grow_time", float("inf"))
                out["resume_s"], out["steps_lost"] = resumed_after(
                    out["log"], out["drain_time"], grown
                )
                print(
                    f"{name}: {out['resume_s']:.1f} s from the drain to training resumed, "
                    f"{out['steps_lost']} step(s) lost; run {out['seconds']:.0f} s",
                    flush=True,
                )
            else:
                print(f"{name}: run {out['seconds']:.0f} s", flush=True)
            results[name] = out
        if {"straight", "unchecked"} <= results.keys():
            asked, plain = (step_seconds(results[k]["log"]) for k in ("straight", "unchecked"))
            print(
                f"straight / unchecked: {asked / plain:.3f} of the time a step "
                f"({1e3 * (asked - plain):+.1f} ms for the per-step notice check)",
                flush=True,
            )
        if {"notice", "periodic"} <= results.keys():
            n, p = results["notice"], results["periodic"]
            print(
                f"notice / periodic: {n['resume_s'] / p['resume_s']:.3f} of the time to resume, "
                f"{n['steps_lost']} vs {p['steps_lost']} steps lost",
                flush=True,
            )
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
