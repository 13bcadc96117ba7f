"""The tutorial's 2D experiment (Sec. 4) end to end: train, sample, score, plot, save.

Teacher (100-point PF-ODE solve, 99 NFE), CD student (1 and 2 steps), CT student (1 step), and
the successors tuned from the teacher, ECT and sCT (1 step each), all scored on the same number of
samples against fresh draws from the true ring mixture.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from cmray.config import save_config, to_dict
from cmray.core.parametrization import ConsistencyFunction
from cmray.core.sampling import sample_multistep, sample_onestep, sample_teacher_ode
from cmray.core.schedules import karras_sigmas
from cmray.eval import plots
from cmray.eval.toy import evaluate_sampler, format_table, over_draws
from cmray.train import toy
from cmray.train.toy_config import Toy2DConfig

Log = Callable[[str], None]
MODELS_FILE = "models.pt"


@dataclass
class ToyModels:
    """The trained networks of a run (CD/CT students as their EMA target, used for sampling)."""

    teacher: torch.nn.Module
    cd: ConsistencyFunction
    ct: ConsistencyFunction
    ect: ConsistencyFunction
    sct: ConsistencyFunction


NAMES = ("teacher", "cd", "ct", "ect", "sct")


def train_all(cfg: Toy2DConfig, log: Log | None = None) -> ToyModels:
    """Teacher, then CD from it, CT from data alone, ECT and sCT tuned from the teacher's
    weights; one generator seeds them all."""
    teacher, data, generator = toy.train_run_teacher(cfg, log)
    _, cd = toy.train_cd(cfg, data, teacher, generator, log)
    _, ct = toy.train_ct(cfg, data, generator, log)
    ect = toy.train_ect(cfg, data, teacher, generator, log)
    sct = toy.train_sct(cfg, data, teacher, generator, log)
    return ToyModels(teacher, cd, ct, ect, sct)


def samplers(cfg: Toy2DConfig, models: ToyModels, z: torch.Tensor) -> dict[str, Callable]:
    """Name -> zero-argument sampler over the same initial noise z."""
    noise, T = cfg.noise, cfg.noise.sigma_max
    grid = karras_sigmas(cfg.teacher.sampler_steps, noise.sigma_min, T, noise.rho)
    steps = cfg.teacher.sampler_steps - 1
    tau = [cfg.eval.two_step_tau]
    return {
        f"teacher ({cfg.teacher.solver}, {steps} steps)": lambda: sample_teacher_ode(
            models.teacher, z, grid, cfg.teacher.solver
        ),
        "CD, 1 step": lambda: sample_onestep(models.cd, z, T),
        "CD, 2 steps": lambda: sample_multistep(
            models.cd, z, tau, torch.Generator().manual_seed(cfg.seed + 2), noise.sigma_min, T
        ),
        "CT, 1 step": lambda: sample_onestep(models.ct, z, T),
        "ECT, 1 step": lambda: sample_onestep(models.ect, z, T),
        "sCT, 1 step": lambda: sample_onestep(models.sct, z, T),
    }


def evaluate(
    cfg: Toy2DConfig, models: ToyModels, repeats: int = 5
) -> tuple[list[dict], dict[str, torch.Tensor]]:
    """Score every sampler on ``eval.draws`` draws of noise and reference (the same for every
    sampler): each figure is the mean over the draws, with its standard deviation beside it;
    wall time is the median on the first draw, whose samples the figures show."""
    ring = toy.ring_of(cfg)
    per_draw: dict[str, list[dict]] = {}
    samples: dict[str, torch.Tensor] = {}
    for d in range(cfg.eval.draws):
        # Draw 0 keeps the seeds of the single-draw table that came before.
        seed = cfg.seed + 10 * d
        reference = ring.sample(cfg.eval.reference_samples, torch.Generator().manual_seed(seed + 1))
        z = torch.randn(cfg.eval.num_samples, 2, generator=torch.Generator().manual_seed(seed + 3))
        for name, sample in samplers(cfg, models, z).items():
            entry, x = evaluate_sampler(name, sample, reference, ring, repeats if d == 0 else 0)
            per_draw.setdefault(name, []).append(entry)
            samples.setdefault(name, x)
    return [over_draws(entries) for entries in per_draw.values()], samples


def write_figures(cfg: Toy2DConfig, models: ToyModels, samples: dict, out: Path) -> list[Path]:
    """Figs. 7-10 of the tutorial as PNGs."""
    ring, T = toy.ring_of(cfg), cfg.noise.sigma_max
    data = ring.sample(2000, torch.Generator().manual_seed(cfg.seed + 4))
    lim = 1.6 * (cfg.ring.radius + 3 * cfg.ring.std)
    z = torch.randn(cfg.eval.trajectories, 2, generator=torch.Generator().manual_seed(cfg.seed + 5))
    path: list[torch.Tensor] = []
    grid = karras_sigmas(cfg.teacher.sampler_steps, cfg.noise.sigma_min, T, cfg.noise.rho)
    sample_teacher_ode(models.teacher, z, grid, cfg.teacher.solver, trajectory=path)
    mapped = sample_onestep(models.cd, z, T).x
    return [
        plots.plot_trajectories(path, data, lim, out / "fig7_teacher_trajectories.png"),
        plots.plot_onestep_mapping(
            T * z, mapped, data, lim, T, out / "fig9_cd_onestep_mapping.png"
        ),
        plots.plot_samples(data, samples, lim, out / "fig8_10_samples_vs_data.png"),
    ]


def save_models(models: ToyModels, path: Path) -> None:
    """State dicts of the networks, written atomically."""
    state = {k: getattr(models, k).state_dict() for k in NAMES}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    os.close(fd)
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_models(cfg: Toy2DConfig, path: Path) -> ToyModels:
    """Rebuild the networks from the config and load a ``save_models`` file (weights only)."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    teacher = toy.make_teacher(cfg)
    models = ToyModels(
        teacher=teacher,
        cd=toy.make_consistency_net(cfg.cd.parametrization, cfg.cd.net, cfg),
        ct=toy.make_consistency_net(cfg.ct.parametrization, cfg.ct.net, cfg),
        ect=toy.tuned_student(teacher),
        sct=toy.tuned_student(teacher, weight=True),
    )
    for name in NAMES:
        getattr(models, name).load_state_dict(state[name])
        getattr(models, name).eval().requires_grad_(False)
    return models


def run(cfg: Toy2DConfig, out: Path, log: Log = print) -> list[dict]:
    """Train, evaluate, write results.json, figures, models and the resolved config into out."""
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    models = train_all(cfg, log)
    save_models(models, out / MODELS_FILE)
    entries, samples = evaluate(cfg, models)
    log(format_table(entries))
    results = {"config": to_dict(cfg), "num_samples": cfg.eval.num_samples, "entries": entries}
    (out / "results.json").write_text(json.dumps(results, indent=2))
    for figure in write_figures(cfg, models, samples, out):
        log(f"wrote {figure}")
    return entries
