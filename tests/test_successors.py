"""ECT and sCM (TrigFlow): the math against what it must equal, and training like CD/CT."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest
import torch

from cmray.core import losses, trigflow
from cmray.core.parametrization import ConsistencyFunction, Parametrization
from cmray.nets.unet import UNet, UNetConfig
from cmray.nets.weighting import AdaptiveWeight

SD = 0.5


def small_unet(seed: int = 0, dtype: torch.dtype = torch.float64, dropout: float = 0.0) -> UNet:
    """A U-Net with attention and every weight random (a fresh one outputs exactly zero)."""
    cfg = UNetConfig(
        resolution=8,
        model_channels=32,
        channel_mult=[1, 2],
        attention_resolutions=[4],
        num_res_blocks=1,
        num_head_channels=32,
        dropout=dropout,
    )
    torch.manual_seed(seed)
    net = UNet(cfg).to(dtype)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.05)
    return net


def edm_denoiser(net: torch.nn.Module, logvar: bool = False) -> ConsistencyFunction:
    weight = AdaptiveWeight().double() if logvar else None
    return ConsistencyFunction(net, Parametrization("edm", SD, 0.0, 80.0), weight)


# ------------------------------------------------------------------------------------ ECT


def test_ect_r_reaches_t_as_the_stage_grows_and_is_zero_for_small_t() -> None:
    t = torch.tensor([0.01, 0.5, 2.0, 40.0], dtype=torch.float64)
    gaps = [(t - losses.ect_r(t, s)).max().item() for s in range(8)]
    assert all(b < a for a, b in itertools.pairwise(gaps)), gaps
    assert gaps[-1] < 40.0 * 4.0**-8 * 9 + 1e-12  # |t - r| <= t q^-(s+1) (1 + k)
    # Stage 0, q = 4: n(t) > 4 below t ~ 0.69, so r clamps to 0 there.
    assert losses.ect_r(t, 0)[0] == 0 and losses.ect_r(t, 0)[-1] > 0


def test_ect_target_is_x0_exactly_where_r_is_zero() -> None:
    x0, z = torch.randn(4, 2), torch.randn(4, 2)
    r = torch.tensor([0.0, 0.3, 0.0, 1.2])

    def not_a_boundary(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return x + 1.0  # any f; the target must not consult it at r = 0

    target = losses.ect_target(not_a_boundary, x0, z, r)
    assert torch.equal(target[[0, 2]], x0[[0, 2]])
    assert torch.equal(target[[1, 3]], (x0 + r[:, None] * z + 1.0)[[1, 3]])


def test_ect_loss_of_an_exact_consistency_function_goes_to_zero_with_the_stage() -> None:
    """For Gaussian data N(0, sigma_d^2) the PF ODE's solution is f(x, t) = sigma_d x /
    sqrt(sigma_d^2 + t^2); with one z, x_t and x_r lie on one trajectory only as r -> t."""

    def exact(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return SD * x / torch.sqrt(SD**2 + t[:, None] ** 2)

    g = torch.Generator().manual_seed(0)
    x0, z = (
        SD * torch.randn(512, 2, generator=g, dtype=torch.float64),
        torch.randn(512, 2, generator=g, dtype=torch.float64),
    )
    t = losses.edm_sigma(512, -1.1, 2.0, g)
    means = [
        losses.ect_loss(exact, exact, x0, z, t, losses.ect_r(t, s), 0.0, SD).mean().item()
        for s in range(10)
    ]
    assert all(b < a for a, b in itertools.pairwise(means)), means
    assert means[-1] < 1e-4 * means[0], means


# ------------------------------------------------------------------------------------ sCM


def test_an_edm_denoiser_read_in_trigflow_returns_the_same_x0() -> None:
    D = edm_denoiser(small_unet())
    x_sigma = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    sigma = torch.tensor([0.01, 0.7, 30.0], dtype=torch.float64)
    t = trigflow.time_of(sigma, SD)
    x_t = torch.cos(t)[:, None, None, None] * x_sigma
    F, logvar = D(x_t, t, trigflow=True)
    assert logvar is None
    torch.testing.assert_close(
        trigflow.f_trigflow(x_t, t, F, SD), D(x_sigma, sigma), rtol=1e-10, atol=1e-12
    )
    torch.testing.assert_close(trigflow.sigma_of(t, SD), sigma, rtol=1e-12, atol=0)


def test_the_jvp_equals_a_central_difference_along_the_trajectory() -> None:
    D = edm_denoiser(small_unet())
    x_t = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    t = torch.tensor([0.3, 1.2], dtype=torch.float64)
    v_x, v_t = torch.randn_like(x_t), torch.tensor([0.4, -0.2], dtype=torch.float64)

    def F(x: torch.Tensor, time: torch.Tensor) -> torch.Tensor:
        return D(x, time, trigflow=True)[0]

    def relative(a: torch.Tensor, b: torch.Tensor) -> float:
        return ((a - b).norm() / b.norm()).item()

    h = 1e-6
    reference = (F(x_t + h * v_x, t + h * v_t) - F(x_t - h * v_x, t - h * v_t)) / (2 * h)
    jvp = trigflow.directional_derivative(F, x_t, t, v_x, v_t, "jvp")
    assert relative(jvp, reference) < 1e-6
    # The finite-difference fallback, at the config's default step, approximates it.
    fd = trigflow.directional_derivative(F, x_t, t, v_x, v_t, "fd", eps=1e-4)
    assert relative(fd, jvp) < 1e-3, relative(fd, jvp)


def test_the_sct_gradient_is_the_limit_of_the_discrete_ct_gradient_over_the_step() -> None:
    """With normalisation and weighting off, d/dtheta of the sCT loss is the limit of the
    discrete CT loss's gradient over its step: grad_CT(dt) / dt -> sigma_d tan t grad_sCT."""
    D = edm_denoiser(small_unet(seed=1))
    g = torch.Generator().manual_seed(0)
    x0 = 0.5 * torch.randn(1, 3, 8, 8, generator=g, dtype=torch.float64)
    z = SD * torch.randn(1, 3, 8, 8, generator=g, dtype=torch.float64)
    t = torch.tensor([0.7], dtype=torch.float64)
    params = list(D.parameters())

    def flat_grad(loss: torch.Tensor) -> torch.Tensor:
        grads = torch.autograd.grad(loss.sum(), params, allow_unused=True)
        return torch.cat(
            [
                (gr if gr is not None else torch.zeros_like(p)).flatten()
                for gr, p in zip(grads, params, strict=True)
            ]
        )

    x = trigflow.x_t(x0, z, t)
    dxdt = trigflow.velocity(x0, z, t)
    F, _ = D(x, t, trigflow=True)
    v = torch.cos(t) * torch.sin(t)

    def F_minus(xx: torch.Tensor, tt: torch.Tensor) -> torch.Tensor:
        return D(xx, tt, trigflow=True)[0]

    with torch.no_grad():
        jvp = trigflow.directional_derivative(F_minus, x, t, v[:, None, None, None] * dxdt, v)
    tangent = trigflow.tangent(F.detach(), jvp, x, dxdt, t, SD, r=1.0)
    continuous = flat_grad(trigflow.scm_loss(F, F.detach(), tangent)) * SD * torch.tan(t)

    def f(xx: torch.Tensor, tt: torch.Tensor) -> torch.Tensor:
        return trigflow.f_trigflow(xx, tt, D(xx, tt, trigflow=True)[0], SD)

    errors = []
    for dt in (1e-4, 1e-5):  # first order in dt: the error shrinks tenfold
        with torch.no_grad():
            target = f(trigflow.x_t(x0, z, t - dt), t - dt)
        discrete = flat_grad(((f(x, t) - target) ** 2).mean(dim=(1, 2, 3))) / dt
        errors.append(((discrete - continuous).norm() / continuous.norm()).item())
    assert errors[1] < errors[0] / 5 and errors[1] < 1e-3, errors


def test_the_tangent_is_cos_t_times_the_drift_of_f_and_normalises_per_sample() -> None:
    g = torch.randn(3, 2, 4, 4)
    n = trigflow.normalize_tangent(g, 0.1)
    norms = n.reshape(3, -1).norm(dim=1)
    torch.testing.assert_close(
        norms, g.reshape(3, -1).norm(dim=1) / (g.reshape(3, -1).norm(dim=1) + 0.1)
    )
    assert trigflow.tangent_warmup(0, 100) == 0 and trigflow.tangent_warmup(50, 100) == 0.5
    assert trigflow.tangent_warmup(500, 100) == 1 and trigflow.tangent_warmup(3, 0) == 1


def test_the_adaptive_weight_starts_at_one_and_enters_as_exp_minus_w_plus_w() -> None:
    F, Fm, g = torch.randn(2, 4), torch.zeros(2, 4), torch.zeros(2, 4)
    w = AdaptiveWeight()(torch.tensor([1.0, -300.0]))
    assert torch.equal(w, torch.zeros(2))
    plain = trigflow.scm_loss(F, Fm, g)
    torch.testing.assert_close(
        trigflow.scm_loss(F, Fm, g, torch.full((2,), 0.5)), plain * math.exp(-0.5) + 0.5
    )


def test_a_trigflow_two_step_equals_algorithm_1_at_sigma_d_tan_t_mid_without_eps() -> None:
    """TrigFlow's step to t_mid, cos(t) x + sin(t) sigma_d z', is Algorithm 1's x + sigma z' at
    sigma = sigma_d tan t_mid seen through x_sigma = x_t / cos t (eps = 0)."""
    from cmray.core.sampling import sample_multistep

    D = edm_denoiser(small_unet())
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    zp = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    t_mid = torch.full((2,), trigflow.T_MID, dtype=torch.float64)
    x_t = (
        torch.cos(t_mid)[:, None, None, None] * x + torch.sin(t_mid)[:, None, None, None] * SD * zp
    )
    trig = trigflow.f_trigflow(x_t, t_mid, D(x_t, t_mid, trigflow=True)[0], SD)
    tau = trigflow.sigma_of(trigflow.T_MID, SD)

    def first_is_x(xx: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        return x if s[0] == 80.0 else D(xx, s)

    edm = sample_multistep(first_is_x, x, [tau], torch.Generator().manual_seed(5), 0.0, 80.0).x
    torch.testing.assert_close(edm, trig, rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------------------- training

KINDS = {
    "ect": {"kind": "ect"},
    "sct": {"kind": "scm", "mode": "ct"},
    "scd": {"kind": "scm", "mode": "cd"},
}


@pytest.fixture(scope="module")
def edm_file(digits16: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """An EDM model file with random (non-zero) weights for the students to start from."""
    from test_train import tiny_config

    from cmray.models import ModelConfig, build_model, write_model_file

    cfg = tiny_config(digits16)
    teacher = ModelConfig(kind="edm", net=cfg.net, noise=cfg.objective.noise)
    torch.manual_seed(3)
    model = build_model(teacher)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    path = tmp_path_factory.mktemp("edm") / "edm.pt"
    write_model_file(path, teacher, model.state_dict())
    return str(path)


def successor_config(digits16: str, edm_file: str, name: str, **loop: object):
    from test_train import tiny_config

    cfg = tiny_config(digits16, **loop)
    spec = KINDS[name]
    cfg.objective.kind = spec["kind"]
    cfg.objective.ect.init = edm_file
    cfg.objective.scm.mode = spec.get("mode", "ct")
    cfg.objective.scm.init = edm_file if name == "sct" else ""  # scd: the teacher by default
    cfg.objective.scm.teacher = edm_file if spec.get("mode") == "cd" else ""
    cfg.objective.scm.tangent_warmup = 4
    return cfg


@pytest.mark.parametrize("name", list(KINDS))
def test_resume_equals_uninterrupted_bit_for_bit(
    digits16: str, edm_file: str, tmp_path: Path, name: str
) -> None:
    from test_train import losses_of

    from cmray.train import state as ckpt

    torch.set_num_threads(1)
    cfg = successor_config(digits16, edm_file, name, steps=6)
    straight = losses_of(cfg, tmp_path / "straight")
    losses_of(cfg, tmp_path / "resumed", crash_at=4)
    assert ckpt.latest_checkpoint(tmp_path / "resumed" / "checkpoints").name == "step-000000003"
    after = losses_of(cfg, tmp_path / "resumed")
    assert sorted(after) == [4, 5, 6] and all(after[k] == straight[k] for k in after)
    assert all(math.isfinite(v) for v in straight.values()) and len(set(straight.values())) == 6


@pytest.mark.parametrize("name", ["ect", "sct", "scd"])
def test_the_student_starts_from_the_diffusion_model_and_keeps_no_target(
    digits16: str, edm_file: str, name: str
) -> None:
    from cmray.models import load_model
    from cmray.train.loop import build_trainer

    trainer = build_trainer(successor_config(digits16, edm_file, name), torch.device("cpu"))
    teacher, _ = load_model(edm_file)
    for key, value in teacher.net.state_dict().items():
        assert torch.equal(trainer.state.online.net.state_dict()[key], value), key
    assert trainer.state.target is None
    x, sigma = torch.randn(2, 3, 16, 16), torch.tensor([0.3, 5.0])
    with torch.no_grad():  # f = D at the start: the EDM scalings, f(x, 0) = x
        torch.testing.assert_close(trainer.state.online.eval()(x, sigma), teacher(x, sigma))
        assert torch.equal(trainer.state.online(x, torch.zeros(2)), x)
    has_weight = trainer.state.online.logvar is not None
    assert has_weight == name.startswith("sc")


@pytest.mark.parametrize("name", ["ect", "sct", "scd"])
def test_bf16_microbatches_step_and_the_nan_guard_skips(
    digits16: str, edm_file: str, name: str
) -> None:
    from cmray.train.loop import batch_draws, build_trainer
    from cmray.train.step import NonFiniteLossError, train_step

    torch.set_num_threads(1)
    cfg = successor_config(
        digits16, edm_file, name, precision="bf16", microbatch=4, nonfinite_limit=2
    )
    trainer = build_trainer(cfg, torch.device("cpu"))
    state = trainer.state
    x0 = torch.rand(8, 3, 16, 16) * 2 - 1
    draws = batch_draws(trainer, len(x0))
    result = train_step(state, trainer.objective, x0, cfg.loop, cfg.optim, draws)
    assert result.finite and result.grad_norm > 0 and state.step == 1
    before = {k: v.clone() for k, v in state.online.state_dict().items()}
    nan = torch.full_like(x0, float("nan"))
    assert not train_step(state, trainer.objective, nan, cfg.loop, cfg.optim, draws).finite
    assert all(torch.equal(before[k], v) for k, v in state.online.state_dict().items())
    with pytest.raises(NonFiniteLossError):
        train_step(state, trainer.objective, nan, cfg.loop, cfg.optim, draws)


def test_a_missing_init_is_a_config_error_naming_the_key(digits16: str, tmp_path: Path) -> None:
    from test_train import tiny_config

    from cmray.config import ConfigError
    from cmray.train.worker import preflight

    cfg = tiny_config(digits16)
    with pytest.raises(ConfigError, match=r"objective\.ect\.init is empty"):
        cfg.objective.kind = "ect"
        cfg.objective.__post_init__()
    cfg.objective.ect.init = str(tmp_path / "missing.pt")
    with pytest.raises(ConfigError, match=r"objective\.ect\.init: no model file at"):
        preflight(cfg)
    cfg.objective.kind, cfg.objective.scm.mode = "scm", "cd"
    with pytest.raises(ConfigError, match=r"objective\.scm\.teacher is empty"):
        cfg.objective.__post_init__()


@pytest.mark.parametrize("name", ["ect", "sct"])
def test_the_model_file_knows_its_kind_and_samples_in_one_and_two_steps(
    digits16: str, edm_file: str, tmp_path: Path, name: str, capsys: pytest.CaptureFixture
) -> None:
    from cmray.cli import _two_step_taus, main
    from cmray.models import load_model
    from cmray.models.diffusers import export_diffusers
    from cmray.models.files import ModelSourceError
    from cmray.train.loop import build_trainer, save_model_file

    trainer = build_trainer(successor_config(digits16, edm_file, name), torch.device("cpu"))
    path = save_model_file(trainer, tmp_path / "model.pt")
    model, cfg = load_model(str(path))
    assert cfg.kind == KINDS[name]["kind"] and cfg.boundary == 0.0 and cfg.N == 40
    assert (model.logvar is not None) == (name == "sct")  # w_phi travels with an sCM model
    x, sigma = torch.randn(2, 3, 16, 16), torch.tensor([0.5, 20.0])
    with torch.no_grad():
        torch.testing.assert_close(model(x, sigma), trainer.state.ema.copies[0].eval()(x, sigma))
    expected = SD * math.tan(1.1) if name == "sct" else 0.821
    assert _two_step_taus(cfg) == pytest.approx([expected])
    for steps in ("1", "2"):
        out = tmp_path / f"s{steps}.png"
        assert (
            main(
                ["sample", "--model", str(path), "--num", "4", "--steps", steps, "--out", str(out)]
            )
            == 0
        )
        assert out.is_file() and f"({steps} NFE each)" in capsys.readouterr().out
    with pytest.raises(ModelSourceError, match=r"accepted kinds: cd, ct"):
        export_diffusers(str(path), tmp_path / "pipe")


def _ddp_rank(rank: int, world: int, port: int, configs: dict, out: str) -> None:
    """One DDP rank (gloo) training each config two steps on its own batch; saves its weights."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from cmray.config import from_dict
    from cmray.train.config import TrainConfig
    from cmray.train.loop import batch_draws, build_trainer
    from cmray.train.state import unwrap
    from cmray.train.step import train_step

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    for name, spec in configs.items():
        cfg = from_dict(TrainConfig, spec)
        trainer = build_trainer(cfg, torch.device("cpu"), rank, world, wrap=DistributedDataParallel)
        x0 = torch.rand(8, 3, 16, 16, generator=torch.Generator().manual_seed(rank)) * 2 - 1
        for _ in range(2):
            args = (trainer.objective, x0, cfg.loop, cfg.optim, batch_draws(trainer, len(x0)))
            assert train_step(trainer.state, *args).finite
        torch.save(unwrap(trainer.state.online).state_dict(), Path(out) / f"{name}-{rank}.pt")
    dist.destroy_process_group()


def test_ddp_ranks_stay_identical_including_the_adaptive_weight(
    digits16: str, edm_file: str, tmp_path: Path
) -> None:
    """Two gloo ranks on different batches: DDP averages every gradient (sCM's w_phi too, which
    the online call returns through DDP's forward), so the ranks' weights stay equal."""
    from helpers import free_port

    from cmray.config import to_dict

    configs = {name: to_dict(successor_config(digits16, edm_file, name)) for name in ("ect", "sct")}
    torch.multiprocessing.spawn(_ddp_rank, (2, free_port(), configs, str(tmp_path)), nprocs=2)
    for name in configs:
        a, b = (torch.load(tmp_path / f"{name}-{r}.pt", weights_only=True) for r in (0, 1))
        assert all(torch.equal(a[k], b[k]) for k in a), name
    weight = torch.load(tmp_path / "sct-0.pt", weights_only=True)["logvar.linear.weight"]
    assert weight.abs().sum() > 0  # w_phi trained from its zero start


def test_the_init_must_have_the_students_shape_but_may_train_with_other_dropout(
    digits16: str, edm_file: str
) -> None:
    from cmray.train.loop import build_trainer

    cfg = successor_config(digits16, edm_file, "ect")
    cfg.net.dropout = 0.3  # the file's is 0.1: fine
    build_trainer(cfg, torch.device("cpu"))
    cfg.net.channel_mult = [1, 1]
    with pytest.raises(ValueError, match=r"differs in \{'channel_mult': \[1, 1\]\}"):
        build_trainer(cfg, torch.device("cpu"))


def test_the_init_must_take_the_students_time_input(digits16: str, edm_file: str) -> None:
    """Weights trained on c_noise = 250 ln sigma read another scale as another input: a student
    set to another scale than the model it starts from is refused, naming both."""
    from cmray.train.loop import build_trainer

    cfg = successor_config(digits16, edm_file, "sct")
    cfg.objective.noise.c_noise_scale = 0.25
    with pytest.raises(ValueError, match=r"time input 250 ln sigma.*c_noise_scale = 0\.25"):
        build_trainer(cfg, torch.device("cpu"))


def test_ect_stages_end_at_the_final_gap_and_the_gap_weight_divides_by_t_minus_r() -> None:
    """Eight stages over the run (the last held past its end), and w = 1 / (t - r) on the l2
    norm: locuslab/ect's main-branch loss, ||f(x_t, t) - f(x_r, r)|| / (t - r)."""
    from cmray.train.config import ECTConfig
    from cmray.train.objectives import ect_stage

    cfg = ECTConfig(init="x")
    assert [ect_stage(cfg, k, 400) for k in (0, 49, 50, 399, 10_000)] == [0, 0, 1, 7, 7]
    assert ect_stage(ECTConfig(init="x", stage_steps=10), 10_000, 400) == 7
    x0, z = torch.randn(3, 2, dtype=torch.float64), torch.randn(3, 2, dtype=torch.float64)
    t = torch.tensor([0.3, 1.0, 5.0], dtype=torch.float64)
    r = losses.ect_r(t, 3, q=2.0)

    def f(x: torch.Tensor, time: torch.Tensor) -> torch.Tensor:
        return x * (1 + time[:, None])

    got = losses.ect_loss(f, f, x0, z, t, r, 0.0, SD, weighting="gap")
    expected = (f(x0 + t[:, None] * z, t) - f(x0 + r[:, None] * z, r)).norm(dim=1) / (t - r)
    torch.testing.assert_close(got, expected)
