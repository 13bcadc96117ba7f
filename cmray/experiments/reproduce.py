"""The reproduction study: the paper's Table 2 in miniature, on real images, as one command.

1. The data are prepared as shards (once).
2. An EDM teacher trains under Ray Train in segments, its Heun sampler's figure (18 points,
   35 NFE) measured after each, until the last quarter of its training improved that figure by
   less than ``teacher.tolerance``: the student ratios are then not flattered by a weak teacher.
3. The student rows (CD, CT, iCT, ECT, sCT, sCD, ...) are one Ray Tune grid search over named
   variants of one base config: they run in parallel on any cluster, a restarted study resumes
   the search, and each row is an MLflow child of the study's run.
4. Every row is scored the same way (one step, two steps with the ternary search, fixed noise,
   fixed sample count) and so is the teacher at 1, 2, 4 and 18 points; real against real is
   the floor. A row whose training failed (e.g. diverged) is reported, not fatal.
5. ``results.json``, ``table.md`` (method, NFE, figure, ratio to the teacher), ``samples.png``
   (one grid per row, same noise) and ``nfe.png`` (figure against NFE) go into ``out``.

Every phase keeps its result on disk and is skipped when found, so re-running the command after
a crash continues where the study stopped.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from cmray.config import ConfigError, dump_yaml, from_dict, load_config, to_dict
from cmray.data.config import PrepareConfig
from cmray.eval.config import FRECHET_NAMES, EvalConfig, SamplingConfig
from cmray.experiments.reproduce_config import (
    TEACHER_PLACEHOLDER,
    TEACHER_STEPS_PLACEHOLDER,
    ReproduceConfig,
)
from cmray.experiments.reproduce_report import (
    add_ratios,
    image_figure,
    image_panels,
    load_images,
)
from cmray.experiments.study import (
    STUDENTS_RUN,
    converged,
    error_line,
    family_of,
    in_order,
    method_name,
    read_json,
    rows_search,
    slug,
    timer,
    write_json,
)
from cmray.storage import absolute
from cmray.train.config import TrainConfig
from cmray.tune.config import (
    VARIANT_KEY,
    SearchParam,
    SearchPlan,
    TuneConfig,
    VariantConfig,
    plan_search,
)

Log = Callable[[str], None]
TEACHER_RUN = "teacher"


# --------------------------------------------------------------------------- the plan


@dataclass
class Study:
    """A checked study: its config, absolute paths, and the students' search plan."""

    cfg: ReproduceConfig
    out: Path
    teacher_cfg: TrainConfig
    search: SearchPlan
    metric: str
    timings: dict[str, float] = field(default_factory=dict)
    runs: dict[str, str] = field(default_factory=dict)  # each row's Train run, once trained

    @property
    def manifest(self) -> str:
        return absolute(self.cfg.data.manifest)

    @property
    def teacher_source(self) -> str:
        """The teacher's run directory: every model loader reads its newest checkpoint."""
        return str(self.out / "train" / TEACHER_RUN)


def _teacher_config(cfg: ReproduceConfig, out: Path) -> TrainConfig:
    where = [f"run.name={TEACHER_RUN}", f"run.storage_path={out / 'train'}"]
    data = [f"data.manifest={absolute(cfg.data.manifest)}/manifest.json"]
    every = [f"loop.checkpoint_every={cfg.teacher.segment_steps}"]
    settings = [*cfg.teacher.set, *data, *where, *every]
    teacher = load_config(TrainConfig, cfg.teacher.config, settings)
    if teacher.objective.kind != "edm":
        raise ConfigError(
            f"teacher.config {cfg.teacher.config!r} trains objective.kind = "
            f"{teacher.objective.kind}; the teacher must be edm",
            key="teacher.config",
        )
    tracking = replace(cfg.tracking, log_model=False, registry_name="")
    return replace(teacher, tracking=tracking)


def _rows(cfg: ReproduceConfig, teacher: str, steps: int) -> list[VariantConfig]:
    """The rows' settings with the teacher's run directory in place of ``{teacher}`` and its
    training steps in place of ``{teacher_steps}``."""

    def fill(setting: str) -> str:
        return setting.replace(TEACHER_PLACEHOLDER, teacher).replace(
            TEACHER_STEPS_PLACEHOLDER, str(steps)
        )

    return [VariantConfig(r.name, [fill(s) for s in r.set]) for r in cfg.students.rows]


def _search_config(cfg: ReproduceConfig, out: Path, teacher: str, steps: int) -> TuneConfig:
    base = load_config(TrainConfig, cfg.students.config, cfg.students.set)
    quality = [
        f"quality.every={base.loop.steps}",  # once, at the end: the search's figure
        f"quality.features={cfg.eval.features}",
        f"quality.num_samples={cfg.eval.search_samples}",
        f"data.manifest={absolute(cfg.data.manifest)}/manifest.json",
    ]
    overrides = [*cfg.students.set, *quality]
    rows = _rows(cfg, teacher, steps)
    return rows_search(cfg, "train", cfg.students.config, overrides, rows, out)


def plan_students(cfg: ReproduceConfig, out: Path, teacher_steps: int) -> SearchPlan:
    """The rows' search, with the teacher's steps filled in (before its training: the most it
    may train, so every row is checked before anything starts)."""
    return plan_search(_search_config(cfg, out, str(out / "train" / TEACHER_RUN), teacher_steps))


def plan_study(cfg: ReproduceConfig) -> Study:
    """Check the teacher's config and every row's before anything starts."""
    out = Path(absolute(cfg.out))
    teacher_cfg = _teacher_config(cfg, out)
    search = plan_students(cfg, out, cfg.teacher.max_steps)
    return Study(cfg, out, teacher_cfg, search, FRECHET_NAMES[cfg.eval.features])


# --------------------------------------------------------------------------- the phases


def prepare_data(study: Study, log: Log) -> None:
    from cmray.data.prepare import prepare

    d = study.cfg.data
    prepare(PrepareConfig(source=d.source, out=d.manifest, resolution=d.resolution), log)


def eval_config(study: Study, model: str, out: Path) -> EvalConfig:
    """The one way every row and the teacher are scored."""
    e = study.cfg.eval
    return EvalConfig(
        model=model,
        manifest=study.manifest,
        features=e.features,
        num_samples=e.num_samples,
        ref_count=e.ref_count,
        pr_count=e.pr_count,
        batch_size=e.batch_size,
        sampling=SamplingConfig(steps=2, search_samples=e.search_samples),
        seed=e.seed,
        draws=e.draws,
        workers=e.workers,
        out=str(out),
    )


def _teacher_point(study: Study, step: int, log: Log) -> dict[str, float]:
    """The teacher's figure at ``step`` (its kept checkpoint), on the rows' noise."""
    from cmray.eval.evaluate import score_teacher
    from cmray.models.checkpoints import checkpoint_at

    found = checkpoint_at(study.teacher_source, step)
    if found is None:
        raise FileNotFoundError(f"the teacher's checkpoint of step {step} was not kept")
    cfg = eval_config(study, str(found), study.out / "teacher")
    scored = score_teacher(cfg, [study.cfg.teacher.points], log)
    return {"step": step, study.metric: scored.report["results"][0][study.metric]}


def _train_teacher_to(study: Study, steps: int) -> None:
    from cmray.train.worker import launch

    t, cfg = study.cfg.teacher, study.teacher_cfg
    keep = t.max_steps // t.segment_steps + 1  # every segment's checkpoint: the 3/4 point too
    loop = replace(cfg.loop, steps=steps, checkpoint_every=t.segment_steps)
    launch(replace(cfg, loop=loop, run=replace(cfg.run, keep_checkpoints=keep)))


def train_teacher(study: Study, log: Log) -> dict[str, Any]:
    """Train the teacher to 4 segments, then double its length until the last quarter of its
    training improved the 35-NFE figure by less than ``teacher.tolerance`` (or until
    ``teacher.max_steps``). One Ray Train run, resumed by each extension."""
    t = study.cfg.teacher
    path = study.out / "teacher" / "curve.json"
    state = read_json(path) or {"curve": [], "converged": None}
    steps = state["curve"][-1]["step"] if state["curve"] else 4 * t.segment_steps
    while state["converged"] is None:
        log(f"teacher: training to step {steps} (at most {t.max_steps})")
        _train_teacher_to(study, steps)
        measured = {c["step"] for c in state["curve"]}
        for step in (3 * steps // 4, steps):
            if step not in measured:
                state["curve"].append(_teacher_point(study, step, log))
                log(f"teacher: step {step} {study.metric} {state['curve'][-1][study.metric]:.3f}")
        state["curve"].sort(key=lambda c: c["step"])
        done = converged(state["curve"], t.tolerance, study.metric)
        if done or 2 * steps > t.max_steps:
            state["converged"] = bool(done)
        write_json(path, state)
        steps *= 2
    return state


TRAINED_FILE = "students.json"  # in the study's directory: each row's run and fingerprint


def row_fingerprint(cfg: TrainConfig) -> str:
    """What a row trains, not where its run is kept: equal fingerprints, the same row."""
    from cmray.train.worker import absolute_paths

    data = to_dict(absolute_paths(cfg))
    data.pop("tracking")
    for where in ("name", "storage_path"):
        data["run"].pop(where)
    return _digest(json.dumps(data, sort_keys=True))[:16]


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def trained_fingerprint(run: str) -> str | None:
    """The fingerprint of the config a row's model was trained with, read from its newest
    checkpoint (None where there is none, or its config no longer loads)."""
    from cmray.models.files import ModelSourceError, read_source

    try:
        return row_fingerprint(from_dict(TrainConfig, read_source(run)["config"]))
    except (ModelSourceError, ConfigError, KeyError, OSError):
        return None


def _rows_plan(study: Study, names: list[str], fingerprints: list[str], fresh: bool) -> SearchPlan:
    """A search over some of the rows, named after what it trains so that a restarted study
    finds it again (a fresh study's first search keeps the plain name)."""
    cfg = study.search.cfg
    name = STUDENTS_RUN
    if not fresh:
        name += "-" + _digest(" ".join(fingerprints))[:8]
    return plan_search(
        replace(
            cfg,
            space=[SearchParam(VARIANT_KEY, "grid", names)],
            variants=[v for v in cfg.variants if v.name in names],
            run=replace(cfg.run, name=name),
        )
    )


def _ledger_entry(plan: SearchPlan, row: dict[str, Any], wanted: str) -> dict[str, Any]:
    run = plan.trial_run_key(row["trial"])
    trained = wanted if row["status"] == "error" else trained_fingerprint(run)
    return {**row, "run": run, "search": plan.cfg.run.name, "fingerprint": trained}


def _kept(entry: dict[str, Any] | None, wanted: str) -> bool:
    """Whether a row trained before stands: it finished, with the settings asked for now."""
    return entry is not None and entry["status"] != "error" and entry["fingerprint"] == wanted


def train_students(study: Study, log: Log) -> list[dict[str, Any]]:
    """The rows as Tune grid searches. A row trained before with its config as it stands now
    is kept with its model; the rest run as one search (resumed, not repeated, when the study
    re-runs). A row whose config changed is retrained, never reported from its old model."""
    from cmray.tune.search import run_search

    path = study.out / TRAINED_FILE
    ledger: dict[str, Any] = read_json(path) or {}
    fresh = not ledger
    names = [r.name for r in study.cfg.students.rows]
    wanted = {n: row_fingerprint(study.search.trial_config({VARIANT_KEY: n})) for n in names}
    todo = [n for n in names if not _kept(ledger.get(n), wanted[n])]
    for attempt in range(2):  # the second only for rows a restored search trained otherwise
        if not todo:
            break
        plan = _rows_plan(study, todo, [wanted[n] for n in todo], fresh and attempt == 0)
        for row in run_search(plan, log).rows:
            ledger[row[VARIANT_KEY]] = _ledger_entry(plan, row, wanted[row[VARIANT_KEY]])
        write_json(path, ledger)
        # (a restored search may also lack a row added since)
        todo = [n for n in todo if ledger.get(n, {}).get("fingerprint") != wanted[n]]
        if todo and attempt == 0:
            log(f"retraining the rows whose settings changed since they trained: {todo}")
    if todo:
        raise RuntimeError(f"rows {todo} trained with other settings than asked, twice over")
    study.runs = {n: ledger[n]["run"] for n in names}
    return [ledger[n] for n in names]


def score_row(study: Study, row: dict[str, Any], log: Log) -> dict[str, Any]:
    """A row's one- and two-step figures (kept in its directory: a re-run reuses them)."""
    from cmray.eval.evaluate import score_model, write_report
    from cmray.experiments.reproduce_report import save_images

    name = row[VARIANT_KEY]
    out = study.out / "rows" / slug(name)
    method = row_method(study, name)
    entry = {"name": name, "trial": row["trial"], "status": row["status"], "method": method}
    entry["family"] = family_of(method)
    trained = study.search.trial_config({VARIANT_KEY: name})
    entry["images"] = trained.loop.steps * global_batch(trained)
    entry["train_s"] = row.get("train_s", math.nan)
    if row["status"] == "error":
        return {**entry, "error": error_line(study.out / row["search"], row["trial"])}
    model = row["run"]
    saved = read_json(out / "eval.json")
    if saved is None or saved["model"] != model:  # a retrained row is scored again
        log(f"scoring {name}")
        scored = score_model(eval_config(study, model, out), log)
        save_images(out / "images.pt", scored.images)
        write_report(str(out), scored)
        saved = scored.report
    return {**entry, "results": saved["results"], "search": saved["search"]}


def score_teacher_table(study: Study, log: Log) -> dict[str, Any]:
    """The teacher at every configured point count, on the rows' noise."""
    from cmray.eval.evaluate import score_teacher, write_report
    from cmray.experiments.reproduce_report import save_images

    out = study.out / "teacher"
    saved = read_json(out / "eval.json")
    if saved is None:
        cfg = eval_config(study, study.teacher_source, out)
        scored = score_teacher(cfg, study.cfg.eval.teacher_points, log)
        save_images(out / "images.pt", scored.images)
        write_report(str(out), scored)
        saved = scored.report
    return saved


def row_method(study: Study, name: str) -> str:
    """cd, ct, ict, ect, sct or scd: what a row trains, read from its config."""
    objective = study.search.trial_config({VARIANT_KEY: name}).objective
    return method_name(objective.kind, objective.scm.mode, objective.ct.curriculum)


def global_batch(cfg: TrainConfig) -> int:
    """Images per optimiser step across every worker (the config states it)."""
    return cfg.data.batch_size


def assemble(
    study: Study, teacher: dict[str, Any], teacher_eval: dict[str, Any], rows: list[dict[str, Any]]
) -> dict[str, Any]:
    """results.json's content: the teacher, every row, the floor, the budget, the targets."""
    for entry in teacher_eval["results"]:
        entry["baseline"] = entry["points"] == study.cfg.teacher.points
    base = from_dict(TrainConfig, study.search.base)  # the shared budget, before any row's own
    batch = global_batch(base)
    results = {
        "suite": study.cfg.suite,
        "metric": study.metric,
        "score": teacher_eval["features"]["score"],
        "study": to_dict(study.cfg),
        "timings_s": study.timings,
        **floor(study, teacher_eval),
        "budget_line": (
            f"Each row: {base.loop.steps} steps of {batch} images "
            f"({base.loop.steps * batch} training images) unless it sets its own; the teacher: "
            f"{teacher['curve'][-1]['step']} steps of {global_batch(study.teacher_cfg)}."
        ),
        "teacher": {**teacher, "results": teacher_eval["results"]},
        "rows": rows,
    }
    return add_ratios(results)


def floor(study: Study, teacher_eval: dict[str, Any]) -> dict[str, Any]:
    """Real against real, at the rows' sample count: Fashion-MNIST's test images against the
    training set's statistics; elsewhere one half of the training images against the other."""
    if study.cfg.suite != "fashion":
        value = teacher_eval["reference"]["split_half_frechet"]
        return {"floor": value, "floor_name": "Real images (one half against the other)"}
    path = study.out / "floor.json"
    saved = read_json(path)
    if saved is None:
        saved = {"floor": held_out_frechet(study), "floor_name": "Test images against training"}
        write_json(path, saved)
    return saved


def held_out_frechet(study: Study) -> float:
    """The Frechet distance of the first ``eval.num_samples`` Fashion-MNIST test images, prepared
    as the shards are, to the training images' reference statistics."""
    import torch

    from cmray.eval.fashion_classifier import fashion_images
    from cmray.eval.features import load_feature_net
    from cmray.eval.frechet import RunningGaussian, frechet_distance
    from cmray.eval.reference import load_ref_stats

    folder = study.cfg.data.source.partition(":")[2]  # fashion-mnist:PATH, or found
    images, _ = fashion_images("test", folder, study.cfg.data.resolution)
    net = load_feature_net(study.cfg.eval.features)
    stats = RunningGaussian()
    with torch.no_grad():
        for batch in images[: study.cfg.eval.num_samples].split(study.cfg.eval.batch_size):
            stats.add(net(batch)[0].double())
    ref = load_ref_stats(study.manifest, study.cfg.eval.features)
    if ref is None:
        raise FileNotFoundError(f"no reference statistics beside {study.manifest}")
    return frechet_distance(*stats.stats(), ref.mu, ref.sigma)


def sample_figure(study: Study, results: dict[str, Any], path: Path) -> Path:
    """One 4 x 4 grid per row (the teacher's baseline first), all from the same noise."""
    teacher = load_images(study.out / "teacher" / "images.pt")
    rows = {r["name"]: load_images(study.out / "rows" / slug(r["name"]) / "images.pt")
            for r in results["rows"]}  # fmt: skip
    return image_figure(image_panels(results, teacher, rows), path)


def run_study(cfg: ReproduceConfig, log: Log = print) -> dict[str, Any]:
    """Every phase in order; returns what ``results.json`` holds."""
    from cmray.cluster import ray_init
    from cmray.experiments import reproduce_report as report

    study = plan_study(cfg)  # every config mistake surfaces before anything starts
    study.out.mkdir(parents=True, exist_ok=True)
    (study.out / "study.yaml").write_text(dump_yaml(cfg))
    timed = timer(study.timings, study.out / "timings.json", log)
    timed("data", lambda: prepare_data(study, log))
    ray_init()
    parent = report.open_parent(study)
    if parent is not None:  # the teacher's run nests under the study's too
        tracking = replace(study.teacher_cfg.tracking, parent_run=parent.run_id or "")
        study.teacher_cfg = replace(study.teacher_cfg, tracking=tracking)
    teacher = timed("teacher", lambda: train_teacher(study, log))
    study.search = plan_students(cfg, study.out, teacher["curve"][-1]["step"])
    rows = timed("students", lambda: train_students(study, log))
    teacher_eval = timed("teacher_eval", lambda: score_teacher_table(study, log))
    names = [r.name for r in cfg.students.rows]
    scored = timed("rows_eval", lambda: [score_row(study, r, log) for r in in_order(names, rows)])
    results = assemble(study, teacher, teacher_eval, scored)
    paths = report.write_all(study, results, lambda p: sample_figure(study, results, p), log)
    report.close_parent(study, parent, results, paths)
    return results
