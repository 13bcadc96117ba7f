"""MLflow tracking against a real ``mlflow server`` (SQLite) with artifacts in moto's S3."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from cmray.cli import main
from cmray.models import load_model
from cmray.train.loop import run_local

pytestmark = pytest.mark.slow


def tracked_config(manifest: str, uri: str, **tracking: object):
    from test_train import tiny_config

    cfg = tiny_config(manifest, steps=4, checkpoint_every=2, sample_every=2, sample_count=4)
    cfg.tracking.enabled, cfg.tracking.tracking_uri = True, uri
    cfg.tracking.system_metrics = False  # psutil sampling every 10 s adds nothing to a 10 s run
    for key, value in tracking.items():
        setattr(cfg.tracking, key, value)
    return cfg


@pytest.fixture(scope="module")
def tracked_run(digits16: str, mlflow_server: str, tmp_path_factory: pytest.TempPathFactory):
    cfg = tracked_config(digits16, mlflow_server, experiment="t", registry_name="digits-cm")
    cfg.run.name = "tracked"
    run_local(cfg, tmp_path_factory.mktemp("tracked"), log=lambda _: None)
    from mlflow import MlflowClient

    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("t")
    (run,) = client.search_runs([experiment.experiment_id])
    return client, run


def test_run_has_params_metrics_grids_and_config(tracked_run) -> None:
    client, run = tracked_run
    assert run.info.status == "FINISHED" and run.info.run_name == "tracked"
    assert run.data.params["objective.kind"] == "ct"
    assert run.data.params["loop.steps"] == "4"
    history = client.get_metric_history(run.info.run_id, "loss")
    assert [m.step for m in history] == [1, 2, 3, 4]
    for key in ("N", "mu", "lr", "images_per_s"):
        assert key in run.data.metrics
    worlds = client.get_metric_history(run.info.run_id, "world_size")
    batches = client.get_metric_history(run.info.run_id, "global_batch")
    assert [m.step for m in worlds] == [1, 2, 3, 4] and {m.value for m in worlds} == {1.0}
    assert {m.value for m in batches} == {8.0}  # the config's global batch, every step
    # MLflow 3's UI opens the experiment as model training, not as a GenAI app.
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert "config.yaml" in artifacts and "images" in artifacts


def test_model_is_registered_and_fetched_by_alias(
    tracked_run, tmp_path: Path, digits16: str
) -> None:
    client, run = tracked_run
    (version,) = client.search_model_versions("name='digits-cm'")
    assert version.run_id == run.info.run_id
    client.set_registered_model_alias("digits-cm", "champion", version.version)

    assert main(["fetch", "--model", "models:/digits-cm@champion", "--out", str(tmp_path)]) == 0
    _, cfg = load_model("models:/digits-cm@champion")
    assert cfg.net.resolution == 16

    for steps in ("1", "2"):
        out = tmp_path / f"grid{steps}.png"
        args = ["sample", "--model", "models:/digits-cm@champion", "--steps", steps]
        assert main([*args, "--num", "16", "--out", str(out)]) == 0
        assert Image.open(out).size == (4 * 64 + 5 * 2, 4 * 64 + 5 * 2)  # 16 px drawn 4x

    img = tmp_path / "in.png"
    Image.new("RGB", (16, 16), (200, 10, 10)).save(img)
    args = ["edit", "--model", "models:/digits-cm@champion", "--task", "denoise"]
    assert main([*args, "--input", str(img), "--out", str(tmp_path / "edit.png")]) == 0


def test_logged_pyfunc_predicts_samples(tracked_run) -> None:
    import mlflow
    import numpy as np

    _, run = tracked_run
    pyfunc = mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/model")
    z = np.random.default_rng(1).standard_normal((2, 3, 16, 16)).astype(np.float32)
    x = pyfunc.predict(z)
    assert x.shape == (2, 3, 16, 16) and np.abs(x).max() <= 1.0


def test_a_resumed_run_continues_the_same_mlflow_run(
    digits16: str, mlflow_server: str, tmp_path: Path
) -> None:
    from mlflow import MlflowClient

    cfg = tracked_config(digits16, mlflow_server, experiment="resume", log_model=False)
    cfg.loop.steps = 2
    run_local(cfg, tmp_path, log=lambda _: None)
    cfg.loop.steps = 4
    run_local(cfg, tmp_path, log=lambda _: None)
    client = MlflowClient(mlflow_server)
    (run,) = client.search_runs([client.get_experiment_by_name("resume").experiment_id])
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [1, 2, 3, 4]
    assert run.data.params["loop.steps"] == "2"  # MLflow keeps the first value ...
    assert run.data.tags["cmray.resumed_with"] == "loop.steps: 2 -> 4"  # ... and we note it


def test_training_finishes_when_the_server_dies_mid_run(
    digits16: str, s3_endpoint: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from conftest import running_mlflow_server

    with running_mlflow_server(tmp_path, f"{tmp_path}/artifacts", s3_endpoint) as server:
        cfg = tracked_config(digits16, server.uri, experiment="dies")
        cfg.loop.steps = 6

        def kill_at_step_2(metrics: dict[str, float]) -> None:
            if metrics["step"] == 2:
                server.kill()

        trainer = run_local(cfg, tmp_path / "run", log=lambda _: None, on_metrics=kill_at_step_2)
    assert trainer.state.step == 6
    out = capsys.readouterr().out
    assert out.count("warning: MLflow at") == 1  # warned once, not per call


def test_cd_takes_its_teacher_from_the_registry(
    digits16: str, mlflow_server: str, tmp_path: Path
) -> None:
    """Issue 4's last item: objective.cd.teacher = models:/NAME@ALIAS."""
    from mlflow import MlflowClient

    teacher = tracked_config(digits16, mlflow_server, experiment="teach", registry_name="edm-t")
    teacher.objective.kind, teacher.loop.steps = "edm", 2
    run_local(teacher, tmp_path / "teacher", log=lambda _: None)
    MlflowClient(mlflow_server).set_registered_model_alias("edm-t", "teacher", "1")

    from test_train import tiny_config

    cd = tiny_config(digits16, steps=2, checkpoint_every=2)
    cd.objective.kind, cd.objective.cd.teacher = "cd", "models:/edm-t@teacher"
    trainer = run_local(cd, tmp_path / "cd", log=lambda _: None)
    assert trainer.state.step == 2
    assert trainer.objective.teacher.training is False  # the fetched teacher is frozen


def test_a_model_the_registry_lacks_is_one_line(
    mlflow_server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    for source in ("models:/nope@champion", "runs:/0123abc/model"):
        assert main(["sample", "--model", source, "--out", str(tmp_path / "x.png")]) == 2
        (line,) = capsys.readouterr().err.strip().splitlines()
        assert line.startswith(f"sample error: {source}: "), line
    dst = tmp_path / "fetched"
    assert main(["fetch", "--model", "models:/nope@champion", "--out", str(dst)]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("fetch error: models:/nope@champion: ") and "nope" in line
    assert not dst.exists()  # nothing left behind
