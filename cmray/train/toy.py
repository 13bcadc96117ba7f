"""Training loops of the 2D experiment (tutorial Sec. 4): diffusion teacher, CD and CT students.

Plain PyTorch on one device, no Ray: the toy runs whole in a few minutes on a CPU. Every random
draw comes from the generator passed in, so a run is a function of its seed.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Callable, Iterator

import torch
from torch import nn

from cmray.core import ema, losses, metrics, schedules
from cmray.core.parametrization import ConsistencyFunction, Parametrization, ScoreDenoiser
from cmray.core.solvers import Denoiser
from cmray.data.toy import RingMixture
from cmray.nets.toy_mlp import ToyMLP
from cmray.nets.weighting import AdaptiveWeight
from cmray.train.curriculum import ct_curriculum, ct_indices
from cmray.train.objectives import ECTObjective, Generators, SCMObjective
from cmray.train.toy_config import (
    CDConfig,
    CTConfig,
    NetConfig,
    OptimConfig,
    Toy2DConfig,
    TunedConfig,
)

Log = Callable[[str], None]
LossFn = Callable[[int, torch.Tensor], torch.Tensor]


def minibatches(
    data: torch.Tensor, optim: OptimConfig, generator: torch.Generator
) -> Iterator[tuple[int, torch.Tensor]]:
    """(step, batch) over ``optim.epochs`` shuffled passes of a fixed data set."""
    step = 0
    for _ in range(optim.epochs):
        order = torch.randperm(data.shape[0], generator=generator)
        for start in range(0, data.shape[0] - optim.batch_size + 1, optim.batch_size):
            yield step, data[order[start : start + optim.batch_size]]
            step += 1


def total_steps(n: int, optim: OptimConfig) -> int:
    """Steps of ``optim.epochs`` epochs over ``n`` points (the last partial batch dropped)."""
    return optim.epochs * (n // optim.batch_size)


def fit(
    module: nn.Module,
    loss_fn: LossFn,
    data: torch.Tensor,
    optim: OptimConfig,
    generator: torch.Generator,
    after_step: Callable[[int], None] | None = None,
    log: Log | None = None,
    name: str = "",
) -> None:
    """Adam on ``loss_fn(step, batch)`` over the epochs, reporting about 10 times per stage."""
    opt = torch.optim.Adam(module.parameters(), lr=optim.lr)
    steps = total_steps(data.shape[0], optim)
    every = max(steps // 10, 1)
    for step, x0 in minibatches(data, optim, generator):
        loss = loss_fn(step, x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.param_groups[0]["lr"] = learning_rate(optim, step, steps)
        opt.step()
        if after_step is not None:
            after_step(step)
        if log is not None and ((step + 1) % every == 0 or step + 1 == steps):
            log(f"[{name}] step {step + 1:>6}/{steps}  loss {loss.item():.5f}")


def learning_rate(optim: OptimConfig, step: int, steps: int) -> float:
    """The step's rate: constant, or cosine-decayed to 0 (the noise floor of ECT's and sCT's
    self-made targets otherwise keeps the one-step map moving)."""
    if optim.schedule == "constant":
        return optim.lr
    return 0.5 * optim.lr * (1.0 + math.cos(math.pi * step / steps))


def build_net(cfg: NetConfig, log_time: bool) -> ToyMLP:
    return ToyMLP(hidden=cfg.hidden, depth=cfg.depth, emb_dim=cfg.emb_dim, log_time=log_time)


def parametrization(kind: str, cfg: Toy2DConfig, sigma_min: float | None = None) -> Parametrization:
    """Scalings on the run's noise range, with sigma_data taken from the ring itself."""
    ring = ring_of(cfg)
    eps = cfg.noise.sigma_min if sigma_min is None else sigma_min
    noise = cfg.noise
    return Parametrization(kind, ring.sigma_data(), eps, noise.sigma_max, noise.c_noise_scale)  # type: ignore[arg-type]


def make_consistency_net(kind: str, net: NetConfig, cfg: Toy2DConfig) -> ConsistencyFunction:
    # "linear" hands F the raw t, "edm" hands it c_noise = noise.c_noise_scale * ln t.
    return ConsistencyFunction(
        build_net(net, log_time=kind == "linear"), parametrization(kind, cfg)
    )


def make_teacher(cfg: Toy2DConfig) -> nn.Module:
    """An untrained teacher: EDM-preconditioned denoiser, or the tutorial's raw score net."""
    tc = cfg.teacher
    if tc.objective == "edm":
        return ConsistencyFunction(
            build_net(tc.net, log_time=False), parametrization("edm", cfg, 0.0)
        )
    return ScoreDenoiser(build_net(tc.net, log_time=True))


def train_teacher(
    cfg: Toy2DConfig,
    data: torch.Tensor,
    generator: torch.Generator,
    log: Log | None = None,
    after_step: Callable[[int, nn.Module], None] | None = None,
) -> nn.Module:
    """The diffusion teacher D_phi, by EDM's objective (EDM Eq. 2) or the tutorial's DSM;
    ``after_step(step, D)`` sees it after every step (e.g. to keep a snapshot)."""
    tc, noise = cfg.teacher, cfg.noise
    D = make_teacher(cfg)

    def edm_fn(step: int, x0: torch.Tensor) -> torch.Tensor:
        sigma = losses.edm_sigma(x0.shape[0], tc.P_mean, tc.P_std, generator)
        z = torch.randn(x0.shape, generator=generator)
        return losses.edm_loss(D, x0, sigma, z, D.parametrization.sigma_data).mean()

    def dsm_fn(step: int, x0: torch.Tensor) -> torch.Tensor:
        t = sample_t(x0.shape[0], noise.sigma_min, noise.sigma_max, tc.t_dist, generator)
        z = torch.randn(x0.shape, generator=generator)
        return losses.dsm_loss(D.score_net, x0, t, z, tc.dsm_weighting).mean()

    loss_fn = edm_fn if tc.objective == "edm" else dsm_fn
    watch = None if after_step is None else (lambda step: after_step(step, D))
    fit(D, loss_fn, data, tc.optim, generator, watch, log=log, name="teacher")
    return D.eval().requires_grad_(False)


def train_run_teacher(
    cfg: Toy2DConfig, log: Log | None = None
) -> tuple[nn.Module, torch.Tensor, torch.Generator]:
    """A run's diffusion teacher from its seed, with the training set and the generator the
    students that follow it in the same run go on with."""
    data, generator = training_data(cfg)
    torch.manual_seed(cfg.seed)  # network initialisation
    return train_teacher(cfg, data, generator, log), data, generator


def sample_t(
    batch: int, sigma_min: float, sigma_max: float, dist: str, generator: torch.Generator
) -> torch.Tensor:
    """DSM noise levels: the tutorial's t ~ U[eps, T], or log-uniform on the same range."""
    u = torch.rand(batch, generator=generator)
    if dist == "uniform":
        return sigma_min + u * (sigma_max - sigma_min)
    lo, hi = math.log(sigma_min), math.log(sigma_max)
    return torch.exp(lo + u * (hi - lo))


def time_grid(cfg: Toy2DConfig, N: int, kind: str = "karras") -> torch.Tensor:
    """The N-point grid: Karras (paper) or equally spaced (the tutorial's 32-point grid)."""
    noise = cfg.noise
    if kind == "karras":
        return schedules.karras_sigmas(N, noise.sigma_min, noise.sigma_max, noise.rho)
    return torch.linspace(noise.sigma_min, noise.sigma_max, N, dtype=torch.float64)


def cd_loss_fn(
    cfg: Toy2DConfig,
    online: ConsistencyFunction,
    target: ConsistencyFunction,
    teacher: Denoiser,
    generator: torch.Generator,
) -> LossFn:
    """Algorithm 2's loss on a batch (plus the tutorial's boundary term), drawing from
    ``generator``."""
    cd: CDConfig = cfg.cd
    sigmas, d = time_grid(cfg, cd.N, cd.grid), metrics.get_metric(cd.metric)

    def loss_fn(step: int, x0: torch.Tensor) -> torch.Tensor:
        n = schedules.sample_uniform_indices(cd.N, x0.shape[0], generator)
        z = torch.randn(x0.shape, generator=generator)
        loss = losses.cd_loss(online, target, teacher, x0, z, n, sigmas, d, cd.solver).mean()
        return loss + cd.boundary_weight * _boundary(online, x0, cfg, generator)

    return loss_fn


def train_cd(
    cfg: Toy2DConfig,
    data: torch.Tensor,
    teacher: Denoiser,
    generator: torch.Generator,
    log: Log | None = None,
) -> tuple[ConsistencyFunction, ConsistencyFunction]:
    """Consistency distillation, paper Algorithm 2; returns (online f_theta, target f_theta-)."""
    cd: CDConfig = cfg.cd
    online = make_consistency_net(cd.parametrization, cd.net, cfg)
    target = ema.frozen_copy(online)
    loss_fn = cd_loss_fn(cfg, online, target, teacher, generator)

    def update_target(step: int) -> None:
        ema.ema_update_(target, online, cd.mu)

    fit(online, loss_fn, data, cd.optim, generator, update_target, log, "cd")
    return online.eval(), target.eval()


def _boundary(
    f: ConsistencyFunction, x0: torch.Tensor, cfg: Toy2DConfig, generator: torch.Generator
) -> torch.Tensor:
    z = torch.randn(x0.shape, generator=generator)
    return losses.boundary_loss(f, x0, z, cfg.noise.sigma_min).mean()


def ct_loss_fn(
    cfg: Toy2DConfig,
    online: ConsistencyFunction,
    target: ConsistencyFunction,
    K: int,
    generator: torch.Generator,
) -> LossFn:
    """Algorithm 3's loss at step k of a K-step curriculum, drawing from ``generator``."""
    ct = cfg.ct
    d, weighting = metrics.get_metric(ct.metric), losses.LAMBDAS[ct.weighting]

    def loss_fn(step: int, x0: torch.Tensor) -> torch.Tensor:
        N, _ = ct_curriculum(ct, step, K)
        sigmas = time_grid(cfg, N)
        n = ct_indices(ct.curriculum, sigmas, x0.shape[0], generator)
        z = torch.randn(x0.shape, generator=generator)
        return losses.ct_loss(online, target, x0, z, n, sigmas, d, weighting).mean()

    return loss_fn


def train_ct(
    cfg: Toy2DConfig, data: torch.Tensor, generator: torch.Generator, log: Log | None = None
) -> tuple[ConsistencyFunction, ConsistencyFunction]:
    """Consistency training, paper Algorithm 3; returns (online f_theta, target f_theta-)."""
    ct = cfg.ct
    online = make_consistency_net(ct.parametrization, ct.net, cfg)
    target = ema.frozen_copy(online)
    K = total_steps(data.shape[0], ct.optim)
    loss_fn = ct_loss_fn(cfg, online, target, K, generator)

    def update_target(step: int) -> None:
        # mu(k) is derived from the step, never carried as mutable state.
        ema.ema_update_(target, online, ct_curriculum(ct, step, K)[1])

    fit(online, loss_fn, data, ct.optim, generator, update_target, log, "ct")
    return online.eval(), target.eval()


def tuned_student(teacher: nn.Module, weight: bool = False) -> ConsistencyFunction:
    """ECT's and sCM's start: the teacher's own network and EDM scalings (f(x, 0) = x), with a
    fresh adaptive weight w_phi for sCM."""
    student = copy.deepcopy(teacher).train().requires_grad_(True)
    if weight:
        student.logvar = AdaptiveWeight()
    return student


def train_ect(
    cfg: Toy2DConfig,
    data: torch.Tensor,
    teacher: nn.Module,
    generator: torch.Generator,
    log: Log | None = None,
) -> ConsistencyFunction:
    """Easy Consistency Tuning from the teacher: stop-gradient of the online net as target."""
    student = tuned_student(teacher)
    steps = total_steps(data.shape[0], cfg.ect.optim)
    objective = ECTObjective(cfg.ect.loss, student.parametrization.sigma_data, steps)
    return _train_tuned(student, objective, cfg.ect, data, generator, log, "ect")


def train_sct(
    cfg: Toy2DConfig,
    data: torch.Tensor,
    teacher: nn.Module,
    generator: torch.Generator,
    log: Log | None = None,
) -> ConsistencyFunction:
    """sCT in TrigFlow from the teacher's weights: dx/dt from data and noise, JVP tangent."""
    student = tuned_student(teacher, weight=True)
    objective = SCMObjective(cfg.sct.loss, student.parametrization.sigma_data)
    return _train_tuned(student, objective, cfg.sct, data, generator, log, "sct")


def _train_tuned(
    student: ConsistencyFunction,
    objective: ECTObjective | SCMObjective,
    settings: TunedConfig,
    data: torch.Tensor,
    generator: torch.Generator,
    log: Log | None,
    name: str,
) -> ConsistencyFunction:
    """Train ``student`` on ``objective`` (its own stop-gradient copy is the target); return
    it, or its EMA copy at ``settings.ema`` when that is above 0."""
    gens = Generators(generator, generator)

    def loss_fn(step: int, x0: torch.Tensor) -> torch.Tensor:
        return objective.loss(student, student, x0, step, gens).mean()

    average = ema.frozen_copy(student) if settings.ema else None

    def after_step(step: int) -> None:
        if average is not None:
            ema.ema_update_(average, student, settings.ema)

    fit(student, loss_fn, data, settings.optim, generator, after_step, log, name)
    return (student if average is None else average).eval().requires_grad_(False)


TOY_METHODS = ("cd", "ct", "ect", "sct", "scd")


def student_settings(cfg: Toy2DConfig, method: str) -> CDConfig | CTConfig | TunedConfig:
    """The config section a method trains by (sCD shares sCT's, with the teacher's velocity)."""
    if method not in TOY_METHODS:
        raise ValueError(f"method {method!r}: accepted {', '.join(TOY_METHODS)}")
    return {"cd": cfg.cd, "ct": cfg.ct, "ect": cfg.ect, "sct": cfg.sct, "scd": cfg.sct}[method]


def tuned_objective(
    cfg: Toy2DConfig, method: str, teacher: nn.Module, steps: int
) -> ECTObjective | SCMObjective:
    """ECT's, sCT's or sCD's loss for a student tuned from ``teacher``."""
    sigma_data = ring_of(cfg).sigma_data()
    if method == "ect":
        return ECTObjective(cfg.ect.loss, sigma_data, steps)
    if method == "sct":
        return SCMObjective(dataclasses.replace(cfg.sct.loss, mode="ct"), sigma_data)
    return SCMObjective(dataclasses.replace(cfg.sct.loss, mode="cd"), sigma_data, teacher, 0)


class Student:
    """A student of any method trained step by step, with state that a checkpoint can hold
    (a search's 2D trial).

    Unlike :func:`train_cd` / :func:`train_ct` (shuffled epochs, one generator for the whole
    run), each step draws its batch and noise from a generator seeded by (seed, step), so a run
    resumed from any saved step continues exactly as it would have gone on. CD and CT keep
    their EMA target network; ECT, sCT and sCD start from the teacher's weights and keep an EMA
    copy only when their ``ema`` is above 0.
    """

    def __init__(
        self,
        cfg: Toy2DConfig,
        method: str,
        data: torch.Tensor,
        teacher: Denoiser | None = None,
    ) -> None:
        settings = student_settings(cfg, method)
        if method != "ct" and teacher is None:
            raise ValueError(f"a {method} student needs a teacher")
        self.cfg, self.method, self.data, self.step = cfg, method, data, 0
        self.optim = settings.optim
        self.batch_size = settings.optim.batch_size
        self.K = total_steps(data.shape[0], settings.optim)
        self.generator = torch.Generator()
        torch.manual_seed(cfg.seed)
        if method in ("cd", "ct"):
            self.online = make_consistency_net(settings.parametrization, settings.net, cfg)
            self.target: ConsistencyFunction | None = ema.frozen_copy(self.online)
            if method == "cd":
                args = (self.online, self.target, teacher, self.generator)
                self.loss_fn = cd_loss_fn(cfg, *args)
            else:
                self.loss_fn = ct_loss_fn(cfg, self.online, self.target, self.K, self.generator)
        else:
            self.online = tuned_student(teacher, weight=method != "ect")
            self.target = ema.frozen_copy(self.online) if settings.ema else None
            objective = tuned_objective(cfg, method, teacher, self.K)
            gens = Generators(self.generator, self.generator)

            def tuned_loss(step: int, x0: torch.Tensor) -> torch.Tensor:
                return objective.loss(self.online, self.online, x0, step, gens).mean()

            self.loss_fn = tuned_loss
        self.opt = torch.optim.Adam(self.online.parameters(), lr=settings.optim.lr)

    @property
    def sampler(self) -> ConsistencyFunction:
        """The network samples come from: the EMA target or copy, else the online net."""
        return self.online if self.target is None else self.target

    def schedule(self, step: int) -> tuple[int, float]:
        """(N, mu) at this step: CD's fixed pair, CT's curriculum N(k), mu(k), or (0, the EMA
        copy's rate) for the students tuned from the teacher (continuous time, no grid)."""
        if self.method == "cd":
            return self.cfg.cd.N, self.cfg.cd.mu
        if self.method == "ct":
            return ct_curriculum(self.cfg.ct, step, self.K)
        return 0, student_settings(self.cfg, self.method).ema

    def train_step(self) -> float:
        """One optimiser step and target (or EMA copy) update; returns the loss."""
        self.generator.manual_seed(self.cfg.seed * 1_000_003 + self.step)
        pick = torch.randint(0, self.data.shape[0], (self.batch_size,), generator=self.generator)
        loss = self.loss_fn(self.step, self.data[pick])
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.param_groups[0]["lr"] = learning_rate(self.optim, self.step, self.K)
        self.opt.step()
        if self.target is not None:
            ema.ema_update_(self.target, self.online, self.schedule(self.step)[1])
        self.step += 1
        return loss.item()

    def state_dict(self) -> dict:
        state = {"step": self.step, "online": self.online.state_dict()}
        if self.target is not None:
            state["target"] = self.target.state_dict()
        return state | {"opt": self.opt.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.online.load_state_dict(state["online"])
        if self.target is not None:
            self.target.load_state_dict(state["target"])
        self.opt.load_state_dict(state["opt"])
        self.step = int(state["step"])


def ring_of(cfg: Toy2DConfig) -> RingMixture:
    return RingMixture(cfg.ring.modes, cfg.ring.radius, cfg.ring.std)


def training_data(cfg: Toy2DConfig) -> tuple[torch.Tensor, torch.Generator]:
    """The fixed training set, and the generator (seeded by ``cfg.seed``) that drew it and
    goes on to draw every batch and noise of the run."""
    generator = torch.Generator().manual_seed(cfg.seed)
    return ring_of(cfg).sample(cfg.ring.train_points, generator), generator
