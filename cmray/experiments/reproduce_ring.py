"""The reproduction study's 2D suite: the same rows on the tutorial's ring of Gaussians.

The teacher (the ring's EDM MLP) trains here, its epochs doubled until the last quarter of its
training improved its 99-step energy distance by less than ``teacher.tolerance``; the rows are
one Ray Tune grid over named variants of ``configs/toy2d.yaml`` (each a one-worker Ray Train
trial, as a toy search's trials are); every row and the teacher are then scored on the same
noise against the same fresh draws from the true ring: one step, two steps (the ternary search
picking tau on a Karras grid), and the teacher with its own sampler and Heun at 1, 2, 4, 18
points.
"""

from __future__ import annotations

import copy
import dataclasses
import io
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cmray.config import ConfigError, load_config, to_dict
from cmray.core.sampling import (
    sample_edm_heun,
    sample_multistep,
    sample_onestep,
    sample_teacher_ode,
    taus_from_indices,
)
from cmray.core.schedules import karras_sigmas
from cmray.eval.search import greedy_indices
from cmray.eval.toy import TOY_METRIC, over_draws, quality_report
from cmray.experiments.reproduce_config import ReproduceConfig
from cmray.experiments.reproduce_report import add_ratios
from cmray.experiments.study import (
    STUDENTS_RUN,
    converged,
    error_line,
    family_of,
    in_order,
    method_name,
    read_json,
    rows_search,
    timer,
    write_json,
)
from cmray.storage import absolute, write_bytes_atomic
from cmray.train import toy
from cmray.train.toy_config import Toy2DConfig
from cmray.tune.config import VARIANT_KEY, SearchPlan, plan_search

Log = Callable[[str], None]
Sampler = Callable[[torch.Tensor, int], torch.Tensor]  # (noise, draw) -> samples
DRAW_STRIDE = 100  # seed distance between two draws (each draw uses a few offsets)


@dataclass
class RingStudy:
    """A checked ring study: its config, directory, the ring's config and the rows' search."""

    cfg: ReproduceConfig
    out: Path
    toy: Toy2DConfig
    search: SearchPlan
    metric: str = TOY_METRIC
    timings: dict[str, float] = field(default_factory=dict)
    runs: dict[str, str] = field(default_factory=dict)  # each row's Train run, once trained


def plan_ring(cfg: ReproduceConfig) -> RingStudy:
    """Check the ring's config and every row before anything starts."""
    out = Path(absolute(cfg.out))
    base = load_config(Toy2DConfig, cfg.ring.config, cfg.ring.set)
    if base.teacher.objective != "edm":
        raise ConfigError(
            "ring: teacher.objective must be edm (ECT and sCM start from its weights)",
            key="ring.set",
        )
    rows = list(cfg.students.rows)
    search = rows_search(cfg, "toy2d", cfg.ring.config, list(cfg.ring.set), rows, out)
    search.toy.cpus = cfg.ring.cpus
    search.toy.quality_samples = cfg.eval.num_samples
    search.toy.reference_samples = base.eval.reference_samples
    plan = plan_search(search)
    plan.cfg.toy.quality_every = plan.max_t  # scored once, at the end: the search's figure
    return RingStudy(cfg, out, base, plan)


# --------------------------------------------------------------------------- scoring


@dataclass
class Bench:
    """What every sampler of the study is scored on: ``eval.draws`` pairs of noise and fresh
    true-ring draws. Every figure is the mean over the pairs (one draw of 2,000 moves by half
    the teacher's own figure), so the teacher's rule and the table do not read noise."""

    zs: list[torch.Tensor]
    references: list[torch.Tensor]
    ring: Any
    seed: int

    @classmethod
    def of(cls, study: RingStudy) -> Bench:
        seed, ring, e = study.cfg.eval.seed, toy.ring_of(study.toy), study.cfg.eval
        # Draw 0 keeps the single draw's seeds; the others sit DRAW_STRIDE apart.
        seeds = [seed + DRAW_STRIDE * d for d in range(e.draws)]
        references = [
            ring.sample(study.toy.eval.reference_samples, torch.Generator().manual_seed(s + 1))
            for s in seeds
        ]
        zs = [
            torch.randn(e.num_samples, 2, generator=torch.Generator().manual_seed(s)) for s in seeds
        ]
        return cls(zs, references, ring, seed)

    @property
    def z(self) -> torch.Tensor:
        """The first draw's noise: the samples the figures show."""
        return self.zs[0]

    def generator(self, draw: int, offset: int) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed + DRAW_STRIDE * draw + offset)

    def floor(self) -> float:
        """Real against real: fresh draws from the true ring, as many as the samples."""
        return self.score(lambda z, d: self.ring.sample(z.shape[0], self.generator(d, 5)), 0, "")[
            TOY_METRIC
        ]

    def score(self, sample: Sampler, nfe: int, sampler: str) -> dict[str, Any]:
        """``sample(z, draw)``'s samples scored on every draw: means, spreads and the draws."""
        reports = [
            quality_report(sample(z, d), ref, self.ring)
            for d, (z, ref) in enumerate(zip(self.zs, self.references, strict=True))
        ]
        return {"sampler": sampler, "nfe": nfe, **over_draws(reports)}


def teacher_sampler_figure(study: RingStudy, bench: Bench, teacher: torch.nn.Module) -> float:
    """The teacher with its own sampler (the tutorial's 100-point Euler solve, 99 NFE)."""
    return score_teacher(study, bench, teacher, own_only=True)[0][TOY_METRIC]


@torch.no_grad()
def score_teacher(
    study: RingStudy, bench: Bench, teacher: torch.nn.Module, own_only: bool = False
) -> list[dict[str, Any]]:
    t, noise = study.toy.teacher, study.toy.noise
    grid = _own_grid(study)
    name = f"{t.solver.capitalize()}, {t.sampler_steps} points"
    own = bench.score(lambda z, d: sample_teacher_ode(teacher, z, grid, t.solver).x, 0, name)
    results = [{**own, "nfe": t.sampler_steps - 1, "points": t.sampler_steps, "own": True}]
    if own_only:
        return results
    args = (noise.sigma_min, noise.sigma_max, noise.rho)
    for p in study.cfg.ring.heun_points:
        nfe = sample_edm_heun(teacher, bench.z[:1], p, *args).nfe
        plural = "s" if p > 1 else ""
        heun = bench.score(lambda z, d, p=p: sample_edm_heun(teacher, z, p, *args).x, nfe, "")
        results.append({**heun, "sampler": f"Heun, {p} point{plural}", "points": p})
    return results


@torch.no_grad()
def score_student(
    study: RingStudy, bench: Bench, f: torch.nn.Module
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """One step, and two steps with tau found by the greedy ternary search on the figure."""
    noise, N = study.toy.noise, study.cfg.ring.grid
    eps = f.parametrization.sigma_min

    def two_step(indices: tuple[int, ...]) -> Sampler:
        taus = taus_from_indices(indices, N, max(eps, noise.sigma_min), noise.sigma_max, noise.rho)
        return lambda z, d: (
            sample_multistep(f, z, taus, bench.generator(d, 2), eps, noise.sigma_max).x
        )

    found = greedy_indices(lambda k: bench.score(two_step(k), 2, "")[TOY_METRIC], N, 2)
    one = bench.score(lambda z, d: sample_onestep(f, z, noise.sigma_max).x, 1, "1-step")
    results = [one, bench.score(two_step(found.indices), 2, "2-step")]
    results[1]["indices"] = list(found.indices)
    search = {
        "N": N,
        "evaluated": [{"indices": list(k), TOY_METRIC: v} for k, v in found.evaluated.items()],
        "chosen": list(found.indices),
    }
    return results, search


# --------------------------------------------------------------------------- the phases


def train_ring_teacher(study: RingStudy, log: Log) -> dict[str, Any]:
    """Train the teacher, its epochs doubled (each run afresh) until the last quarter of training
    improved its own sampler's figure (the mean over the draws) by less than the tolerance, or a
    doubled run ended no better than the run before it, which then stays the teacher; saved
    where the rows' trials read it."""
    path = study.out / "teacher" / "curve.json"
    state = read_json(path)
    if state is not None and Path(study.search.teacher_path).is_file():
        return state
    bench, epochs = Bench.of(study), study.toy.teacher.optim.epochs
    best: tuple[list[dict[str, float]], torch.nn.Module, int] | None = None
    while True:
        curve, teacher = _teacher_run(study, bench, epochs, log)
        if best is not None and curve[-1][TOY_METRIC] >= best[0][-1][TOY_METRIC]:
            # A longer run, trained afresh, that ends no better: the shorter one had levelled
            # off; it stays the teacher.
            log(f"teacher: {epochs} epochs ended no better; keeping {best[2]} epochs")
            curve, teacher, epochs = best
            done = True
            break
        best = (curve, teacher, epochs)
        done = converged(curve, study.cfg.teacher.tolerance, TOY_METRIC)
        if done or 2 * epochs > study.cfg.ring.teacher_max_epochs:
            break
        log(f"teacher: still improving at {epochs} epochs; training {2 * epochs} afresh")
        epochs *= 2
    buffer = io.BytesIO()
    torch.save(teacher.state_dict(), buffer)
    write_bytes_atomic(study.search.teacher_path, buffer.getvalue())
    state = {"curve": curve, "converged": bool(done), "epochs": epochs}
    write_json(path, state)
    return state


def _teacher_run(
    study: RingStudy, bench: Bench, epochs: int, log: Log
) -> tuple[list[dict[str, float]], torch.nn.Module]:
    """One teacher trained for ``epochs``, measured at three quarters of its steps and at the
    end (on the rows' noise and reference draws)."""
    optim = dataclasses.replace(study.toy.teacher.optim, epochs=epochs)
    teacher_cfg = dataclasses.replace(study.toy.teacher, optim=optim)
    cfg = dataclasses.replace(study.toy, teacher=teacher_cfg)
    data, generator = toy.training_data(cfg)
    steps = toy.total_steps(data.shape[0], optim)
    snapshot: list[torch.nn.Module] = []

    def keep(step: int, D: torch.nn.Module) -> None:
        if step + 1 == 3 * steps // 4:
            snapshot.append(copy.deepcopy(D).eval().requires_grad_(False))

    torch.manual_seed(cfg.seed)  # the network's initialisation, as the 2D experiment's
    teacher = toy.train_teacher(cfg, data, generator, None, keep)
    curve = [
        {"step": 3 * steps // 4, TOY_METRIC: teacher_sampler_figure(study, bench, snapshot[0])},
        {"step": steps, TOY_METRIC: teacher_sampler_figure(study, bench, teacher)},
    ]
    log(f"teacher: {epochs} epochs: {TOY_METRIC} {curve[0][TOY_METRIC]:.4f} at 3/4, "
        f"{curve[1][TOY_METRIC]:.4f} at the end")  # fmt: skip
    return curve, teacher


def row_method(study: RingStudy, name: str) -> str:
    """cd, ct, ict, ect, sct or scd: what a row trains."""
    method = study.search.cfg.trial_settings({VARIANT_KEY: name}).method
    curriculum = study.search.trial_config({VARIANT_KEY: name}).ct.curriculum
    return method_name(method, curriculum=curriculum)


def load_row(study: RingStudy, name: str, trial: str, teacher: torch.nn.Module) -> torch.nn.Module:
    """A finished row's sampling network, from its trial's newest checkpoint."""
    from cmray.train.worker import STUDENT_FILE

    run = Path(study.search.trial_run_key(trial))
    newest = max(run.glob(f"checkpoint_*/{STUDENT_FILE}"), key=lambda p: p.parent.name)
    settings = study.search.trial_config({VARIANT_KEY: name})
    method = study.search.cfg.trial_settings({VARIANT_KEY: name}).method
    data, _ = toy.training_data(settings)
    student = toy.Student(settings, method, data, teacher if method != "ct" else None)
    student.load_state_dict(torch.load(newest, weights_only=True))
    return student.sampler.eval().requires_grad_(False)


def score_row(
    study: RingStudy, bench: Bench, row: dict[str, Any], teacher: torch.nn.Module
) -> tuple[dict[str, Any], torch.Tensor | None]:
    """A row's entry (one and two steps, or why it failed) and its one-step samples."""
    name = row[VARIANT_KEY]
    method = row_method(study, name)
    entry = {"name": name, "trial": row["trial"], "status": row["status"], "method": method}
    entry["family"] = family_of(method)
    if row["status"] == "error":
        return {**entry, "error": error_line(study.out / STUDENTS_RUN, row["trial"])}, None
    f = load_row(study, name, row["trial"], teacher)
    results, search = score_student(study, bench, f)
    one = sample_onestep(f, bench.z, study.toy.noise.sigma_max).x
    return {**entry, "results": results, "search": search}, one


def assemble(
    study: RingStudy,
    teacher: dict[str, Any],
    teacher_results: list[dict[str, Any]],
    rows: list[dict[str, Any]],
) -> dict[str, Any]:
    """results.json's content, in the digits suite's shape."""
    for entry in teacher_results:
        entry["baseline"] = bool(entry.get("own"))
    base = study.search.trial_config({VARIANT_KEY: rows[0]["name"]})
    method = study.search.cfg.trial_settings({VARIANT_KEY: rows[0]["name"]}).method
    optim = toy.student_settings(base, method).optim
    steps = toy.total_steps(base.ring.train_points, optim)
    results = {
        "suite": "ring",
        "metric": TOY_METRIC,
        "study": to_dict(study.cfg),
        "timings_s": study.timings,
        "floor": Bench.of(study).floor(),
        "floor_name": "Draws from the true ring",
        "budget_line": (
            f"Every row: {steps} steps of {optim.batch_size} points ({optim.epochs} epochs of "
            f"{base.ring.train_points}); the teacher: {teacher['epochs']} epochs."
        ),
        "teacher": {**teacher, "results": teacher_results},
        "rows": rows,
    }
    return add_ratios(results)


def scatter_figure(study: RingStudy, panels: dict[str, torch.Tensor], path: Path) -> Path:
    """Each row's one-step samples over the true ring, beside the teacher's (same noise)."""
    from cmray.eval.plots import plot_samples

    ring, cfg = toy.ring_of(study.toy), study.toy
    data = ring.sample(2000, torch.Generator().manual_seed(cfg.seed + 4))
    lim = 1.6 * (cfg.ring.radius + 3 * cfg.ring.std)
    return plot_samples(data, panels, lim, path, cols=4)


def run_ring_study(cfg: ReproduceConfig, log: Log = print) -> dict[str, Any]:
    """The ring suite's phases in order; returns what ``results.json`` holds."""
    from cmray.cluster import ray_init
    from cmray.experiments import reproduce_report as report
    from cmray.tune.search import run_search

    study = plan_ring(cfg)  # every config mistake surfaces before anything starts
    study.out.mkdir(parents=True, exist_ok=True)
    timed = timer(study.timings, study.out / "timings.json", log)
    state = timed("teacher", lambda: train_ring_teacher(study, log))
    ray_init()
    parent = report.open_parent(study)
    rows = timed("students", lambda: run_search(study.search, log).rows)
    study.runs = {r[VARIANT_KEY]: study.search.trial_run_key(r["trial"]) for r in rows}
    panels, scored, teacher_results = timed("scoring", lambda: _score_all(study, rows, log))
    results = assemble(study, state, teacher_results, scored)
    paths = report.write_all(study, results, lambda p: scatter_figure(study, panels, p), log)
    report.close_parent(study, parent, results, paths)
    return results


def _score_all(
    study: RingStudy, rows: list[dict[str, Any]], log: Log
) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]], list[dict[str, Any]]]:
    """The teacher's and every row's figures on the same noise, and the one-step samples."""
    from cmray.train.worker import _toy_teacher

    teacher = _toy_teacher(study.toy, study.search.teacher_path)
    bench = Bench.of(study)
    # Each score is a mean over several draws, so the whole phase takes minutes: say where it is.
    log(f"scoring the teacher over {len(bench.zs)} draws")
    teacher_results = score_teacher(study, bench, teacher)
    own = sample_teacher_ode(teacher, bench.z, _own_grid(study), study.toy.teacher.solver).x
    panels, scored = {"teacher": own}, []
    for row in in_order([r.name for r in study.cfg.students.rows], rows):
        log(f"scoring {row[VARIANT_KEY]}")
        entry, one = score_row(study, bench, row, teacher)
        scored.append(entry)
        if one is not None:
            panels[f"{entry['name']}, 1 step"] = one
    return panels, scored, teacher_results


def _own_grid(study: RingStudy) -> torch.Tensor:
    t, noise = study.toy.teacher, study.toy.noise
    return karras_sigmas(t.sampler_steps, noise.sigma_min, noise.sigma_max, noise.rho)
