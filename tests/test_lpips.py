"""Weight staging and the LPIPS metric, exercised offline with random torchvision-format weights."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import fsspec
import pytest
import torch
import torchvision

from cmray.core.lpips import BackboneWeightsError, LPIPSDistance
from cmray.weights import (
    KNOWN_WEIGHTS,
    WeightsNotFoundError,
    load_lpips,
    stage_lpips_backbone,
    stage_weights,
    torch_hub_checkpoint_path,
)

VGG_FILE, VGG_URL = KNOWN_WEIGHTS["vgg"]


@pytest.fixture(scope="module")
def vgg_state_dict() -> dict[str, torch.Tensor]:
    # Random init, but exactly the key format of the real vgg16-397923af.pth (classifier included).
    torch.manual_seed(0)
    return torchvision.models.vgg16(weights=None).state_dict()


@pytest.fixture(scope="module")
def vgg_file(tmp_path_factory: pytest.TempPathFactory, vgg_state_dict) -> Path:
    path = tmp_path_factory.mktemp("weights") / VGG_FILE
    torch.save(vgg_state_dict, path)
    return path


@pytest.fixture(scope="module")
def metric(vgg_file: Path) -> LPIPSDistance:
    return load_lpips("vgg", vgg_file)


@pytest.fixture
def torch_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "torch_home"
    monkeypatch.setenv("TORCH_HOME", str(home))
    return home


@pytest.fixture
def small_weight_file(tmp_path: Path) -> Path:
    # Staging is byte-level; a small file keeps the copy tests fast.
    path = tmp_path / "src" / VGG_FILE
    path.parent.mkdir()
    path.write_bytes(b"not really a checkpoint" * 1000)
    return path


@pytest.fixture
def memory_url(small_weight_file: Path) -> Iterator[str]:
    url = f"memory://cmray-test/{VGG_FILE}"
    with fsspec.open(url, "wb") as f:
        f.write(small_weight_file.read_bytes())
    yield url
    fsspec.filesystem("memory").rm(url)


def _cache_dir_leftovers(cache_file: Path) -> list[str]:
    return sorted(p.name for p in cache_file.parent.iterdir() if p.name != cache_file.name)


# --- staging -------------------------------------------------------------------------------------


def test_hub_path_honours_torch_home(torch_home: Path) -> None:
    assert torch_hub_checkpoint_path(VGG_FILE) == torch_home / "hub" / "checkpoints" / VGG_FILE


def test_stage_from_local_path_is_used_in_place(torch_home: Path, small_weight_file: Path) -> None:
    assert stage_weights(VGG_FILE, str(small_weight_file)) == small_weight_file
    assert not torch_hub_checkpoint_path(VGG_FILE).exists()


def test_stage_from_cache_when_no_source(torch_home: Path, small_weight_file: Path) -> None:
    cached = torch_hub_checkpoint_path(VGG_FILE)
    cached.parent.mkdir(parents=True)
    cached.write_bytes(small_weight_file.read_bytes())
    assert stage_weights(VGG_FILE) == cached


@pytest.mark.parametrize("kind", ["file", "memory"])
def test_stage_from_fsspec_url_copies_into_cache_once(
    kind: str, torch_home: Path, small_weight_file: Path, memory_url: str
) -> None:
    url = small_weight_file.as_uri() if kind == "file" else memory_url
    cached = torch_hub_checkpoint_path(VGG_FILE)

    staged = stage_weights(VGG_FILE, url)

    assert staged == cached
    assert staged.read_bytes() == small_weight_file.read_bytes()
    assert _cache_dir_leftovers(cached) == []  # no temp file left behind

    mtime = cached.stat().st_mtime_ns
    inode = cached.stat().st_ino
    assert stage_weights(VGG_FILE, url) == cached
    # os.replace would give a new inode, so an unchanged one proves nothing was re-copied.
    assert (cached.stat().st_ino, cached.stat().st_mtime_ns) == (inode, mtime)


def test_stage_recopies_when_cached_size_differs(torch_home: Path, memory_url: str) -> None:
    cached = torch_hub_checkpoint_path(VGG_FILE)
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"truncated")
    stage_weights(VGG_FILE, memory_url)
    with fsspec.open(memory_url, "rb") as f:
        assert cached.read_bytes() == f.read()


def _assert_one_line_naming(err: WeightsNotFoundError, *parts: str) -> None:
    msg = str(err)
    assert "\n" not in msg
    for part in parts:
        assert part in msg, (part, msg)


def test_missing_in_cache_message(torch_home: Path) -> None:
    with pytest.raises(WeightsNotFoundError) as exc:
        stage_lpips_backbone("vgg")
    cached = str(torch_hub_checkpoint_path(VGG_FILE))
    _assert_one_line_naming(exc.value, VGG_FILE, cached, VGG_URL, "metric.lpips_weights")
    assert isinstance(exc.value, FileNotFoundError)


@pytest.mark.parametrize("source", ["local", "memory://cmray-test/nope/vgg.pth"])
def test_missing_source_message(torch_home: Path, tmp_path: Path, source: str) -> None:
    if source == "local":
        source = str(tmp_path / "nope" / VGG_FILE)
    with pytest.raises(WeightsNotFoundError) as exc:
        stage_lpips_backbone("vgg", source)
    cached = str(torch_hub_checkpoint_path(VGG_FILE))
    _assert_one_line_naming(exc.value, VGG_FILE, source, cached, VGG_URL)
    assert not torch_hub_checkpoint_path(VGG_FILE).exists()


# --- the metric ----------------------------------------------------------------------------------


def test_backbone_loaded_from_file(metric: LPIPSDistance, vgg_state_dict) -> None:
    # lpips's slices keep torchvision's child names, so slice3's "12" is features.12.
    slices = dict(metric.lpips.net.named_children())
    conv0 = slices["slice1"].get_submodule("0")
    conv12 = slices["slice3"].get_submodule("12")
    conv28 = slices["slice5"].get_submodule("28")
    assert torch.equal(conv0.weight, vgg_state_dict["features.0.weight"])
    assert torch.equal(conv12.bias, vgg_state_dict["features.12.bias"])
    assert torch.equal(conv28.weight, vgg_state_dict["features.28.weight"])


def test_distance_values_and_shape(metric: LPIPSDistance) -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.rand(3, 3, 32, 32, generator=g) * 2 - 1
    y = torch.rand(3, 3, 32, 32, generator=g) * 2 - 1
    with torch.no_grad():
        same, diff = metric(x, x), metric(x, y)
    assert same.shape == diff.shape == (3,)
    assert torch.all(same == 0)
    assert torch.all(diff > 0)


def test_gradients_reach_input_only(metric: LPIPSDistance) -> None:
    g = torch.Generator().manual_seed(2)
    x = (torch.rand(2, 3, 32, 32, generator=g) * 2 - 1).requires_grad_()
    y = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    metric(x, y).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert all(not p.requires_grad and p.grad is None for p in metric.parameters())


def test_parent_train_mode_keeps_metric_frozen_in_eval(metric: LPIPSDistance) -> None:
    parent = torch.nn.ModuleDict({"metric": metric}).train()
    assert not any(m.training for m in parent["metric"].modules())


def _first_conv_input_size(metric: LPIPSDistance, size: int) -> tuple[int, int]:
    seen: list[tuple[int, int]] = []
    hook = metric.lpips.net.slice1.get_submodule("0").register_forward_hook(
        lambda _m, inputs, _out: seen.append(tuple(inputs[0].shape[-2:]))
    )
    try:
        with torch.no_grad():
            metric(torch.zeros(1, 3, size, size), torch.zeros(1, 3, size, size))
    finally:
        hook.remove()
    return seen[0]


def test_small_images_resized_to_224(metric: LPIPSDistance) -> None:
    assert _first_conv_input_size(metric, 32) == (224, 224)


def test_256_images_not_resized(metric: LPIPSDistance) -> None:
    assert _first_conv_input_size(metric, 256) == (256, 256)


# --- strict backbone loading ---------------------------------------------------------------------


def _features_only(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state_dict.items() if k.startswith("features.")}


def test_missing_backbone_key_raises(vgg_state_dict) -> None:
    broken = _features_only(vgg_state_dict)
    del broken["features.10.weight"]
    with pytest.raises(BackboneWeightsError, match=r"missing keys \['features\.10\.weight'\]"):
        LPIPSDistance(broken, net="vgg")


def test_wrong_backbone_shape_raises(vgg_state_dict) -> None:
    broken = _features_only(vgg_state_dict)
    broken["features.0.weight"] = torch.zeros(32, 3, 3, 3)
    with pytest.raises(BackboneWeightsError, match=r"shape mismatch.*features\.0\.weight"):
        LPIPSDistance(broken, net="vgg")


def test_wrong_architecture_raises(vgg_state_dict) -> None:
    # A VGG file handed to the AlexNet metric must not half-load.
    with pytest.raises(BackboneWeightsError, match="alex"):
        LPIPSDistance(_features_only(vgg_state_dict), net="alex")
