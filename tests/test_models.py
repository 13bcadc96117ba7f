"""The model layer: what a model is, its file, its sources, and one-line errors for bad ones."""

from __future__ import annotations

import ast
import graphlib
from pathlib import Path

import pytest
import torch

from cmray.cli import main
from cmray.config import from_dict, to_dict
from cmray.models import (
    MODEL_FORMAT,
    ModelConfig,
    ModelSourceError,
    build_model,
    load_model,
    write_model_file,
)
from cmray.models import files as model_files
from cmray.nets.unet import UNetConfig
from cmray.train.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
TINY = UNetConfig(resolution=8, model_channels=32, channel_mult=[1, 2], attention_resolutions=[4])


def _package_imports() -> dict[str, set[str]]:
    """cmray's packages (and top-level modules) and the others each imports, anywhere."""
    units = {p.stem for p in (ROOT / "cmray").iterdir() if not p.name.startswith("_")}
    edges: dict[str, set[str]] = {u: set() for u in units}
    for path in (ROOT / "cmray").rglob("*.py"):
        src = path.relative_to(ROOT / "cmray").parts[0].removesuffix(".py")
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names = [node.module]
            for name in names:
                parts = name.split(".")
                inside = parts[0] == "cmray" and len(parts) > 1 and parts[1] in units
                if inside and parts[1] != src and src in edges:
                    edges[src].add(parts[1])
    return edges


def test_no_two_packages_import_each_other() -> None:
    """Every import counts, those inside functions too: a circle raises CycleError."""
    order = list(graphlib.TopologicalSorter(_package_imports()).static_order())
    assert order.index("models") < min(order.index(p) for p in ("train", "eval", "tracking"))


def test_the_model_layer_reads_no_layer_above_it() -> None:
    above = {"train", "eval", "tune", "tracking", "experiments", "cli", "jobs", "cluster"}
    assert not _package_imports()["models"] & above


@pytest.mark.parametrize(
    ("objective", "N"),
    [
        ({"kind": "cd", "cd": {"teacher": "t", "N": 18}}, 18),
        ({"kind": "ct", "ct": {"s1": 150}}, 151),
        ({"kind": "edm"}, 0),
    ],
)
def test_a_run_names_the_model_it_trains(objective: dict, N: int) -> None:
    noise = {"sigma_min": 0.01, "sigma_max": 40.0, "rho": 5.0, "c_noise_scale": 16.0}
    cfg = from_dict(
        TrainConfig,
        {
            "data": {"manifest": "m.json"},
            "net": to_dict(TINY),
            "objective": {**objective, "noise": noise, "sigma_data": 0.3},
        },
    )
    model = cfg.model_config()
    assert (model.kind, model.N, model.sigma_data) == (objective["kind"], N, 0.3)
    assert model.net == TINY and to_dict(model.noise) == noise
    assert model.is_consistency == (objective["kind"] != "edm")


def _tiny_model(kind: str = "cd") -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    cfg = ModelConfig(kind=kind, net=TINY, N=40 if kind != "edm" else 0)
    torch.manual_seed(0)
    return cfg, build_model(cfg).state_dict()


def test_a_model_file_round_trips(tmp_path: Path) -> None:
    cfg, weights = _tiny_model()
    path = write_model_file(tmp_path / "m.pt", cfg, weights)
    assert torch.load(path, weights_only=True)["format"] == MODEL_FORMAT
    assert not list(tmp_path.glob("*.part"))
    model, loaded = load_model(path)
    assert loaded == cfg and not model.training
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in weights.items())
    # The sigma_min boundary of a consistency model holds: f(x, eps) = x.
    x = torch.randn(2, 3, 8, 8)
    eps = torch.full((2,), cfg.noise.sigma_min)
    assert torch.allclose(model(x, eps), x)


def test_a_first_format_file_reads_its_model_from_the_run_config(tmp_path: Path) -> None:
    """cmray-model/1 files carry the training config only; they keep loading."""
    cfg, weights = _tiny_model("edm")
    training = {
        "net": to_dict(TINY),
        "objective": {"kind": "edm", "noise": to_dict(cfg.noise), "sigma_data": 0.5},
    }
    old = {"format": "cmray-model/1", "config": training, "weights": weights}
    torch.save(old, tmp_path / "old.pt")
    _, loaded = load_model(tmp_path / "old.pt")
    assert loaded == cfg


def test_a_resolver_teaches_every_reader_a_source(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg, weights = _tiny_model()
    write_model_file(tmp_path / "m.pt", cfg, weights)
    monkeypatch.setattr(model_files, "_RESOLVERS", [])
    with pytest.raises(ModelSourceError, match="no checkpoint at shelf:m"):
        load_model("shelf:m")
    model_files.register_resolver(
        lambda s: str(tmp_path / f"{s.removeprefix('shelf:')}.pt") if s[:6] == "shelf:" else None
    )
    assert load_model("shelf:m")[1] == cfg


# ------------------------------------------------------------------- one-line errors


def _bad_sources(tmp: Path) -> dict[str, tuple[str, str]]:
    """Source -> (what the one line must say), each written under ``tmp``."""
    cfg, weights = _tiny_model()
    (tmp / "corrupt").mkdir()
    (tmp / "corrupt" / "state.pt").write_bytes(b"PK\x03\x04 not a zip at all")
    torch.save({"format": "other-model/9", "weights": {}}, tmp / "foreign.pt")
    wrong = dict(weights)
    wrong.pop(next(iter(wrong)))
    write_model_file(tmp / "wrong.pt", cfg, wrong)
    return {
        str(tmp / "none"): "no checkpoint at",
        str(tmp / "corrupt"): "is not a readable model or checkpoint file",
        str(tmp / "foreign.pt"): "model file format 'other-model/9'",
        str(tmp / "wrong.pt"): "its weights do not fit its config",
        "models:/nope@champion": "no MLflow tracking store at",
        "runs:/abc/model": "no MLflow tracking store at",
    }


def test_every_bad_source_is_one_line_and_exit_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """No tracking URI configured: MLflow URIs are looked up in the documented local store,
    runs/mlflow/mlflow.db, which a lookup does not create (nor an mlflow.db here)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    for source, says in _bad_sources(tmp_path).items():
        out = tmp_path / "x.png"
        assert main(["sample", "--model", source, "--num", "1", "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("sample error: "), err
        assert source in err[0] and says in err[0], err[0]
        assert not out.exists()
        if source.startswith(("models:/", "runs:/")):
            assert str(tmp_path / "runs" / "mlflow" / "mlflow.db") in err[0]
    assert not list(tmp_path.rglob("mlflow.db")) and not (tmp_path / "mlruns").exists()


def test_a_corrupt_checkpoint_is_one_line_for_edit_too(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "state.pt").write_bytes(b"\x80\x02 truncated pickle")
    image = tmp_path / "in.png"
    from PIL import Image

    Image.new("RGB", (8, 8)).save(image)
    args = ["edit", "--model", str(tmp_path / "ckpt"), "--task", "denoise"]
    assert main([*args, "--input", str(image), "--out", str(tmp_path / "o.png")]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("edit error: ") and str(tmp_path / "ckpt") in line


def test_s3_without_credentials_is_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no wait for an instance role
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    import s3fs

    # s3fs caches filesystems by their arguments: not one an earlier test made with
    # credentials now, and not this one, without them, for the tests after.
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        assert main(["sample", "--model", "s3://bucket/x", "--out", "/nonexistent/x.png"]) == 2
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line == "sample error: s3://bucket/x: NoCredentialsError: Unable to locate credentials"


def test_a_failed_fetch_leaves_no_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    dst = tmp_path / "fetched"
    assert main(["fetch", "--model", "models:/nope@champion", "--out", str(dst)]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("fetch error: ") and "no MLflow tracking store" in line
    assert not dst.exists()


def test_a_teacher_samples_with_edms_heun_solve(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """An EDM model (trained here or imported) samples by EDM's sampler: 18 points, 35 NFE."""
    cfg, weights = _tiny_model("edm")
    write_model_file(tmp_path / "edm.pt", cfg, weights)
    out = tmp_path / "grid.png"
    assert (
        main(["sample", "--model", str(tmp_path / "edm.pt"), "--num", "2", "--out", str(out)]) == 0
    )
    assert "(35 NFE each)" in capsys.readouterr().out and out.is_file()


def test_class_conditional_sampling_takes_a_class_or_draws_them(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    net = UNetConfig(**{**to_dict(TINY), "num_classes": 5})
    cfg = ModelConfig(kind="cd", net=net, N=40)
    write_model_file(tmp_path / "c.pt", cfg, build_model(cfg).state_dict())
    base = ["sample", "--model", str(tmp_path / "c.pt"), "--num", "3", "--out"]
    assert main([*base, str(tmp_path / "a.png"), "--class", "4"]) == 0
    assert main([*base, str(tmp_path / "b.png")]) == 0  # uniformly drawn classes
    capsys.readouterr()
    assert main([*base, str(tmp_path / "c.png"), "--class", "5"]) == 2
    assert capsys.readouterr().err.strip() == "sample error: class 5: accepted 0 <= class < 5"
    write_model_file(tmp_path / "u.pt", *_tiny_model())
    args = ["sample", "--model", str(tmp_path / "u.pt"), "--out", str(tmp_path / "u.png")]
    assert main([*args, "--class", "1"]) == 2
    assert "this model is unconditional" in capsys.readouterr().err


def test_samples_for_other_scorers_npz_and_png_directory(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """FILE.npz holds arr_0 as N x H x W x C uint8 (openai's reference evaluator reads it);
    DIR/ holds one PNG per sample, the same pixels; a grid and both agree on the noise."""
    import numpy as np
    from PIL import Image

    cfg, weights = _tiny_model()
    write_model_file(tmp_path / "m.pt", cfg, weights)
    base = ["sample", "--model", str(tmp_path / "m.pt"), "--num", "3", "--out"]
    assert main([*base, str(tmp_path / "s.npz")]) == 0
    arr = np.load(tmp_path / "s.npz")["arr_0"]
    res, ch = cfg.net.resolution, cfg.net.in_channels
    assert arr.shape == (3, res, res, ch) and arr.dtype == np.uint8
    assert main([*base, str(tmp_path / "pngs") + "/"]) == 0
    files = sorted((tmp_path / "pngs").iterdir())
    assert [f.name for f in files] == ["00000.png", "00001.png", "00002.png"]
    first = np.asarray(Image.open(files[0]))
    np.testing.assert_array_equal(first.reshape(arr[0].shape), arr[0])
    assert "one PNG each" in capsys.readouterr().out
    # A non-empty directory is refused whole; an unknown suffix names what is accepted.
    assert main([*base, str(tmp_path / "pngs") + "/"]) == 2
    assert "not empty" in capsys.readouterr().err
    assert main([*base, str(tmp_path / "s.jpg")]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "FILE.npz" in line and "DIR/" in line and not (tmp_path / "s.jpg").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
