"""Evaluation: the search, streaming statistics, weight loading, reference stats, the driver."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from PIL import Image

from cmray.cli import main
from cmray.config import from_dict
from cmray.eval.config import EvalConfig
from cmray.eval.evaluate import compute_ref_stats, evaluate
from cmray.eval.features import (
    INCEPTION_FILE,
    load_feature_net,
    stage_inception,
    write_random_inception_weights,
)
from cmray.eval.featurizer import Featurizer, SampleTask
from cmray.eval.frechet import RunningGaussian, gaussian_stats
from cmray.eval.reference import load_ref_stats, ref_stats_url
from cmray.eval.scores import knn_radii
from cmray.eval.search import greedy_indices, ternary_search
from cmray.weights import WeightsNotFoundError


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("inception") / INCEPTION_FILE
    write_random_inception_weights(path, seed=0)
    return path


def eval_config(manifest: str, model: str, out: Path, **overrides: object) -> EvalConfig:
    base = {
        "manifest": manifest,
        "model": model,
        "features": "digits",
        "num_samples": 120,
        "ref_count": 600,
        "pr_count": 100,
        "batch_size": 50,
        "sampling": {"steps": 2, "search_samples": 40, "N": 12},
        "workers": -1,
        "out": str(out),
    }
    return from_dict(EvalConfig, {**base, **overrides})


# ---------------------------------------------------------------------------- search


@pytest.mark.parametrize("best", [1, 2, 7, 30, 49, 50])
def test_ternary_search_finds_the_minimum_in_logarithmic_evaluations(best: int) -> None:
    calls: list[int] = []

    def f(i: int) -> float:
        calls.append(i)
        return (i - best) ** 2

    assert ternary_search(f, 1, 50) == best
    assert len(calls) <= 4 * math.ceil(math.log(50, 1.5)) + 3  # 50 would mean a scan


def test_ternary_search_survives_a_plateau() -> None:
    assert ternary_search(lambda i: max(abs(i - 20), 5), 0, 40) in range(15, 26)


def test_greedy_indices_places_each_step_in_turn() -> None:
    """A separable score with its optimum at (0, 30, 10... ) rewards index 30 then 45."""
    targets = [30, 45]

    def score(indices: tuple[int, ...]) -> float:
        inner = indices[1:-1]
        return sum((i - t) ** 2 for i, t in zip(inner, targets, strict=False)) + 100 * (
            len(targets) - len(inner)
        )

    result = greedy_indices(score, N=60, steps=3)
    assert result.indices == (0, 30, 45, 59)
    assert result.score == 0
    assert all(key[-1] == 59 and key[0] == 0 for key in result.evaluated)


# ------------------------------------------------------------------------ statistics


def test_running_gaussian_matches_the_one_shot_statistics() -> None:
    x = torch.randn(1000, 16, dtype=torch.float64) * 3 + 1
    running = RunningGaussian()
    for part in x.split(137):
        running.add(part)
    mu, cov = gaussian_stats(x)
    assert torch.allclose(running.stats()[0], mu)
    assert torch.allclose(running.stats()[1], cov, atol=1e-10)


def test_knn_radii_in_blocks_equal_the_full_matrix() -> None:
    x = torch.randn(300, 8)
    full = torch.cdist(x.double(), x.double()).kthvalue(4, dim=1).values
    assert torch.equal(knn_radii(x, k=3, batch=64), full)


# ---------------------------------------------------------------------------- weights


def test_inception_loads_from_a_weight_file(inception_file: Path) -> None:
    """The real loading path (stage, check, torch-fidelity's constructor) on random weights."""
    torch.manual_seed(0)
    net = load_feature_net("inception", str(inception_file))
    images = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    pool, logits = net(images)
    assert pool.shape == (3, 2048) and logits.shape == (3, 1008)
    assert torch.isfinite(pool).all() and not torch.allclose(pool[0], pool[1])
    assert net.frechet_name == "fid"


def test_inception_is_staged_from_a_url_into_the_hub_cache(
    inception_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    staged = stage_inception(inception_file.as_uri())
    assert staged == tmp_path / "torch" / "hub" / "checkpoints" / INCEPTION_FILE
    assert staged.read_bytes() == inception_file.read_bytes()
    assert stage_inception(None) == staged  # later workers find it in the cache


def test_missing_inception_weights_name_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    with pytest.raises(WeightsNotFoundError, match=re.escape(INCEPTION_FILE)):
        load_feature_net("inception")
    with pytest.raises(WeightsNotFoundError, match=r"nowhere\.pth"):
        load_feature_net("inception", str(tmp_path / "nowhere.pth"))


# ------------------------------------------------------------------ reference, driver


def test_ref_stats_are_saved_beside_the_manifest_and_remade_when_stale(
    digits16: str, digits_model: str, tmp_path: Path, inception_file: Path
) -> None:
    cfg = eval_config(digits16, digits_model, tmp_path, ref_count=500)
    stats = compute_ref_stats(cfg, log=lambda _: None)
    assert stats.count == 500  # the first 500 images: one whole shard of 300, then 200
    assert Path(ref_stats_url(digits16, "digits")).is_file()
    saved = load_ref_stats(digits16, "digits")
    assert saved is not None and torch.equal(saved.mu, stats.mu)
    assert 0 < stats.split_half < 100  # two halves of real digits are close, not identical

    other = tmp_path / "other.pt"
    write_random_inception_weights(other, seed=1)
    inc = {**_plain(cfg), "features": "inception", "ref_count": 8, "num_samples": 20}
    inc["sampling"] = {"steps": 1}
    first = compute_ref_stats(from_dict(EvalConfig, {**inc, "weights": str(inception_file)}))
    logged: list[str] = []
    evaluate(from_dict(EvalConfig, {**inc, "weights": str(other)}), log=logged.append)
    assert any("other inception weights" in line for line in logged)
    remade = load_ref_stats(digits16, "inception")
    assert remade is not None and remade.weights_fingerprint != first.weights_fingerprint


def _plain(cfg: EvalConfig) -> dict:
    from cmray.config import to_dict

    return to_dict(cfg)


def test_evaluate_writes_one_and_two_step_figures_and_a_grid(
    digits16: str, digits_model: str, tmp_path: Path
) -> None:
    report = evaluate(eval_config(digits16, digits_model, tmp_path / "out"), log=lambda _: None)
    saved = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert saved == json.loads(json.dumps(report))
    one, two = saved["results"]
    assert (one["nfe"], two["nfe"]) == (1, 2)
    assert one["indices"] == [0, 11] and len(two["indices"]) == 3
    assert two["indices"] == saved["search"]["chosen"]
    best = min(e["fd_digits"] for e in saved["search"]["evaluated"])
    chosen = [e for e in saved["search"]["evaluated"] if e["indices"] == two["indices"]]
    assert chosen[0]["fd_digits"] == best
    for r in (one, two):
        assert r["fd_digits"] > 0 and 0 <= r["precision"] <= 1 and 0 <= r["recall"] <= 1
        assert r["samples"] == 120
    assert saved["features"]["frechet"] == "fd_digits"  # never reported as "fid"
    grid = Image.open(tmp_path / "out" / "samples.png")
    # 32 one-step + 32 two-step, each 16x16 sample drawn 4x (64 px) so a person can judge it
    assert grid.size == (8 * 64 + 9 * 2, 8 * 64 + 9 * 2)


def test_given_indices_skip_the_search(digits16: str, digits_model: str, tmp_path: Path) -> None:
    cfg = eval_config(
        digits16, digits_model, tmp_path, sampling={"steps": 2, "indices": [0, 5, 11], "N": 12}
    )
    report = evaluate(cfg, log=lambda _: None)
    assert report["search"] is None and report["results"][1]["indices"] == [0, 5, 11]


def test_each_figure_is_the_mean_over_draws_and_the_first_draw_is_the_single_ones(
    digits16: str, digits_model: str, tmp_path: Path
) -> None:
    """Draws of noise beyond the first come from other chunk numbers of the same seed; the
    search and the images stay the first draw's."""
    sampling = {"steps": 2, "indices": [0, 5, 11], "N": 12}
    one = evaluate(eval_config(digits16, digits_model, tmp_path / "a", sampling=sampling))
    three = evaluate(
        eval_config(digits16, digits_model, tmp_path / "b", sampling=sampling, draws=3)
    )
    for single, mean in zip(one["results"], three["results"], strict=True):
        draws = mean["fd_digits_draws"]
        assert mean["draws"] == 3 and len(set(draws)) == 3  # three different noises
        assert draws[0] == single["fd_digits"] and single["fd_digits_draws"] == draws[:1]
        assert mean["fd_digits"] == pytest.approx(sum(draws) / 3)
        assert mean["fd_digits_sd"] > 0 and single["fd_digits_sd"] == 0.0


def test_sub_batched_sampling_gives_the_same_features(digits16: str, digits_model: str) -> None:
    def features(model_batch: int) -> tuple[dict[str, torch.Tensor], list[int]]:
        cfg = eval_config(digits16, digits_model, Path("unused"), model_batch=model_batch)
        featurizer = Featurizer(cfg, with_model=True)
        model, sizes = featurizer.model, []

        def counted(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            sizes.append(x.shape[0])
            return model(x, t)

        featurizer.use_model(counted, featurizer.model_cfg)
        return featurizer.samples(SampleTask(3, 40, taus=(5.0,), keep_images=40)), sizes

    (whole, whole_calls), (split, split_calls) = features(250), features(16)
    assert whole_calls == [40, 40] and split_calls == [16, 16, 8] * 2  # two NFE, each split
    assert torch.allclose(split["pool"], whole["pool"], atol=1e-5)
    assert split["images"].shape[0] == 40
    assert torch.equal(split["images"], whole["images"])


@pytest.mark.parametrize("setting", ["conv", "global", "legacy"])
def test_features_are_computed_without_tf32(digits16: str, digits_model: str, setting: str) -> None:
    """Reference statistics are made on CPUs, so GPU features must not use TF32 convolutions,
    however TF32 was turned on (torch's per-operator setting, its global one, or the legacy
    flag); the run's own setting is restored after."""
    featurizer = Featurizer(eval_config(digits16, digits_model, Path("unused")), False)
    backends, seen = torch.backends, []
    conv = backends.cudnn.conv
    featurizer.net.register_forward_hook(lambda *_: seen.append(conv.fp32_precision))
    before = (backends.fp32_precision, conv.fp32_precision)
    if setting == "conv":
        conv.fp32_precision = "tf32"
    elif setting == "global":  # the operator inherits it
        conv.fp32_precision, backends.fp32_precision = "none", "tf32"
    else:
        backends.cudnn.allow_tf32 = True
    on = conv.fp32_precision
    try:
        featurizer.featurize([torch.zeros(2, 1, 16, 16, dtype=torch.uint8)] * 2)
        assert seen == ["ieee", "ieee"] and conv.fp32_precision == on
    finally:
        backends.fp32_precision, conv.fp32_precision = before


def test_cli_rejects_bad_input_with_one_line(
    digits16: str, digits_model: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["eval", "run", "--set", f"manifest={digits16}", "--set", "features=vgg"])
    assert exc.value.code == 2
    assert "features" in capsys.readouterr().err
    sets = [f"manifest={tmp_path}/none", f"model={digits_model}", f"out={tmp_path}"]
    code = main(["eval", "run", *[arg for s in sets for arg in ("--set", s)]])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "manifest" in err and len(err.splitlines()) == 1


# -------------------------------------------------------------------------------- Ray


@pytest.mark.slow
def test_ray_actors_give_the_in_process_figures(
    digits16: str, digits_model: str, tmp_path: Path, ray_cluster: None
) -> None:
    indices = {"steps": 2, "indices": [0, 5, 11], "N": 12}
    local = evaluate(
        eval_config(digits16, digits_model, tmp_path / "a", sampling=indices), log=print
    )
    on_ray = evaluate(
        eval_config(digits16, digits_model, tmp_path / "b", sampling=indices, workers=2),
        log=print,
    )
    for a, b in zip(local["results"], on_ray["results"], strict=True):
        assert a["fd_digits"] == pytest.approx(b["fd_digits"], rel=1e-9)
        assert a["precision"] == b["precision"] and a["recall"] == b["recall"]
    png = (tmp_path / "a" / "samples.png").read_bytes()
    assert png == (tmp_path / "b" / "samples.png").read_bytes()


@pytest.mark.parametrize("name", ["eval_digits", "eval_lsun_bedroom256"])
def test_shipped_eval_configs_load(name: str) -> None:
    from cmray.config import load_config

    cfg = load_config(EvalConfig, Path(__file__).parents[1] / "configs" / f"{name}.yaml")
    assert cfg.sampling.steps == 2 and not cfg.sampling.indices  # the search picks the taus
    if name == "eval_lsun_bedroom256":  # the paper's protocol
        assert (cfg.features, cfg.num_samples, cfg.ref_count, cfg.pr_k) == (
            "inception",
            50_000,
            50_000,
            3,
        )


def test_unreadable_ref_stats_count_as_missing(tmp_path: Path) -> None:
    (tmp_path / "manifest.json").write_text("{}")
    (tmp_path / "ref-stats-digits.pt").write_bytes(b"not a torch file")
    assert load_ref_stats(str(tmp_path), "digits") is None
    torch.save({"format": "cmray-ref-stats/1", "old_field": 1}, tmp_path / "ref-stats-digits.pt")
    assert load_ref_stats(str(tmp_path), "digits") is None
