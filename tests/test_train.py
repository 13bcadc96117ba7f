"""The training machinery without Ray: checkpoints, exact resume, the NaN guard, precision."""

from __future__ import annotations

import contextlib
import copy
import functools
import shutil
from pathlib import Path

import pytest
import torch

from cmray.config import ConfigError, from_dict
from cmray.models import load_model
from cmray.train import state as ckpt
from cmray.train.config import TrainConfig
from cmray.train.loop import batch_draws, build_trainer, run_local, sample_grid, save_model_file
from cmray.train.objectives import SampleDraws
from cmray.train.step import NonFiniteLossError, train_step


def tiny_config(manifest: str, **loop: object) -> TrainConfig:
    return from_dict(
        TrainConfig,
        {
            "data": {
                "manifest": manifest,
                "batch_size": 8,
                "num_workers": 0,
                "shuffle_buffer": 64,
                "samples_per_epoch": 64,
            },
            "net": {
                "resolution": 16,
                "model_channels": 32,
                "channel_mult": [1, 2],
                "attention_resolutions": [8],
                "num_res_blocks": 1,
                "dropout": 0.1,
                "num_head_channels": 32,
            },
            # The paper's CT with l2: the loop's tests were written against it (fp16's first
            # steps overflow iCT's 1 / (sigma_{n+1} - sigma_n) weights until the scale backs off).
            "objective": {"kind": "ct", "ct": {"K": 12, "curriculum": "ct"}},
            "loop": {
                "steps": 12,
                "checkpoint_every": 3,
                "log_every": 1,
                "ema_rates": [0.9],
                **loop,
            },
            "run": {"num_workers": 1},
            "tracking": {"enabled": False},  # MLflow has its own tests
        },
    )


class CrashError(Exception):
    """Stands in for a worker dying right after a step."""


def losses_of(cfg: TrainConfig, out: Path, crash_at: int | None = None) -> dict[int, float]:
    seen: dict[int, float] = {}

    def record(metrics: dict[str, float]) -> None:
        seen[int(metrics["step"])] = metrics["loss"]
        if metrics["step"] == crash_at:
            raise CrashError

    with contextlib.suppress(CrashError):
        run_local(cfg, out, log=lambda _: None, on_metrics=record)
    return seen


@pytest.mark.parametrize("rates", [[0.9, 0.99], []])
def test_a_checkpoint_loads_its_first_ema_copy_or_else_the_online_net(
    digits16: str, tmp_path: Path, rates: list[float]
) -> None:
    cfg = tiny_config(digits16, ema_rates=rates)
    state = build_trainer(cfg, torch.device("cpu")).state
    with torch.no_grad():  # every net different, so a mix-up shows
        for i, net in enumerate([state.online, state.target, *state.ema.copies]):
            for p in net.parameters():
                p.fill_(i)
    ckpt.save_checkpoint(state, tmp_path / "ckpt", rank=0, world_size=1)
    model, loaded_cfg = load_model(str(tmp_path / "ckpt"))
    expected = state.ema.copies[0] if rates else state.online
    assert loaded_cfg == cfg.model_config()
    for (name, got), want in zip(
        model.state_dict().items(), expected.state_dict().values(), strict=True
    ):
        assert torch.equal(got, want), name
    assert not any(p.requires_grad for p in model.parameters()) and not model.training


def test_a_file_that_cannot_be_mapped_is_read_whole(digits16: str, tmp_path: Path) -> None:
    """torch's pre-1.6 file format cannot be memory-mapped (nor can files on some mounts)."""
    trainer = build_trainer(tiny_config(digits16), torch.device("cpu"))
    data = torch.load(save_model_file(trainer, tmp_path / "model.pt"), weights_only=True)
    torch.save(data, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    with pytest.raises(RuntimeError):
        torch.load(tmp_path / "legacy.pt", weights_only=True, mmap=True)
    model, _ = load_model(str(tmp_path / "legacy.pt"))
    for (name, got), want in zip(model.state_dict().items(), data["weights"].values(), strict=True):
        assert torch.equal(got, want), name


def test_resume_equals_uninterrupted_bit_for_bit(digits16: str, tmp_path: Path) -> None:
    torch.set_num_threads(1)
    cfg = tiny_config(digits16)  # 8 batches per epoch, so the resumed part crosses an epoch
    straight = losses_of(cfg, tmp_path / "straight")
    before = losses_of(cfg, tmp_path / "resumed", crash_at=5)
    assert max(before) == 5 and ckpt.latest_checkpoint(tmp_path / "resumed" / "checkpoints")
    after = losses_of(cfg, tmp_path / "resumed")
    assert sorted(after) == list(range(4, 13))  # resumed from the step-3 checkpoint
    assert all(after[k] == straight[k] for k in after), (after, straight)
    assert len(set(straight.values())) == 12


def test_a_run_resumes_only_with_the_settings_it_was_trained_with(
    digits16: str, tmp_path: Path
) -> None:
    cfg = tiny_config(digits16, steps=3)
    run_local(cfg, tmp_path, log=lambda _: None)
    changed = copy.deepcopy(cfg)
    changed.optim.lr, changed.loop.ema_rates = cfg.optim.lr * 2, [0.99]
    with pytest.raises(ConfigError, match=r"optim\.lr: \S+ -> \S+; loop\.ema_rates.*run\.name"):
        run_local(changed, tmp_path, log=lambda _: None)
    assert ckpt.latest_checkpoint(tmp_path / "checkpoints").name == "step-000000003"
    moved = copy.deepcopy(cfg)  # where the teacher is kept, how long and on what: not what
    moved.objective.cd.teacher, moved.run.num_workers = "s3://elsewhere/teacher", 2
    assert moved.resume_changes(cfg) == []
    lines: list[str] = []
    run_local(tiny_config(digits16, steps=6), tmp_path, log=lines.append)
    assert any(line.startswith("resumed from") for line in lines)
    assert ckpt.latest_checkpoint(tmp_path / "checkpoints").name == "step-000000006"


def test_a_checkpoint_without_its_markers_is_never_loaded(digits16: str, tmp_path: Path) -> None:
    cfg = tiny_config(digits16, steps=6)
    run_local(cfg, tmp_path, log=lambda _: None)
    root = tmp_path / "checkpoints"
    assert ckpt.latest_checkpoint(root).name == "step-000000006"
    # The local run's own directory names its newest checkpoint, as a Ray Train run's does.
    from cmray.models.checkpoints import checkpoint_state

    assert checkpoint_state(str(tmp_path))[1].endswith("step-000000006/state.pt")
    (root / "step-000000006" / "complete-rank0.json").unlink()
    assert ckpt.latest_checkpoint(root).name == "step-000000003"
    trainer = build_trainer(cfg, torch.device("cpu"))
    with pytest.raises(ckpt.IncompleteCheckpointError, match="no completion marker"):
        ckpt.load_checkpoint(trainer.state, root / "step-000000006", rank=0)
    state_file = root / "step-000000003" / ckpt.STATE_FILE
    state_file.write_bytes(state_file.read_bytes()[:-10])  # an upload cut short
    with pytest.raises(ckpt.IncompleteCheckpointError, match=r"not \d+ bytes"):
        ckpt.verify_checkpoint(root / "step-000000003")
    assert ckpt.latest_checkpoint(root) is None
    shutil.rmtree(root)


def test_microbatches_and_ranks_see_the_same_noise(digits16: str) -> None:
    """Each sample's noise and noise level come from (seed, step, its place in the global
    batch): the same whether the rank holds the whole batch or a part, in one pass or two."""
    trainer = build_trainer(tiny_config(digits16), torch.device("cpu"))
    x0 = torch.zeros(8, 3, 16, 16)
    whole = batch_draws(trainer, 8)
    halves = SampleDraws(0, 0, [4, 5, 6, 7]).split([2, 2])
    torch.testing.assert_close(torch.cat([h.z(x0[:2]) for h in halves]), whole.z(x0)[4:])
    draw = functools.partial(torch.randint, 0, 1000, dtype=torch.long)
    assert whole.indices(lambda n, g: draw((n,), generator=g), 8)[4:].tolist() == [
        i for h in halves for i in h.indices(lambda n, g: draw((n,), generator=g), 2).tolist()
    ]
    assert not torch.equal(SampleDraws(0, 1, [4]).z(x0[:1]), whole.z(x0)[4:5])  # the next step


@pytest.mark.parametrize("precision", ["fp32", "fp16"])  # fp16: a NaN loss is no scale backoff
def test_nonfinite_steps_change_nothing_and_stop_the_run(digits16: str, precision: str) -> None:
    cfg = tiny_config(digits16, nonfinite_limit=3, precision=precision)
    trainer = build_trainer(cfg, torch.device("cpu"))
    state = trainer.state
    before = copy.deepcopy(state.online.state_dict())
    x0 = torch.full((8, 3, 16, 16), float("nan"))
    for _ in range(2):
        result = train_step(
            state, trainer.objective, x0, cfg.loop, cfg.optim, batch_draws(trainer, len(x0))
        )
        assert not result.finite
    assert state.skipped_steps == 2
    assert all(torch.equal(before[k], v) for k, v in state.online.state_dict().items())
    with pytest.raises(NonFiniteLossError, match="3 steps in a row"):
        train_step(state, trainer.objective, x0, cfg.loop, cfg.optim, batch_draws(trainer, len(x0)))


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_steps_are_finite_and_learn(digits16: str, precision: str) -> None:
    cfg = tiny_config(digits16, precision=precision)
    trainer = build_trainer(cfg, torch.device("cpu"))
    x0 = torch.rand(8, 3, 16, 16) * 2 - 1
    results = [
        train_step(
            trainer.state, trainer.objective, x0, cfg.loop, cfg.optim, batch_draws(trainer, len(x0))
        )
        for _ in range(3)
    ]
    assert all(r.finite for r in results) and trainer.state.step == 3


def test_fp16_loss_scale_backoff_is_not_a_failure(digits16: str) -> None:
    cfg = tiny_config(digits16, precision="fp16", nonfinite_limit=3)
    trainer = build_trainer(cfg, torch.device("cpu"))
    state = trainer.state
    # Far too large: overflows. The steep backoff (1/64 a step, not 1/2) reaches a scale that
    # fits in a few steps, so the test need not spend fp16 steps (slow on a CPU) on halving.
    state.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**60, backoff_factor=2.0**-6)
    x0 = torch.rand(8, 3, 16, 16) * 2 - 1
    results = [
        train_step(state, trainer.objective, x0, cfg.loop, cfg.optim, batch_draws(trainer, len(x0)))
        for _ in range(14)
    ]
    overflows = sum(not r.finite for r in results)
    assert overflows > cfg.loop.nonfinite_limit and state.skipped_steps == overflows
    assert results[-1].finite and state.scaler.get_scale() < 2.0**60


def test_microbatches_accumulate_into_the_same_step(digits16: str) -> None:
    """Passes of 3, 3 and 2 images give the step one pass of 8 gives (to rounding)."""
    results = []
    for microbatch in (0, 3):
        cfg = tiny_config(digits16, microbatch=microbatch)
        cfg.net.dropout = 0.0
        trainer = build_trainer(cfg, torch.device("cpu"))
        x0 = torch.rand(8, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
        draws = batch_draws(trainer, len(x0))
        result = train_step(trainer.state, trainer.objective, x0, cfg.loop, cfg.optim, draws)
        results.append((result, trainer.state.online.state_dict()))
    (one, a), (three, b) = results
    assert one.finite and three.finite and one.loss == pytest.approx(three.loss, rel=1e-5)
    assert all(torch.allclose(a[k], b[k], rtol=0, atol=1e-6) for k in a)


def test_cd_distils_from_an_edm_teacher_trained_here(digits16: str, tmp_path: Path) -> None:
    teacher_cfg = tiny_config(digits16, steps=2, checkpoint_every=2)
    teacher_cfg.objective.kind = "edm"
    run_local(teacher_cfg, tmp_path / "teacher", log=lambda _: None)
    teacher_dir = ckpt.latest_checkpoint(tmp_path / "teacher" / "checkpoints")
    cfg = tiny_config(digits16, steps=2, checkpoint_every=2)
    cfg.objective.kind, cfg.objective.cd.teacher = "cd", str(teacher_dir)
    seen: list[dict[str, float]] = []
    trainer = run_local(cfg, tmp_path / "cd", log=lambda _: None, on_metrics=seen.append)
    assert trainer.state.step == 2 and all(m["N"] == cfg.objective.cd.N for m in seen)
    assert all(torch.isfinite(torch.tensor(m["loss"])) for m in seen)
    with pytest.raises(ValueError, match="not an EDM teacher"):
        cfg.objective.cd.teacher = str(ckpt.latest_checkpoint(tmp_path / "cd" / "checkpoints"))
        run_local(cfg, tmp_path / "cd2", log=lambda _: None)


@pytest.mark.parametrize("kind", ["ct", "edm"])
def test_sample_grids_are_images_in_range(digits16: str, kind: str) -> None:
    cfg = tiny_config(digits16)
    cfg.objective.kind = kind
    trainer = build_trainer(cfg, torch.device("cpu"))
    rng = torch.get_rng_state()
    grid = sample_grid(trainer, 4)
    assert grid.shape == (4, 3, 16, 16) and grid.abs().max() <= 1
    assert torch.equal(torch.get_rng_state(), rng)  # sampling leaves training's RNG alone


def test_a_class_conditional_run_learns_from_the_shards_labels(
    digits16: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """Digits carry 10 classes (.cls): a conditional student's label embedding trains on them,
    its checkpoint samples by class, and data without labels is a one-line error."""
    from cmray.cli import main
    from cmray.train.loop import class_batch

    torch.set_num_threads(1)
    # Zero-initialised output layers pass no gradient to the embedding before the third step,
    # and then a tiny one: Adam's steps are lr-sized whatever the gradient, RAdam's first are not.
    cfg = tiny_config(digits16, steps=4, checkpoint_every=4)
    cfg.net.num_classes = 10
    cfg.optim.name, cfg.optim.lr = "adam", 1e-3
    trainer = build_trainer(cfg, torch.device("cpu"))
    before = trainer.state.online.net.label_emb.weight.detach().clone()
    run_local(cfg, tmp_path, log=lambda _: None)
    model, loaded = load_model(str(tmp_path / "checkpoints"))
    assert loaded.net.num_classes == 10
    moved = (model.net.label_emb.weight != before).any(dim=1)  # the EMA copy's
    assert moved.sum() >= 5, moved  # the classes of steps 3 and 4's 16 images
    x, t = torch.randn(2, 3, 16, 16), torch.full((2,), 1.0)
    a = model(x, t, class_labels=torch.tensor([0, 0]))
    b = model(x, t, class_labels=torch.tensor([7, 7]))
    assert not torch.equal(a, b)  # the label changes the output

    out = tmp_path / "three.png"
    args = ["sample", "--model", str(tmp_path / "checkpoints"), "--num", "4", "--class", "3"]
    assert main([*args, "--out", str(out)]) == 0 and out.is_file()
    with pytest.raises(ValueError, match=r"net.num_classes = 10 but a batch has labels -1"):
        class_batch(torch.tensor([-1, -1]), 10, torch.device("cpu"))


def test_cd_distils_a_teacher_from_a_model_file(digits16: str, tmp_path: Path) -> None:
    """objective.cd.teacher takes any model source: here an EDM model file, as `cmray import
    openai edm_*.pt` writes one, with no training run behind it."""
    from cmray.models import ModelConfig, build_model, write_model_file
    from cmray.train.worker import preflight

    torch.set_num_threads(1)
    cfg = tiny_config(digits16, steps=2, checkpoint_every=2)
    teacher = ModelConfig(kind="edm", net=cfg.net, noise=cfg.objective.noise)
    write_model_file(tmp_path / "edm.pt", teacher, build_model(teacher).state_dict())
    cfg.objective.kind, cfg.objective.cd.teacher = "cd", str(tmp_path / "edm.pt")
    preflight(cfg)  # the driver's check finds it
    trainer = run_local(cfg, tmp_path / "cd", log=lambda _: None)
    assert trainer.state.step == 2
    cfg.objective.cd.teacher = str(tmp_path / "missing.pt")
    with pytest.raises(ConfigError, match=r"objective\.cd\.teacher: no model file at"):
        preflight(cfg)


def test_report_waits_are_named_once_when_they_pace_training() -> None:
    """Reports faster than Ray Train's controller reads them pace training to its poll: past
    a quarter of the time over ten reports, one warning that names the setting to raise."""
    import time

    from cmray.train.worker import ReportWait

    slow = ReportWait(log_every=1, start=time.perf_counter() - 10.0)
    assert [slow.observe(0.4) for _ in range(9)] == [None] * 9  # too few reports to judge
    warning = slow.observe(0.4)  # 4 s of 10 waiting
    assert warning is not None and "loop.log_every (now 1)" in warning
    assert slow.observe(0.4) is None  # said once
    fast = ReportWait(log_every=50, start=time.perf_counter() - 10.0)
    assert all(fast.observe(0.15) is None for _ in range(12))  # 1.8 s of 10: under a quarter


@pytest.mark.parametrize(
    ("steps", "signals", "ok"),
    [("6", "KILL", True), ("6,10", "TERM,KILL", True), ("6,10", "TERM", True),
     ("6,10", "TERM,KILL,KILL", False), ("x", "KILL", False), ("6", "HUP", False)],
)  # fmt: skip
def test_chaos_variables_are_checked_in_the_driver_in_one_line(
    steps: str, signals: str, ok: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cmray.config import ConfigError
    from cmray.train.worker import FAULT_SIGNAL_ENV, FAULT_STEP_ENV, _fault_env

    monkeypatch.setenv(FAULT_STEP_ENV, steps)
    monkeypatch.setenv(FAULT_SIGNAL_ENV, signals)
    if ok:
        assert _fault_env() == {FAULT_STEP_ENV: steps, FAULT_SIGNAL_ENV: signals}
    else:
        with pytest.raises(ConfigError, match=f"{FAULT_STEP_ENV}={steps} with") as info:
            _fault_env()
        assert "\n" not in str(info.value) and "accepted:" in str(info.value)


def test_a_shrunk_group_holds_while_the_drill_file_exists_and_a_full_one_never(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The elastic drill's hold: it reaches the workers with the chaos variables, holds a
    group below its maximum until the file goes, and never holds a group at full size."""
    import threading
    import time
    from types import SimpleNamespace

    from cmray.train.worker import HOLD_ENV, _fault_env, _maybe_hold_shrunk

    hold = tmp_path / "elastic.hold"
    monkeypatch.setenv(HOLD_ENV, str(hold))
    assert _fault_env() == {HOLD_ENV: str(hold)}
    hold.touch()
    tick = time.perf_counter()
    _maybe_hold_shrunk(SimpleNamespace(world_size=2), max_workers=2)  # type: ignore[arg-type]
    assert time.perf_counter() - tick < 0.05
    threading.Timer(0.5, hold.unlink).start()
    _maybe_hold_shrunk(SimpleNamespace(world_size=1), max_workers=2)  # type: ignore[arg-type]
    assert time.perf_counter() - tick >= 0.5 and not hold.exists()
