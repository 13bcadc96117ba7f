"""Models that travel: openai's released checkpoints in, diffusers pipelines out and in.

diffusers' ``UNet2DModel`` is an independent implementation of the same ADM network, so equal
outputs check cmray's network and both name mappings at once. Weights are random and every
layer is perturbed, so that no zero-initialised branch hides a wrong mapping.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cmray.cli import main
from cmray.config import to_dict
from cmray.core.sampling import sample_multistep, taus_from_indices
from cmray.models import ModelConfig, ModelSourceError, build_model, load_model, write_model_file
from cmray.models.openai import convert_openai, reference_key
from cmray.nets.unet import UNet, UNetConfig, unet_config

# The two released topologies at toy width: LSUN's (no scale-shift, unconditional) and
# ImageNet's (scale-shift, class-conditional); both resample inside residual blocks.
TOPOLOGIES = {
    "lsun256": UNetConfig(
        resolution=16,
        model_channels=32,
        channel_mult=[1, 1, 2],
        num_res_blocks=2,
        attention_resolutions=[8, 4],
        num_head_channels=32,
        use_scale_shift_norm=False,
    ),
    "imagenet64": UNetConfig(
        resolution=16,
        model_channels=32,
        channel_mult=[1, 2, 3],
        num_res_blocks=3,
        attention_resolutions=[8, 4],
        num_head_channels=32,
        use_scale_shift_norm=True,
        num_classes=10,
    ),
}


def random_model(net: UNetConfig, kind: str = "cd", seed: int = 0) -> tuple[ModelConfig, dict]:
    cfg = ModelConfig(kind=kind, net=net, N=40 if kind != "edm" else 0)
    torch.manual_seed(seed)
    model = build_model(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.1)
    return cfg, model.state_dict()


def openai_layout(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """cmray weights as the reference's state dict: its names, 1x1 convs for attention."""
    out = {}
    for key, value in weights.items():
        key = key.removeprefix("net.")
        ref = reference_key(key)
        attention = ref.endswith(("qkv.weight", "proj_out.weight"))
        out[ref] = value[:, :, None, None].clone() if attention else value.clone()
    return out


# --------------------------------------------------------------------------- openai


def test_reference_names_follow_the_released_layout() -> None:
    """Facts of cm/unet.py's LSUN 256 U-Net: 18 input and 18 output blocks; the input
    convolution is input_blocks.0.0; levels 3-5 (32, 16, 8 px) attend; each level but the
    first ends its output blocks with a resampling residual block, after any attention."""
    with torch.device("meta"):
        keys = {reference_key(k) for k in UNet(unet_config("lsun256")).state_dict()}
    blocks = {int(k.split(".")[1]) for k in keys if k.startswith("input_blocks.")}
    assert blocks == set(range(18)) and "input_blocks.0.0.weight" in keys
    assert {int(k.split(".")[1]) for k in keys if k.startswith("output_blocks.")} == set(range(18))
    attends = {int(k.split(".")[1]) for k in keys if k.endswith(".1.qkv.weight") and "input" in k}
    assert attends == {10, 11, 13, 14, 16, 17}
    assert "output_blocks.2.2.in_layers.2.weight" in keys  # level 5: res, attention, up
    assert "output_blocks.17.1.qkv.weight" not in keys  # level 0 does not attend
    assert "output_blocks.14.1.in_layers.0.weight" in keys  # level 1: res, up
    assert "middle_block.1.proj_out.weight" in keys and "time_embed.2.bias" in keys


@pytest.mark.parametrize("preset", ["lsun256", "imagenet64"])
def test_the_released_presets_are_recognised_from_shapes(preset: str) -> None:
    """Full-size state dicts on the meta device: shapes only, no memory."""
    with torch.device("meta"):
        state = openai_layout(UNet(unet_config(preset)).state_dict())
    found, net, weights = convert_openai(state, "edm_some_model.pt")
    assert found == preset and net == unet_config(preset)
    assert net.num_classes == (1000 if preset == "imagenet64" else 0)
    assert all(w.dtype == torch.float32 for w in weights.values())


@pytest.mark.parametrize(
    ("damage", "says"),
    [
        (lambda s: s.pop("middle_block.1.qkv.weight"), "no middle_block.1.qkv.weight"),
        (
            lambda s: s.update({"out.2.weight": torch.zeros(3, 5, 3, 3)}),
            "out.2.weight has shape [3, 5, 3, 3]",
        ),
        (lambda s: s.update({"extra.weight": torch.zeros(1)}), "unexpected extra.weight"),
    ],
)
def test_a_file_that_fits_no_preset_names_the_first_misfit(damage, says: str) -> None:
    with torch.device("meta"):
        state = openai_layout(UNet(unet_config("lsun256")).state_dict())
    state = {k: torch.zeros(v.shape) if k == "out.2.weight" else v for k, v in state.items()}
    damage(state)
    with pytest.raises(ModelSourceError, match="fits no known U-Net") as err:
        convert_openai(state, "cd_bedroom256_lpips.pt")
    assert says in str(err.value) and "\n" not in str(err.value)


def test_cmray_import_openai_keeps_every_weight(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """Through the command, with the toy topology registered as the dataset's preset."""
    from cmray.models import openai
    from cmray.nets import unet

    net = TOPOLOGIES["lsun256"]
    monkeypatch.setitem(unet.UNET_PRESETS, "toy16", to_dict(net))
    monkeypatch.setitem(openai.DATASET_PRESETS, "toy16", "toy16")
    monkeypatch.setitem(openai.CT_GRID, "toy16", 151)
    _, weights = random_model(net)
    torch.save(openai_layout(weights), tmp_path / "ct_toy16.pt")
    out = tmp_path / "ct.pt"
    assert main(["import", "openai", str(tmp_path / "ct_toy16.pt"), "--out", str(out)]) == 0
    assert "a ct model, 16x16" in capsys.readouterr().out
    model, loaded = load_model(out)
    assert loaded.kind == "ct" and loaded.N == 151 and loaded.net == net
    assert all(torch.equal(model.state_dict()[k], v) for k, v in weights.items())

    assert main(["import", "openai", str(tmp_path / "ct_toy16.pt"), "--out", str(out)]) == 0
    torch.save(openai_layout(weights), tmp_path / "model.pt")
    assert main(["import", "openai", str(tmp_path / "model.pt"), "--out", str(out)]) == 2
    assert "give --kind edm|cd|ct" in capsys.readouterr().err
    args = ["import", "openai", str(tmp_path / "model.pt"), "--out", str(out), "--kind", "edm"]
    assert main(args) == 0 and load_model(out)[1].kind == "edm"
    assert main(["import", "openai", str(tmp_path / "none.pt"), "--out", str(out)]) == 2


# --------------------------------------------------------------------------- diffusers


def exported(net: UNetConfig, tmp_path: Path) -> tuple[ModelConfig, dict]:
    """A random model written to m.pt and exported through the command to pipe/."""
    cfg, weights = random_model(net)
    write_model_file(tmp_path / "m.pt", cfg, weights)
    args = ["export", "diffusers", "--model", str(tmp_path / "m.pt"), "--out"]
    assert main([*args, str(tmp_path / "pipe")]) == 0
    return cfg, weights


def _perturbed_noise_levels(batch: int) -> torch.Tensor:
    return torch.tensor([80.0, 4.3, 0.5, 0.01][:batch])


@pytest.mark.parametrize("topology", sorted(TOPOLOGIES))
def test_exported_unet_equals_cmray_and_imports_back_bit_exact(
    topology: str, tmp_path: Path
) -> None:
    from diffusers import UNet2DModel

    net = TOPOLOGIES[topology]
    cfg, weights = exported(net, tmp_path)
    theirs = UNet2DModel.from_pretrained(tmp_path / "pipe" / "unet").eval()
    ours = UNet(net).eval()
    ours.load_state_dict({k.removeprefix("net."): v for k, v in weights.items()})
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    cond = 250.0 * torch.log(_perturbed_noise_levels(4))
    labels = torch.tensor([0, 3, 7, 9]) if net.num_classes else None
    with torch.no_grad():
        want = ours(x, cond, labels)
        got = theirs(x, cond, class_labels=labels).sample
    assert want.abs().mean() > 0.1  # a real signal, not zeros on both sides
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)

    args = ["import", "diffusers", str(tmp_path / "pipe"), "--out", str(tmp_path / "b.pt")]
    assert main(args) == 0
    back = torch.load(tmp_path / "b.pt", weights_only=True)
    assert back["model"] == to_dict(cfg)
    assert set(back["weights"]) == set(weights)
    assert all(torch.equal(back["weights"][k], v) for k, v in weights.items())


def test_export_refuses_a_time_input_diffusers_cannot_feed(tmp_path: Path, capsys) -> None:
    """diffusers' scheduler always hands the network 250 ln sigma: a model trained on another
    scale would sample another function there, so it gets one line and no directory."""
    cfg, weights = random_model(next(iter(TOPOLOGIES.values())))
    cfg.noise.c_noise_scale = 16.0
    write_model_file(tmp_path / "m.pt", cfg, weights)
    args = ["export", "diffusers", "--model", str(tmp_path / "m.pt"), "--out"]
    assert main([*args, str(tmp_path / "pipe")]) == 2
    assert "noise.c_noise_scale = 16.0" in capsys.readouterr().err
    assert not (tmp_path / "pipe").exists()
    model, back = load_model(tmp_path / "m.pt")
    assert back.noise.c_noise_scale == 16.0 and model.parametrization.c_noise_scale == 16.0


@pytest.mark.parametrize("topology", sorted(TOPOLOGIES))
def test_the_pipeline_samples_what_cmray_samples(topology: str, tmp_path: Path) -> None:
    """One and two steps from the same latents (and, for two, the same second noise)."""
    from diffusers import ConsistencyModelPipeline

    net = TOPOLOGIES[topology]
    cfg, _ = exported(net, tmp_path)
    pipe = ConsistencyModelPipeline.from_pretrained(tmp_path / "pipe")
    pipe.set_progress_bar_config(disable=True)
    model, _ = load_model(tmp_path / "m.pt")
    noise = cfg.noise
    z = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    labels = torch.tensor([1, 4]) if net.num_classes else None
    for indices in ([0, 39], [0, 17, 39]):
        taus = taus_from_indices(indices, cfg.N, noise.sigma_min, noise.sigma_max, noise.rho)
        f = model if labels is None else (lambda x, t: model(x, t, class_labels=labels))
        ours = sample_multistep(
            f, z, taus, torch.Generator().manual_seed(3), noise.sigma_min, noise.sigma_max, (-1, 1)
        ).x
        timesteps = indices[-2::-1]  # diffusers lists the same grid indices, descending
        theirs = pipe(
            batch_size=2,
            class_labels=labels,
            timesteps=timesteps,
            latents=z,  # the pipeline scales by sigma_max itself
            generator=torch.Generator().manual_seed(3),
            output_type="pt",
        ).images
        ours = (ours / 2 + 0.5).clamp(0, 1)  # the pipeline's images are in [0, 1]
        torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=0)
