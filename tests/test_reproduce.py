"""The reproduction study (`make reproduce`): its plan, its rules, its outputs, and a miniature
of the whole study on real shards, a real Ray (Tune over Train trials) and a real MLflow server."""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from cmray.config import ConfigError, from_dict, load_config
from cmray.experiments.reproduce import plan_students, plan_study, row_method
from cmray.experiments.reproduce_config import ReproduceConfig
from cmray.experiments.reproduce_report import table, targets
from cmray.experiments.study import converged, family_of
from cmray.tune.config import TuneConfig

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "configs" / "reproduce_digits.yaml"


def shipped(tmp_path: Path, *overrides: str) -> ReproduceConfig:
    return load_config(ReproduceConfig, SHIPPED, [f"out={tmp_path / 'study'}", *overrides])


# --------------------------------------------------------------------------- the plan


def test_the_shipped_study_plans_every_row_as_one_grid_over_named_variants(
    tmp_path: Path,
) -> None:
    study = plan_study(shipped(tmp_path))
    names = [r.name for r in study.cfg.students.rows]
    assert len(names) == 7
    (dimension,) = study.search.cfg.space
    assert dimension.key == "variant" and dimension.kind == "grid" and dimension.values == names
    assert study.search.cfg.num_samples == 1 and not study.search.cfg.scheduler.enabled
    methods = [row_method(study, n) for n in names]
    assert methods == ["cd", "cd", "ct", "ict", "ect", "sct", "scd"]
    assert [family_of(m) for m in methods] == ["cd", "cd", "ct", "ct", "ct", "ct", "cd"]
    teacher = study.teacher_source
    budgets, scales = {}, set()
    for name in names:
        cfg = study.search.trial_config({"variant": name})
        budgets[name] = (cfg.loop.steps, cfg.data.batch_size, cfg.run.num_workers)
        scales.add(cfg.objective.noise.c_noise_scale)
        assert cfg.quality.every == cfg.loop.steps  # the search's figure, once at the end
        if row_method(study, name) in ("cd", "ect", "sct"):
            assert cfg.objective.init == teacher, name  # started from the teacher's weights
        if row_method(study, name) in ("cd", "scd"):
            assert teacher in cfg.objective.sources().values()
        if row_method(study, name) in ("ct", "ict"):
            assert cfg.objective.init == ""  # from data alone
    # The rows from the teacher share one budget; those from scratch get the teacher's own,
    # here the most it may train (the study fills in where its rule stopped it).
    from_scratch = {n for n in names if row_method(study, n) in ("ct", "ict")}
    assert {budgets[n] for n in from_scratch} == {(study.cfg.teacher.max_steps, 64, 1)}
    assert len({budgets[n] for n in names if n not in from_scratch}) == 1
    assert (
        plan_students(study.cfg, study.out, 1200)
        .trial_config({"variant": sorted(from_scratch)[0]})
        .loop.steps
        == 1200
    )
    # One time input for the teacher and every row (they start from or distil its weights).
    assert scales == {study.teacher_cfg.objective.noise.c_noise_scale} == {0.25}
    assert study.teacher_cfg.objective.kind == "edm"


def test_a_row_with_a_bad_setting_stops_the_study_in_one_line_before_it_starts(
    tmp_path: Path,
) -> None:
    out = tmp_path / "study"
    rows = "students.rows=[{name: A, set: [objective.kind=bogus]}]"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "pipelines" / "reproduce.py"),
            "--out",
            str(out),
            "--set",
            rows,
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert proc.returncode == 2
    (line,) = proc.stderr.strip().splitlines()
    assert "space variant = 'A'" in line and "objective.kind = 'bogus'" in line
    assert not out.exists()  # nothing started, nothing written


def test_the_teacher_must_be_a_diffusion_model(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="the teacher must be edm"):
        plan_study(shipped(tmp_path, "teacher.config=configs/digits_ct.yaml"))


def test_a_variant_is_checked_by_name_and_applied_before_the_other_params(tmp_path: Path) -> None:
    base = {"experiment": "train", "base": "configs/digits_ct.yaml"}
    variants = [{"name": "fast", "set": ["optim.lr=1.0e-3", "loop.steps=7"]}]
    space = [{"key": "variant", "kind": "grid", "values": ["slow"]}]
    with pytest.raises(ConfigError, match="space variant = 'slow' is not a variant"):
        from_dict(TuneConfig, {**base, "space": space, "variants": variants})
    from cmray.tune.config import plan_search

    space = [{"key": "variant", "kind": "grid", "values": ["fast"]}]
    over = ["quality.every=7"]
    cfg = from_dict(TuneConfig, {**base, "space": space, "variants": variants, "overrides": over})
    plan = plan_search(cfg)
    trial = plan.trial_config({"variant": "fast", "optim.lr": 5.0e-4})
    assert trial.loop.steps == 7 and trial.optim.lr == 5.0e-4  # the variant, then the param


# --------------------------------------------------------------------------- the rules


def test_the_teacher_has_converged_when_its_last_quarter_gained_under_the_tolerance() -> None:
    metric = "fd"
    assert converged([], 0.05, metric) is None
    assert converged([{"step": 8, metric: 9.0}], 0.05, metric) is None  # no 3/4 point
    curve = [{"step": 6, metric: 10.0}, {"step": 8, metric: 9.6}]
    assert converged(curve, 0.05, metric) is True  # 4% better
    curve = [{"step": 6, metric: 10.0}, {"step": 8, metric: 9.0}]
    assert converged(curve, 0.05, metric) is False  # 10% better: train on
    curve = [{"step": 3, metric: 20.0}, {"step": 4, metric: 10.0}, {"step": 6, metric: 9.9}]
    assert converged(curve, 0.05, metric) is None  # 6 * 3/4 = 4.5 was never measured
    curve.append({"step": 8, metric: 9.8})
    assert converged(curve, 0.05, metric) is True  # 6 -> 8 against 9.9


def _entry(nfe: int, fd: float) -> dict:
    return {"nfe": nfe, "fd": fd, "score": 5.0, "precision": 0.5, "recall": 0.4}


def _results(rows: list[dict]) -> dict:
    teacher = [
        {"sampler": "Heun, 18 points", "baseline": True, **_entry(35, 10.0)},
        {"sampler": "Heun, 1 point", **_entry(1, 90.0)},
    ]
    results = {
        "suite": "digits",
        "metric": "fd",
        "score": "score",
        "floor": 2.0,
        "floor_name": "Real images",
        "teacher": {"results": teacher},
        "rows": rows,
    }
    for entry in [*teacher, *(e for r in rows for e in r.get("results", []))]:
        entry["ratio_to_teacher"] = entry["fd"] / 10.0
    return results


def _row(name: str, kind: str, fam: str, *figures: float) -> dict:
    results = [_entry(n + 1, f) for n, f in enumerate(figures)]
    return {"name": name, "method": kind, "family": fam, "status": "finished", "results": results}


def test_targets_are_ratios_to_the_teacher_and_to_the_papers_ct() -> None:
    rows = [
        _row("CD l2", "cd", "cd", 25.0, 14.0),
        _row("CD pH", "cd", "cd", 15.0, 12.0),  # the best CD row counts
        _row("CT", "ct", "ct", 40.0, 30.0),
        _row("iCT", "ict", "ct", 35.0, 20.0),
        _row("ECT", "ect", "ct", 25.0, 20.0),
        {"name": "sCT", "method": "sct", "family": "ct", "status": "error", "error": "diverged"},
    ]
    found = {t["target"]: t for t in targets(_results(rows))}
    one = found["one-step CD within 1.5x of the teacher"]
    assert one["value"] == pytest.approx(1.5) and one["met"] is False  # not below the limit
    two = found["two-step CD within 1.2x of the teacher"]
    assert two["value"] == pytest.approx(1.2) and two["met"] is False
    assert found["one-step ECT within 2x of the teacher"]["value"] == pytest.approx(2.5)
    assert found["one-step iCT (from scratch) within 3x of the teacher"]["met"] is False
    paper = found["one-step CT (the paper's, from scratch) within 5x of the teacher"]
    assert paper["value"] == pytest.approx(4.0) and paper["met"] is True
    ect = found["ECT one-step better than the paper's CT"]
    assert ect["value"] == pytest.approx(25 / 40) and ect["met"] is True
    own = found["one-step ECT better than its teacher's one step"]  # the teacher's: 90
    assert own["value"] == pytest.approx(25 / 90) and own["met"] is True
    sct = found["SCT one-step better than the paper's CT"]
    assert math.isnan(sct["value"]) and sct["met"] is None  # a failed row is not a pass
    assert found["one-step sCT within 2x of the teacher"]["met"] is None

    rows[1]["results"][0]["fd"] = 14.0
    rows[1]["results"][1]["fd"] = 11.5
    again = {t["target"]: t for t in targets(_results(rows))}
    assert again["one-step CD within 1.5x of the teacher"]["met"] is True
    assert again["two-step CD within 1.2x of the teacher"]["met"] is True


def test_a_suite_without_a_method_has_no_target_for_it() -> None:
    rows = [_row("CD pH", "cd", "cd", 15.0, 12.0), _row("ECT", "ect", "ct", 25.0, 20.0)]
    names = {t["target"] for t in targets(_results(rows))}
    assert "one-step ECT within 2x of the teacher" in names
    assert not any("paper's CT" in n or "sCT" in n or "iCT" in n for n in names)
    assert "one-step ECT better than its teacher's one step" in names
    without_ect = {t["target"] for t in targets(_results(rows[:1]))}
    assert not any("ECT" in n for n in without_ect)


def test_the_table_reads_like_the_papers_and_names_a_failed_row() -> None:
    rows = [
        _row("CD", "cd", "cd", 15.0, 12.0),
        {"name": "sCT", "method": "sct", "family": "ct", "status": "error", "error": "NaN loss"},
    ]
    text = table(_results(rows)).splitlines()
    head = "| Method | NFE | fd ↓ | vs teacher (35 NFE) | score ↑ | precision ↑ | recall ↑ |"
    assert text[0] == head
    assert text[2] == "| Real images | – | 2 | | | | |"
    assert text[3] == "| Teacher, Heun, 18 points | 35 | 10 | 1.00x | 5.00 | 0.50 | 0.40 |"
    assert text[4].startswith("| Teacher, Heun, 1 point | 1 | 90 | 9.00x |")
    assert text[5].startswith("| CD | 1 | 15 | 1.50x |")
    assert text[6].startswith("| CD | 2 | 12 | 1.20x |")
    assert text[7] == "| sCT | – | failed: NaN loss | | | | |"


# --------------------------------------------------------------------------- the pieces


def test_every_grid_draws_small_images_at_a_readable_size_by_nearest_neighbour() -> None:
    from cmray.eval.images import grid_array, upscale_factor

    images = torch.rand(4, 3, 16, 16) * 2 - 1
    grid = grid_array(images)
    assert grid.shape == (2 * 64 + 3 * 2, 2 * 64 + 3 * 2, 3)
    tile = torch.from_numpy(grid[2 : 2 + 64, 2 : 2 + 64]).permute(2, 0, 1)
    expected = images[0].add(1).div(2).mul(255).add(0.5).clamp(0, 255).to(torch.uint8)
    assert torch.equal(tile[:, ::4, ::4], expected)  # each pixel a 4x4 block, unchanged
    assert torch.equal(tile[:, 1::4, 3::4], expected)
    assert upscale_factor(256) == 1 and upscale_factor(32) == 2 and upscale_factor(17) == 4


def test_the_teachers_sampler_is_edm_algorithm_2_and_one_point_is_one_denoising() -> None:
    from cmray.core.sampling import sample_edm_heun, sample_teacher_ode
    from cmray.core.schedules import karras_sigmas

    def D(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x / (1 + t[:, None] ** 2).sqrt())

    z = torch.randn(5, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    one = sample_edm_heun(D, z, 1)
    T = torch.full((5,), 80.0, dtype=torch.float64)
    assert one.nfe == 1 and torch.equal(one.x, D(80.0 * z, T))
    full = sample_edm_heun(D, z, 18)
    reference = sample_teacher_ode(D, z, karras_sigmas(18), "heun", to_zero=True)
    assert full.nfe == 35 and torch.equal(full.x, reference.x)
    with pytest.raises(ValueError, match="points = 0"):
        sample_edm_heun(D, z, 0)


def test_a_cd_student_starts_from_its_teachers_weights_as_the_papers_code_does(
    digits16: str, tmp_path: Path
) -> None:
    from test_train import tiny_config

    from cmray.models import ModelConfig, build_model, load_model, write_model_file
    from cmray.train.loop import build_trainer

    cfg = tiny_config(digits16)
    edm = ModelConfig(kind="edm", net=cfg.net, noise=cfg.objective.noise)
    torch.manual_seed(5)
    write_model_file(tmp_path / "edm.pt", edm, build_model(edm).state_dict())
    cfg.objective.kind = "cd"
    cfg.objective.cd.teacher = cfg.objective.cd.init = str(tmp_path / "edm.pt")
    trainer = build_trainer(cfg, torch.device("cpu"))
    teacher, _ = load_model(str(tmp_path / "edm.pt"))
    online = trainer.state.online.net.state_dict()
    target = trainer.state.target.net.state_dict()
    for key, value in teacher.net.state_dict().items():
        assert torch.equal(online[key], value) and torch.equal(target[key], value), key
    cfg.objective.cd.init = ""
    fresh = build_trainer(cfg, torch.device("cpu")).state.online.net.state_dict()
    assert any(not torch.equal(fresh[k], v) for k, v in teacher.net.state_dict().items())


def test_a_rows_fingerprint_is_what_it_trains_read_back_from_its_checkpoint(
    digits16: str, tmp_path: Path
) -> None:
    from test_train import tiny_config

    from cmray.config import to_dict
    from cmray.experiments.reproduce import row_fingerprint, trained_fingerprint
    from cmray.models.checkpoints import checkpoint_name
    from cmray.train.config import TrainConfig
    from cmray.train.loop import build_trainer
    from cmray.train.state import save_checkpoint

    cfg = tiny_config(digits16)
    trainer = build_trainer(cfg, torch.device("cpu"))
    run = tmp_path / "trial_x"
    save_checkpoint(trainer.state, run / checkpoint_name(0), rank=0, world_size=1)
    assert trained_fingerprint(str(run)) == row_fingerprint(cfg)
    moved = copy.deepcopy(cfg)
    moved.run.name, moved.run.storage_path = "elsewhere", str(tmp_path / "other")
    assert row_fingerprint(moved) == row_fingerprint(cfg)  # where it is kept is not what it is
    changed = copy.deepcopy(cfg)
    changed.loop.ema_rampup = 0.05
    assert row_fingerprint(changed) != row_fingerprint(cfg)
    # A config saved before a field existed reads as that field's default.
    older = to_dict(cfg)
    del older["loop"]["ema_rampup"]
    assert row_fingerprint(from_dict(TrainConfig, older)) == row_fingerprint(cfg)
    assert trained_fingerprint(str(tmp_path / "nothing")) is None


def test_checkpoint_at_finds_a_kept_step_and_only_that(digits16: str, tmp_path: Path) -> None:
    from test_train import tiny_config

    from cmray.models.checkpoints import checkpoint_at, verify_checkpoint
    from cmray.train.loop import run_local

    torch.set_num_threads(1)
    run_local(tiny_config(digits16, steps=4, checkpoint_every=2), tmp_path, log=lambda _: None)
    root = tmp_path / "checkpoints"
    assert verify_checkpoint(checkpoint_at(root, 2)) == 2
    assert verify_checkpoint(checkpoint_at(root, 4)) == 4
    assert checkpoint_at(root, 3) is None and checkpoint_at(tmp_path / "none", 2) is None


# --------------------------------------------------------------------------- the miniature


def miniature(tmp_path: Path, mlflow: str) -> dict:
    """The Fashion-MNIST suite on small files in the official layout (120 training images, 60
    test): two rows, a few steps, a CD row and a row whose training diverges."""
    from test_fashion import write_idx

    folder = tmp_path / "fm"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for split, n in (("train", 120), ("test", 60)):
        write_idx(folder, split, rng.integers(0, 256, (n, 28, 28)), np.arange(n) % 10)
    tiny = ["run.num_workers=1", "data.batch_size=8", "loop.log_every=2"]
    cd = ["objective.kind=cd", "objective.cd.teacher={teacher}", "objective.cd.init={teacher}"]
    return {
        "suite": "fashion",
        "name": "mini",
        "out": str(tmp_path / "study"),
        "data": {
            "source": f"fashion-mnist:{folder}",
            "resolution": 16,
            "manifest": str(tmp_path / "f16"),
        },
        "teacher": {
            "config": "configs/digits_edm.yaml",
            "set": tiny,
            "segment_steps": 2,
            "max_steps": 8,
        },
        "students": {
            "config": "configs/digits_ct.yaml",
            "set": [*tiny, "loop.steps=4", "loop.checkpoint_every=2"],
            "rows": [
                {"name": "CD", "set": [*cd, "objective.cd.N=18"]},
                {
                    "name": "Diverges",
                    "set": ["optim.lr=1.0e9", "loop.nonfinite_limit=1", "run.max_failures=0"],
                },
            ],
            "max_failures": 0,
        },
        "eval": {
            "num_samples": 40,
            "search_samples": 20,
            "features": "fashion",
            "ref_count": 100,
            "pr_count": 20,
            "batch_size": 20,
            "teacher_points": [1, 18],
            "workers": -1,
        },
        "tracking": {"tracking_uri": mlflow, "experiment": "reproduce", "system_metrics": False},
    }


def study_cli(config: Path, log: Path, ray_cluster: str) -> None:
    """``pipelines/reproduce.py --config`` on the test's Ray; its output in ``log``."""
    with log.open("w") as fh:
        proc = subprocess.run(
            [sys.executable, str(ROOT / "pipelines" / "reproduce.py"), "--config", str(config)],
            stdout=fh,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            env={**os.environ, "RAY_ADDRESS": ray_cluster},
            timeout=900,
        )
    assert proc.returncode == 0, log.read_text()[-4000:]


@pytest.mark.slow
def test_a_miniature_study_runs_as_one_search_and_reports_every_row(
    ray_cluster: str, mlflow_server: str, tmp_path: Path
) -> None:
    from mlflow import MlflowClient

    config = tmp_path / "study.yaml"
    config.write_text(yaml.safe_dump(miniature(tmp_path, mlflow_server)))
    log = tmp_path / "study.log"
    study_cli(config, log, ray_cluster)
    out = tmp_path / "study"
    results = json.loads((out / "results.json").read_text())

    # The teacher: one Ray Train run, measured at 3/4 and the end of its training.
    assert [c["step"] for c in results["teacher"]["curve"]] == [6, 8]
    assert isinstance(results["teacher"]["converged"], bool)
    teacher = {t["points"]: t for t in results["teacher"]["results"]}
    assert sorted(teacher) == [1, 18] and teacher[18]["nfe"] == 35 and teacher[1]["nfe"] == 1

    # The rows: a Tune grid of two trials; the diverged one is reported, not fatal.
    cd, bad = results["rows"]
    assert cd["name"] == "CD" and cd["status"] == "finished" and cd["method"] == "cd"
    assert [e["nfe"] for e in cd["results"]] == [1, 2]
    for e in cd["results"]:
        assert e["fd_fashion"] > 0 and 0 <= e["precision"] <= 1 and e["samples"] == 40
        assert e["ratio_to_teacher"] == pytest.approx(e["fd_fashion"] / teacher[18]["fd_fashion"])
    chosen = cd["search"]["chosen"]
    assert chosen == cd["results"][1]["indices"] and len(cd["search"]["evaluated"]) >= 2
    assert bad["status"] == "error" and "NonFiniteLossError" in bad["error"]
    search = (out / "students" / "results.csv").read_text().splitlines()
    assert search[0].startswith("trial,status,variant") and len(search) == 3
    assert results["floor"] > 0
    # Only the methods that ran have targets: CD's two and the diverged iCT row's one.
    assert [t["target"] for t in results["targets"]] == [
        "one-step CD within 1.5x of the teacher",
        "two-step CD within 1.2x of the teacher",
        "one-step iCT (from scratch) within 3x of the teacher",
    ]
    assert results["targets"][2]["met"] is None  # a failed row has no figure to compare
    assert results["floor_name"] == "Test images against training"  # 40 of the 60 test images

    text = (out / "table.md").read_text()
    assert "| CD | 1 |" in text and "| CD | 2 |" in text and "| Diverges | – | failed:" in text
    assert "| Teacher, Heun, 18 points | 35 |" in text
    assert Image.open(out / "samples.png").size[0] >= 2 * 200  # two panels: teacher and CD
    assert Image.open(out / "nfe.png").size[0] > 400

    # MLflow: the study's run, with the teacher and each row as its children.
    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("reproduce")
    runs = client.search_runs([experiment.experiment_id])
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    names = {r.info.run_name for r in children}
    # The teacher and the CD row; the diverging row dies before its first report, so whether
    # its run was created by then is a race, not something to assert either way.
    assert {"teacher", f"trial_{cd['trial']}"} <= names and len(children) <= 3
    assert len(runs) == len(children) + 1
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["teacher_baseline"] == pytest.approx(teacher[18]["fd_fashion"])
    artifacts = {f.path for f in client.list_artifacts(parent.info.run_id)}
    assert {"results.json", "table.md", "samples.png", "nfe.png"} <= artifacts
    scored = [r for r in children if "eval_1step_fd_fashion" in r.data.metrics]
    assert len(scored) == 1
    assert scored[0].data.metrics["eval_2step_fd_fashion"] == pytest.approx(
        cd["results"][1]["fd_fashion"]
    )

    # Re-run with the failed row's settings changed: CD stands (same model, not rescored),
    # the changed row alone trains, as a new search named after what it trains.
    scored_at = (out / "rows" / "cd" / "eval.json").stat().st_mtime_ns
    study = yaml.safe_load(config.read_text())
    study["students"]["rows"][1]["set"] = ["loop.nonfinite_limit=1"]
    config.write_text(yaml.safe_dump(study))
    study_cli(config, log, ray_cluster)
    again = json.loads((out / "results.json").read_text())
    cd_again, fixed = again["rows"]
    assert cd_again["trial"] == cd["trial"] and cd_again["results"] == cd["results"]
    assert (out / "rows" / "cd" / "eval.json").stat().st_mtime_ns == scored_at
    assert fixed["status"] == "finished" and fixed["trial"] != bad["trial"]
    trained = json.loads((out / "students.json").read_text())
    assert trained["CD"]["search"] == "students"
    assert trained["Diverges"]["search"].startswith("students-")
    assert Path(trained["Diverges"]["run"]).is_dir()
    assert (
        json.loads((out / "rows" / "diverges" / "eval.json").read_text())["model"]
        == (trained["Diverges"]["run"])
    )


# --------------------------------------------------------------------------- the ring suite

RING = ROOT / "configs" / "reproduce_ring.yaml"
TINY_RING = [
    "ring.set=[ring.train_points=1024, teacher.optim.epochs=4, cd.optim.epochs=2, "
    "ct.optim.epochs=2, ect.optim.epochs=2, sct.optim.epochs=2]",
    "ring.teacher_max_epochs=8",
    "eval.num_samples=200",
]


def test_the_shipped_ring_study_is_the_same_rows_as_one_toy_grid(tmp_path: Path) -> None:
    from cmray.experiments.reproduce_ring import plan_ring, row_method
    from cmray.train.toy import student_settings, total_steps

    cfg = load_config(ReproduceConfig, RING, [f"out={tmp_path}"])
    study = plan_ring(cfg)
    names = [r.name for r in cfg.students.rows]
    assert [row_method(study, n) for n in names] == ["cd", "cd", "ct", "ict", "ect", "sct", "scd"]
    assert study.search.cfg.experiment == "toy2d" and study.search.cfg.space[0].values == names
    budgets = set()
    for name in names:
        toy_cfg = study.search.trial_config({"variant": name})
        method = study.search.cfg.trial_settings({"variant": name}).method
        optim = student_settings(toy_cfg, method).optim
        budgets.add((total_steps(toy_cfg.ring.train_points, optim), optim.batch_size))
    assert budgets == {(study.search.max_t, 512)}  # the same training points for every row
    assert study.search.cfg.toy.quality_every == study.search.max_t


def test_the_ring_teacher_is_measured_at_three_quarters_and_saved_once(tmp_path: Path) -> None:
    from cmray.experiments.reproduce_ring import plan_ring, train_ring_teacher
    from cmray.train.worker import _toy_teacher

    torch.set_num_threads(1)
    cfg = load_config(ReproduceConfig, RING, [f"out={tmp_path}", *TINY_RING])
    study = plan_ring(cfg)
    lines: list[str] = []
    state = train_ring_teacher(study, lines.append)
    steps = [c["step"] for c in state["curve"]]
    assert steps[1] == state["epochs"] * (1024 // 512) and steps[0] * 4 == steps[1] * 3
    assert isinstance(state["converged"], bool) and state["epochs"] in (4, 8)
    assert all(math.isfinite(c["energy_distance"]) for c in state["curve"])
    saved = Path(study.search.teacher_path)
    stamp = saved.stat().st_mtime_ns
    assert train_ring_teacher(study, lines.append) == state  # a re-run keeps the one it has
    assert saved.stat().st_mtime_ns == stamp
    teacher = _toy_teacher(study.toy, str(saved))
    assert not any(p.requires_grad for p in teacher.parameters())


def test_a_ring_row_is_scored_on_the_studys_noise_in_one_and_two_steps(tmp_path: Path) -> None:
    from cmray.experiments.reproduce_ring import Bench, plan_ring, score_student, score_teacher
    from cmray.train.toy import Student, make_teacher, training_data

    torch.set_num_threads(1)
    cfg = load_config(ReproduceConfig, RING, [f"out={tmp_path}", *TINY_RING, "eval.draws=3"])
    study = plan_ring(cfg)
    torch.manual_seed(0)
    teacher = make_teacher(study.toy).eval().requires_grad_(False)
    data, _ = training_data(study.toy)
    student = Student(study.toy, "cd", data, teacher)
    [student.train_step() for _ in range(3)]
    bench = Bench.of(study)
    results, search = score_student(study, bench, student.sampler)
    assert [r["nfe"] for r in results] == [1, 2]
    chosen = [e for e in search["evaluated"] if e["indices"] == search["chosen"]]
    assert chosen[0]["energy_distance"] == results[1]["energy_distance"]  # the same noise
    assert results[1]["indices"] == search["chosen"] and len(search["evaluated"]) >= 3
    again, _ = score_student(study, Bench.of(study), student.sampler)
    assert again == results  # every row sees the same noise and the same true-ring draws
    teacher_rows = score_teacher(study, bench, teacher)
    assert [r["nfe"] for r in teacher_rows] == [99, 1, 3, 7, 35]
    assert teacher_rows[0]["own"] and 0 <= teacher_rows[0]["on_mode"] <= 1
    # Every figure is the mean over the configured draws, with its spread.
    for entry in [*results, *teacher_rows]:
        assert entry["draws"] == 3 and entry["energy_distance_sd"] > 0
        assert entry["energy_distance"] == pytest.approx(sum(entry["energy_distance_draws"]) / 3)


def test_a_doubled_ring_teacher_that_ends_no_better_leaves_the_shorter_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each doubling trains afresh; a longer run that ends worse (a fresh clone's 600 epochs
    scored 0.0139 after 300 had scored 0.0059) is not "still improving": the 300 stays."""
    from cmray.experiments import reproduce_ring as ring

    cfg = load_config(ReproduceConfig, RING, [f"out={tmp_path}", *TINY_RING])
    study = ring.plan_ring(cfg)
    figures = {4: (0.0142, 0.0059), 8: (0.0262, 0.0139)}  # (3/4, end) by epochs
    trained: list[int] = []

    def run(study, bench, epochs, log):  # the rule's collaborator: figures, no training
        trained.append(epochs)
        a, b = figures[epochs]
        curve = [{"step": 3, "energy_distance": a}, {"step": 4, "energy_distance": b}]
        return curve, torch.nn.Linear(1, 1)

    monkeypatch.setattr(ring, "_teacher_run", run)
    state = ring.train_ring_teacher(study, lambda m: None)
    assert trained == [4, 8] and state["epochs"] == 4 and state["converged"] is True
    assert state["curve"][-1]["energy_distance"] == 0.0059


def test_the_demo_line_puts_a_model_beside_the_studys_teacher_and_the_floor() -> None:
    from cmray.experiments.reproduce_report import compare_line

    report = {
        "features": {"frechet": "fd"},
        "results": [{"nfe": 1, "fd": 100.26}, {"nfe": 2, "fd": 82.61}],
        "reference": {"split_half_frechet": 3.183},
    }
    study = _results([])
    line = compare_line(report, study, "docs/x.json")
    assert line == (
        "fd: 1-step 100.3, 2-step 82.6 | the study's teacher at 35 NFE (docs/x.json): 10.0 | "
        "real against real: 3.18"
    )
    with pytest.raises(ValueError, match="reports energy_distance, this evaluation fd"):
        compare_line(report, {**study, "metric": "energy_distance"}, "ring.json")


def test_the_summary_states_each_rows_budget_and_wall_time() -> None:
    from cmray.experiments.reproduce_report import summary

    rows = [
        {**_row("CD", "cd", "cd", 15.0, 12.0), "images": 25_600, "train_s": 183.0},
        {**_row("iCT", "ict", "ct", 30.0, 20.0), "images": 307_200, "train_s": math.nan},
    ]
    results = _results(rows)
    results.update(
        budget_line="Rows from the teacher: 400 steps.",
        teacher={**results["teacher"], "curve": [{"step": 8, "fd": 10.0}], "converged": True},
        targets=targets(results),
        timings_s={"teacher": 10.0},
    )
    text = summary(results)
    assert "| CD | 25,600 | 3.0 min |" in text and "| iCT | 307,200 | – |" in text
