"""The shipped training configs load, a bad one stops the pipeline before Ray starts, and
short runs of the pipeline behave on the console."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import set_args

from cmray.config import load_config
from cmray.train.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
TRAIN = [str(ROOT / "pipelines" / "train.py")]


@pytest.mark.parametrize(
    "name",
    [
        "lsun_bedroom256_cd_lpips",
        "lsun_bedroom256_ct_lpips",
        "lsun_bedroom256_edm",
        "lsun_bedroom256_ect",
        "lsun_bedroom256_scd",
        "digits_ct",
        "digits_edm",
        "digits_ect",
        "digits_sct",
    ],
)
def test_shipped_configs_load(name: str) -> None:
    cfg = load_config(TrainConfig, ROOT / "configs" / f"{name}.yaml")
    assert cfg.loop.steps > 0 and cfg.run.name == name


def test_lsun_configs_carry_the_reference_settings() -> None:
    cd = load_config(TrainConfig, ROOT / "configs" / "lsun_bedroom256_cd_lpips.yaml")
    ct = load_config(TrainConfig, ROOT / "configs" / "lsun_bedroom256_ct_lpips.yaml")
    assert (cd.objective.cd.N, cd.objective.cd.mu, cd.optim.lr, cd.loop.steps) == (
        40,
        0.95,
        1e-5,
        600_000,
    )
    assert (ct.objective.ct.s0, ct.objective.ct.s1, ct.objective.ct.mu0, ct.optim.lr) == (
        2,
        150,
        0.95,
        5e-5,
    )
    assert cd.objective.init == cd.objective.cd.teacher  # as the paper's code starts CD
    for cfg in (cd, ct):
        assert cfg.data.batch_size == 256  # the reference global batch
        assert cfg.net.channel_mult == [1, 1, 2, 2, 4, 4] and cfg.objective.metric == "lpips"


def test_lsun_successor_configs_start_from_the_released_teacher() -> None:
    ect = load_config(TrainConfig, ROOT / "configs" / "lsun_bedroom256_ect.yaml")
    scd = load_config(TrainConfig, ROOT / "configs" / "lsun_bedroom256_scd.yaml")
    teacher = "s3://YOUR-BUCKET/models/edm_bedroom256.pt"  # infra/README.md's staged import
    assert ect.objective.sources() == {"ect.init": teacher}
    assert scd.objective.sources() == {"scm.teacher": teacher} and scd.objective.init == teacher
    assert (ect.objective.ect.P_mean, ect.objective.ect.P_std) == (-1.1, 2.0)
    assert (scd.objective.scm.tangent_warmup, scd.objective.scm.tangent_c) == (10000, 0.1)
    lsun = load_config(TrainConfig, ROOT / "configs" / "lsun_bedroom256_edm.yaml")
    for cfg in (ect, scd):  # the released teacher's network, so its weights load
        assert cfg.net.channel_mult == lsun.net.channel_mult and cfg.net.resolution == 256
        assert cfg.data.batch_size == 256  # the global batch


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("data.manifest=/no/such/data/manifest.json", "no manifest at /no/such/data"),
        ("net.resolution=32", "net.resolution = 32 but the data is 16x16"),
        ("data.batch_size=1", "data.batch_size = 1 is the global batch; it leaves some of"),
        ("run.num_workers=[3,2]", "run.num_workers = [3, 2]: min must not exceed max"),
        ("objective.kind=cd", "objective.cd.teacher is empty"),
    ],
)
def test_a_bad_config_fails_before_ray_starts(digits16: str, override: str, message: str) -> None:
    args = [
        "--config",
        str(ROOT / "configs" / "digits_ct.yaml"),
        "--set",
        f"data.manifest={digits16}/manifest.json",
        "--set",
        override,
    ]
    if override.startswith("net.resolution"):
        args += ["--set", "net.attention_resolutions=[16]"]
    result = subprocess.run(
        [sys.executable, *TRAIN, *args], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "config error" in result.stderr
    assert "Ray instance" not in result.stderr + result.stdout


def run_digits(
    digits16: str,
    out: Path,
    extra: list[str],
    timeout: int,
    env: dict[str, str] | None = None,
    **values: object,
) -> subprocess.CompletedProcess[str]:
    """``pipelines/train.py`` on the digits config, storing under ``out`` (also its cwd) unless
    ``run.storage_path`` is given."""
    sets = {
        "data.manifest": f"{digits16}/manifest.json",
        "run.storage_path": str(out),
        **values,
        "tracking.enabled": "false",
    }
    args = [*TRAIN, "--config", str(ROOT / "configs" / "digits_ct.yaml"), *extra, *set_args(sets)]
    return subprocess.run(
        [sys.executable, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=out,
        env={**os.environ, **(env or {})},
    )


def test_local_training_uses_the_gpu_only_when_one_is_visible(
    digits16: str, tmp_path: Path
) -> None:
    sets = {"loop.steps": 2, "loop.checkpoint_every": 2, "loop.log_every": 1, "run.use_gpu": "true"}
    result = run_digits(digits16, tmp_path, ["--local"], 300, **sets)
    assert result.returncode == 0, result.stderr
    fell_back = "no CUDA device is visible: training on the CPU" in result.stdout
    assert fell_back != torch.cuda.is_available()
    assert (tmp_path / "digits_ct" / "checkpoints" / "step-000000002").is_dir()


def test_sigterm_checkpoints_the_step_and_a_rerun_continues_from_it(
    digits16: str, tmp_path: Path
) -> None:
    """A spot VM's shutdown signal: the local run finishes its step, checkpoints it (the
    periodic checkpoints are far apart), exits 143, and the same command continues there."""
    sets = [f"data.manifest={digits16}/manifest.json", f"run.storage_path={tmp_path}"]
    sets += ["tracking.enabled=false", "loop.steps=400", "loop.checkpoint_every=1000"]
    sets += ["loop.log_every=1", "data.num_workers=0"]
    args = [sys.executable, "-u", *TRAIN, "--config", str(ROOT / "configs" / "digits_ct.yaml")]
    args += ["--local", *[w for kv in sets for w in ("--set", kv)]]
    proc = subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    for line in proc.stdout:
        if b"step 3 " in line:  # training: stop it
            proc.send_signal(signal.SIGTERM)
            break
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err.decode()[-2000:]
    stopped = err.decode().strip().splitlines()[-1]
    assert stopped.startswith("SIGTERM: preemption notice: checkpointed step ")
    step = int(stopped.split("checkpointed step ")[1].split()[0])
    checkpoints = tmp_path / "digits_ct" / "checkpoints"
    assert [p.name for p in checkpoints.iterdir()] == [f"step-{step:09d}"]
    again = run_digits(digits16, tmp_path, ["--local"], 300, **{"loop.steps": step + 1})
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"at step {step}" in again.stdout and f"step {step + 1} " in again.stdout


def test_the_defaults_are_published_recipes() -> None:
    """Without settings, CT is iCT (10 doubling to 1280, pseudo-Huber with c = 0.00054 sqrt(d),
    lambda = 1 / (sigma_{n+1} - sigma_n), no EMA target) and ECT is locuslab/ect's main branch
    (q = 2 over 8 stages, w = 1 / (t - r), c = 0); ``curriculum: ct`` alone gives the paper's
    2 to 150; a model file records the grid of the bounds in use."""
    from cmray.train.curriculum import ct_curriculum

    base = ["data.manifest=m.json"]
    ict = load_config(TrainConfig, None, base)
    obj = ict.objective
    assert (obj.kind, obj.ct.bounds, obj.distance, obj.lambda_name) == (
        "ct", (10, 1280), "pseudo_huber", "ict"
    )  # fmt: skip
    assert ct_curriculum(obj.ct, 0, 100) == (11, 0.0) and ct_curriculum(obj.ct, 100, 100)[0] == 1281
    assert ict.model_config().N == 1281
    paper = load_config(TrainConfig, None, [*base, "objective.ct.curriculum=ct"]).objective
    assert (paper.ct.bounds, paper.distance, paper.lambda_name) == ((2, 150), "l2", "uniform")
    ect = load_config(TrainConfig, None, [*base, "objective.kind=ect", "objective.ect.init=x"])
    e = ect.objective.ect
    assert (e.q, e.stages, e.weighting, e.c, e.q**e.stages) == (2.0, 8, "gap", 0.0, 256.0)
