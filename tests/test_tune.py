"""Hyperparameter searches: config checks, resumable toy students, and real Ray Tune searches
(the toy with a driver crash and ``Tuner.restore``; digits CT with MLflow and S3 artifacts)."""

from __future__ import annotations

import csv
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from cmray.config import ConfigError, from_dict, load_config
from cmray.tune.config import TuneConfig, plan_search
from cmray.tune.search import max_concurrent

ROOT = Path(__file__).resolve().parents[1]
TOY_SPACE = [
    {"key": "ct.optim.lr", "kind": "grid", "values": [1.0e-5, 3.0e-3]},
    {"key": "ct.metric", "kind": "grid", "values": ["l2", "pseudo_huber"]},
]


TOY_TRIAL = {"quality_every": 40, "quality_samples": 500, "reference_samples": 1000}


def toy_tune(**over: object) -> dict:
    """A toy search small enough for CI: 240 steps a trial, scored every 40."""
    cfg = {
        "experiment": "toy2d",
        "base": str(ROOT / "configs" / "toy2d.yaml"),
        "overrides": ["ring.train_points=4096", "ct.optim.epochs=30", "ct.net.hidden=32"],
        "space": TOY_SPACE,
        "num_samples": 2,
        "scheduler": {"grace_period": 80, "reduction_factor": 2},
        "toy": TOY_TRIAL,
        "run": {"name": "toy", "storage_path": "runs/tune"},
        "tracking": {"enabled": False},
    }
    cfg.update(over)
    return cfg


# --------------------------------------------------------------------------- config


def test_shipped_tune_configs_plan(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)  # the shipped configs name their base relative to the repository
    plans = {}
    for path in sorted((ROOT / "configs").glob("tune_*.yaml")):
        cfg = load_config(TuneConfig, path)
        if cfg.experiment == "train":
            assert cfg.tracking.registry_name, path  # the champion alias needs a registry
        plans[path.name] = plan_search(cfg)
    assert plans["tune_toy2d.yaml"].metric == "energy_distance"
    assert plans["tune_digits_ct.yaml"].metric == "fd_digits"
    lsun = plans["tune_lsun_bedroom256_cd.yaml"]
    assert (lsun.metric, lsun.trial_gpus, lsun.trial_cpus) == ("fid", 8.0, 64.0)


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"key": "ct.s0", "values": [-1, 10]}, "space ct.s0 = -1: ct.s0 = -1 is out of range"),
        ({"key": "ct.metric", "values": ["lpips"]}, "choose one of: l2, l1, pseudo_huber"),
        ({"key": "ct.sX", "values": [1]}, "unknown key 'ct.sX'"),
        ({"key": "ct.mu0", "kind": "uniform", "low": 0.9, "high": 1.5}, "ct.mu0 = 1.5"),
        ({"key": "ct.optim.lr", "kind": "loguniform", "low": 0, "high": 1}, "needs low > 0"),
        ({"key": "ct.s1", "kind": "randint", "low": 5, "high": 5}, "must be below high"),
    ],
)
def test_a_bad_space_names_the_value_and_what_is_accepted(entry: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")) as info:
        plan_search(from_dict(TuneConfig, toy_tune(space=[entry])))
    assert "\n" not in str(info.value)


def test_an_image_search_needs_a_quality_figure(tmp_path: Path) -> None:
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump({"data": {"manifest": "m.json"}}))
    cfg = from_dict(
        TuneConfig,
        {"base": str(base), "space": [{"key": "optim.lr", "values": [1e-4]}]},
    )
    with pytest.raises(ConfigError, match=r"quality\.every = 0"):
        plan_search(cfg)


def test_the_pipeline_rejects_a_bad_config_in_one_line(tmp_path: Path) -> None:
    path = tmp_path / "t.yaml"
    path.write_text(yaml.safe_dump(toy_tune(space=[{"key": "ct.s0", "values": [-1]}])))
    proc = subprocess.run(
        [sys.executable, str(ROOT / "pipelines" / "tune.py"), "--config", str(path)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "config error: space ct.s0 = -1: ct.s0 = -1 is out of range; accepted: value >= 0"
    ]
    assert not (tmp_path / "runs").exists()  # nothing started, nothing written


def test_concurrency_follows_the_cluster() -> None:
    plan = plan_search(from_dict(TuneConfig, toy_tune(toy={"cpus": 2})))
    assert max_concurrent(plan, {"CPU": 8.0}) == 4
    assert max_concurrent(plan, {"CPU": 5.0}) == 2
    with pytest.raises(ConfigError, match="a trial needs 2 CPUs"):
        max_concurrent(plan, {"CPU": 1.0})
    gpu = plan_search(from_dict(TuneConfig, toy_tune()))
    gpu.trial_cpus, gpu.trial_gpus = 8.0, 8.0
    assert max_concurrent(gpu, {"CPU": 128.0, "GPU": 16.0}) == 2
    fixed = plan_search(from_dict(TuneConfig, toy_tune(run={"max_concurrent_trials": 3})))
    assert max_concurrent(fixed, {"CPU": 1.0}) == 3


@pytest.mark.slow
def test_an_autoscaling_clusters_node_types_size_the_search(ray_cluster: str) -> None:
    """On an autoscaling cluster the nodes up at a search's start are not its size: the node
    types at their max counts are. The autoscaler publishes them in the GCS, where Ray's own
    reader finds them; its fake provider is not in the wheel, so the test publishes what an
    autoscaler would (up to 3 nodes of 4 GPUs and 32 CPUs) on the session's Ray, briefly."""
    import ray
    from ray.core.generated import autoscaler_pb2
    from ray.experimental import internal_kv

    from cmray.cluster import capacity

    up = ray.cluster_resources()
    assert capacity(up) == pytest.approx({k: v for k, v in up.items()})  # a fixed cluster
    config = autoscaler_pb2.ClusterConfig()
    group = config.node_group_configs.add()
    group.resources.update({"CPU": 32, "GPU": 4})
    group.max_count = 3
    key = ray._raylet.GCS_AUTOSCALER_CLUSTER_CONFIG_KEY.encode()
    space = ray._raylet.GCS_AUTOSCALER_STATE_NAMESPACE.encode()
    internal_kv._internal_kv_put(key, config.SerializeToString(), namespace=space)
    try:
        most = capacity(up)
    finally:
        internal_kv._internal_kv_del(key, namespace=space)
    assert most["CPU"] == 96 and most["GPU"] == 12  # no GPU is up: the types say 12 may be
    gpu = plan_search(from_dict(TuneConfig, toy_tune()))
    gpu.trial_cpus, gpu.trial_gpus = 8.0, 4.0
    assert max_concurrent(gpu, most) == 3


def test_a_group_is_orphaned_when_its_job_ended_and_no_detached_actor_of_it_lives() -> None:
    from types import SimpleNamespace as R

    from cmray.cluster import orphaned_groups

    def group(name: str, job: str, detached: bool = False) -> R:
        return R(placement_group_id=name, creator_job_id=job, is_detached=detached, state="CREATED")

    groups = [group("leaked", "04"), group("mine", "06"), group("kept", "04", detached=True)]
    groups += [group("owned", "02")]  # job 02 ended, but its detached actor may use the group
    jobs = [R(job_id="04", status="SUCCEEDED"), R(job_id="06", status="RUNNING")]
    jobs += [R(job_id="02", status="FAILED"), R(job_id=None, status="PENDING")]
    # Job 04's last actor, asked for as the job ended, pending for ever: not a keeper.
    actors = [R(job_id="02", is_detached=True), R(job_id="04", is_detached=False)]
    assert orphaned_groups(groups, jobs, actors) == ["leaked"]
    unknown = [R(job_id="04", is_detached=None)]  # the State API did not say: kept
    assert orphaned_groups(groups, jobs, unknown) == ["owned"]
    running = [R(job_id="04", status="JobStatus.RUNNING")]  # as an enum prints, too
    assert orphaned_groups(groups, running, actors) == []  # and a job not listed: kept


@pytest.mark.slow
def test_reclaiming_leaves_live_and_detached_groups_and_frees_one_by_id(ray_cluster: str) -> None:
    """On a real Ray, through the State API: the reclaim keeps a group this (live) job made and
    a detached one, and the removal frees a group's CPU by the ID the State API lists."""
    import ray
    from ray.util import state
    from ray.util.placement_group import placement_group

    from cmray.cluster import reclaim_orphaned_groups, remove_group

    live = placement_group([{"CPU": 1}])
    kept = placement_group([{"CPU": 1}], lifetime="detached")
    ray.get([live.ready(), kept.ready()], timeout=60)
    ids = [g.id.hex() for g in (live, kept)]
    try:
        lines: list[str] = []
        assert not set(reclaim_orphaned_groups(lines.append)) & set(ids)
        listed = {g.placement_group_id: g.state for g in state.list_placement_groups(limit=10_000)}
        assert [listed[i] for i in ids] == ["CREATED", "CREATED"]
        assert not any("could not look" in line for line in lines)
    finally:
        for group_id in ids:
            remove_group(group_id)
    gone = {g.placement_group_id: g.state for g in state.list_placement_groups(limit=10_000)}
    assert [gone[i] for i in ids] == ["REMOVED", "REMOVED"]


@pytest.mark.slow
def test_a_driver_keeps_reclaiming_while_it_runs_and_stops_with_it(ray_cluster: str) -> None:
    """The reclaim goes on after the start, round after round on the real State API, leaves a
    live group alone, and its thread ends when told (at the driver's exit)."""
    import ray
    from ray.util.placement_group import placement_group

    from cmray.cluster import Reclaimer, remove_group

    live = placement_group([{"CPU": 1}])
    ray.get(live.ready(), timeout=60)
    lines: list[str] = []
    reclaimer = Reclaimer(lines.append, every_s=0.2)
    try:
        deadline = time.monotonic() + 60
        while reclaimer.rounds < 2:
            assert time.monotonic() < deadline, lines
            time.sleep(0.1)
    finally:
        reclaimer.stop()
        remove_group(live.id.hex())
    assert not reclaimer._thread.is_alive() and lines == []


# --------------------------------------------------------------------------- toy students


@pytest.mark.parametrize("method", ["ct", "cd", "ect", "sct", "scd"])
def test_a_student_resumed_from_its_state_continues_exactly(method: str) -> None:
    from cmray.train.toy import Student, make_teacher, ring_of
    from cmray.train.toy_config import Toy2DConfig

    torch.set_num_threads(1)
    epochs = [f"{k}.optim.epochs=3" for k in ("ct", "cd", "ect", "sct")]
    cfg = load_config(
        Toy2DConfig,
        ROOT / "configs" / "toy2d.yaml",
        ["ring.train_points=1024", "ect.ema=0.9", *epochs],
    )
    data = ring_of(cfg).sample(1024, torch.Generator().manual_seed(0))
    torch.manual_seed(1)
    teacher = make_teacher(cfg).eval().requires_grad_(False)

    def student() -> Student:
        return Student(cfg, method, data, teacher if method != "ct" else None)

    whole = student()
    losses = [whole.train_step() for _ in range(6)]
    assert all(math.isfinite(v) for v in losses) and len(set(losses)) == 6
    first = student()
    [first.train_step() for _ in range(3)]
    resumed = student()
    resumed.load_state_dict(first.state_dict())
    assert [resumed.train_step() for _ in range(3)] == losses[3:]
    for a, b in zip(whole.sampler.parameters(), resumed.sampler.parameters(), strict=True):
        assert torch.equal(a, b)
    # ECT keeps an EMA copy here (ect.ema = 0.9); sCT/sCD sample their online net (ema 0)
    assert (whole.target is None) == (method in ("sct", "scd"))
    if method != "ct":  # CD, ECT and sCM differ from the teacher only by their training
        tuned = method != "cd"
        fresh = student()
        same = all(
            torch.equal(a, b)
            for a, b in zip(fresh.online.net.parameters(), teacher.net.parameters(), strict=True)
        )
        assert same == tuned  # ECT and sCM start from the teacher's weights, CD does not


# --------------------------------------------------------------------------- real searches


def _tune(config: Path, cwd: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    log = open(cwd / "tune.log", "ab")  # noqa: SIM115 - the child owns it
    return subprocess.Popen(
        [sys.executable, str(ROOT / "pipelines" / "tune.py"), "--config", str(config)],
        cwd=cwd,
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, **(env or {})},
        start_new_session=True,
    )


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.mark.slow
def test_a_toy_search_survives_a_driver_crash_and_asha_frees_what_it_stops(
    ray_cluster: str, tmp_path: Path
) -> None:
    """A search submitted to a running cluster (RAY_ADDRESS), 3 trials one at a time, each
    reserving both CPUs. Its driver is killed once the first trial has checkpoints: Ray ends
    the dead driver's trials, and the same command resumes the search (Tuner.restore) and
    finishes it. ASHA stops the second trial (the slow learning rate, behind the first at the
    first rung), which must give its CPUs back, or the third waits for ever; the best trial
    beats the worst, and no reservation of the dead driver's outlives it."""
    from cmray.cluster import reclaim_orphaned_groups

    config = tmp_path / "tune.yaml"
    # Fast, slow, fast: the third trial needs the CPUs that the stopped second one held.
    space = [{**TOY_SPACE[0], "values": [3.0e-3, 1.0e-5, 3.0e-3]}]
    cfg = toy_tune(num_samples=1, space=space, toy={**TOY_TRIAL, "cpus": 2})
    config.write_text(yaml.safe_dump(cfg))
    search = tmp_path / "runs" / "tune" / "toy"
    cluster = {"RAY_ADDRESS": ray_cluster}
    proc = _tune(config, tmp_path, cluster)
    deadline = time.monotonic() + 300
    while not list(search.glob("train/trial_*/checkpoint_*")):
        assert proc.poll() is None, (tmp_path / "tune.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "no trial checkpoint in 300 s"
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver; its trials die with its job
    proc.wait(60)
    assert not (search / "results.csv").exists()

    proc = _tune(config, tmp_path, cluster)
    assert proc.wait(900) == 0, (tmp_path / "tune.log").read_text()[-3000:]
    log = (tmp_path / "tune.log").read_text()
    assert "resuming search" in log and "up to 1 trials at once" in log
    rows = _rows(search / "results.csv")
    assert len(rows) == 3
    assert sorted(r["status"] for r in rows) == ["finished", "finished", "stopped early"]
    (stopped,) = [r for r in rows if r["status"] == "stopped early"]
    assert float(stopped["ct.optim.lr"]) == 1.0e-5 and int(stopped["step"]) < 240
    assert all(r["step"] == "240" for r in rows if r["status"] == "finished")
    scores = [float(r["energy_distance"]) for r in rows]
    assert scores == sorted(scores) and scores[0] < scores[-1]
    assert float(rows[0]["ct.optim.lr"]) == 3.0e-3  # a learning rate 300x larger wins
    best = yaml.safe_load((search / "best_config.yaml").read_text())
    assert best["ct"]["optim"]["lr"] == 3.0e-3 and best["ct"]["optim"]["epochs"] == 30
    assert reclaim_orphaned_groups() == []  # freed by the resumed driver, if Ray leaked any


@pytest.mark.slow
def test_a_local_ray_replaces_a_dead_clusters_record(tmp_path: Path) -> None:
    """After any earlier `ray start` the machine's current-cluster record names a dead cluster;
    a driver that starts its own Ray records that one instead, or Ray Train's placement-group
    cleaner asks the dead one and a stopped trial's CPUs stay reserved for good."""
    from ray._private.utils import read_ray_address, write_ray_address

    write_ray_address("127.0.0.1:9")
    script = (
        "import ray\nfrom cmray.cluster import ray_init\nray_init(1)\n"
        "print(ray.get_runtime_context().gcs_address)\nray.shutdown()"
    )
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert read_ray_address() == done.stdout.strip().splitlines()[-1] != "127.0.0.1:9"


@pytest.mark.slow
def test_digits_search_logs_children_and_crowns_a_champion(
    digits16: str, mlflow_server: str, ray_cluster: str, tmp_path: Path
) -> None:
    """A search over the objective itself (ECT against sCT, both tuned from one EDM model) on
    real shards, submitted to a running cluster (RAY_ADDRESS): each trial a TorchTrainer, a
    child run of the search's MLflow run (artifacts in S3), and the best trial's model
    @champion."""
    from mlflow import MlflowClient
    from test_train import tiny_config

    from cmray.config import save_config
    from cmray.models import ModelConfig, build_model, write_model_file

    base = tiny_config(digits16, steps=8, checkpoint_every=4, log_every=2)
    base.quality.every, base.quality.features = 4, "digits"
    base.quality.num_samples = base.quality.batch_size = 100
    edm = ModelConfig(kind="edm", net=base.net, noise=base.objective.noise)
    write_model_file(tmp_path / "edm.pt", edm, build_model(edm).state_dict())
    base.objective.ect.init = base.objective.scm.init = str(tmp_path / "edm.pt")
    save_config(base, tmp_path / "base.yaml")
    config = tmp_path / "tune.yaml"
    search = {
        "experiment": "train",
        "base": str(tmp_path / "base.yaml"),
        "space": [{"key": "objective.kind", "kind": "grid", "values": ["ect", "scm"]}],
        "num_samples": 1,
        "scheduler": {"enabled": False},
        "run": {"name": "img", "storage_path": str(tmp_path / "runs")},
        "tracking": {
            "tracking_uri": mlflow_server,
            "experiment": "search",
            "registry_name": "digits-search",
            "system_metrics": False,
        },
    }
    config.write_text(yaml.safe_dump(search))
    proc = _tune(config, tmp_path, {"RAY_ADDRESS": ray_cluster})
    assert proc.wait(900) == 0, (tmp_path / "tune.log").read_text()[-3000:]

    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("search")
    runs = client.search_runs([experiment.experiment_id])
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 2 and len(runs) == 3
    assert sorted(r.data.params["objective.kind"] for r in children) == ["ect", "scm"]
    for child in children:
        assert child.info.status == "FINISHED"
        history = client.get_metric_history(child.info.run_id, "fd_digits")
        assert [m.step for m in history] == [4, 8]
        assert "loss" in child.data.metrics
    assert "best_fd_digits" in parent.data.metrics

    best = yaml.safe_load((tmp_path / "runs" / "img" / "best.json").read_text())
    champion = client.get_model_version_by_alias("digits-search", "champion")
    assert best["champion"] == champion.version
    best_child = min(children, key=lambda r: r.data.metrics["fd_digits"])
    assert champion.run_id == best_child.info.run_id
    assert len(client.search_model_versions("name='digits-search'")) == 2

    out = tmp_path / "grid.png"
    model = "models:/digits-search@champion"
    command = [sys.executable, "-m", "cmray.cli", "sample", "--model", model, "--steps", "1"]
    sample = subprocess.run(
        [*command, "--num", "4", "--out", str(out)],
        env={**os.environ, "MLFLOW_TRACKING_URI": mlflow_server},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert sample.returncode == 0, sample.stderr[-2000:]
    assert Image.open(out).size[0] >= 2 * 16


def test_a_toy_cd_search_trains_its_teacher_once(tmp_path: Path) -> None:
    from cmray.train.worker import _toy_teacher as load_teacher
    from cmray.tune.search import _toy_teacher as train_teacher

    torch.set_num_threads(1)
    over = ["ring.train_points=512", "teacher.optim.epochs=1", "teacher.optim.batch_size=256"]
    cfg = toy_tune(overrides=over, toy={"method": "cd"}, run={"storage_path": str(tmp_path)})
    plan = plan_search(from_dict(TuneConfig, cfg))
    lines: list[str] = []
    train_teacher(plan, lines.append)
    saved = Path(plan.teacher_path)
    assert saved.is_file() and any(str(saved) in line for line in lines)
    stamp = saved.stat().st_mtime_ns
    train_teacher(plan, lines.append)  # a restored search keeps the one it has
    assert saved.stat().st_mtime_ns == stamp
    teacher = load_teacher(plan.trial_config({}), plan.teacher_path)
    state = torch.load(saved, weights_only=True)
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in state.items())
    assert not any(p.requires_grad for p in teacher.parameters())
