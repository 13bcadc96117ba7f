"""What the reproduction study writes, for either suite: results.json, the Table 2 style table,
the sample figure (one panel per row, same noise), the figure-against-NFE plot, and the MLflow
records (one parent run for the study; the teacher and every row are its children).

Everything here reads the results dict; the suites fill it with their own figure (fd_digits or
the energy distance) and mark the teacher's entry the ratios are taken against.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch

from cmray.config import dump_yaml
from cmray.storage import write_bytes_atomic

Log = Callable[[str], None]
GRID_PANEL = 16  # images per row's panel in the digits' samples.png (4 x 4)

# The columns after the figure and its ratio: (results key, header, format).
IMAGE_COLUMNS = [
    ("score", "{score} ↑", "{:.2f}"),
    ("precision", "precision ↑", "{:.2f}"),
    ("recall", "recall ↑", "{:.2f}"),
]
COLUMNS = {
    "digits": IMAGE_COLUMNS,
    "fashion": IMAGE_COLUMNS,
    "ring": [
        ("mmd", "MMD ↓", "{:.4f}"),
        ("on_mode", "on a mode ↑", "{:.3f}"),
        ("modes_hit", "modes hit", "{}"),
    ],
}
# The targets per suite: (name, row filter, NFE, limit), ratios to the teacher's baseline.
# Images (digits, Fashion-MNIST): every method against the teacher at 35 NFE, the limits of the
# teacher-free recipes issue; the ring: the 2D tutorial's.
IMAGE_TARGETS = [
    ("one-step CD within 1.5x of the teacher", "cd", 1, 1.5),
    ("two-step CD within 1.2x of the teacher", "cd", 2, 1.2),
    ("one-step ECT within 2x of the teacher", "ect", 1, 2.0),
    ("one-step sCT within 2x of the teacher", "sct", 1, 2.0),
    ("two-step sCT within 1.3x of the teacher", "sct", 2, 1.3),
    ("one-step sCD within 2x of the teacher", "scd", 1, 2.0),
    ("two-step sCD within 1.3x of the teacher", "scd", 2, 1.3),
    ("one-step iCT (from scratch) within 3x of the teacher", "ict", 1, 3.0),
    ("one-step CT (the paper's, from scratch) within 5x of the teacher", "ct", 1, 5.0),
]
TARGETS = {
    "digits": IMAGE_TARGETS,
    "fashion": IMAGE_TARGETS,
    "ring": [
        ("one-step CD within 1.5x of the teacher", "cd", 1, 1.5),
        ("best CT-family one-step within 1.5x of the teacher", "ct-family", 1, 1.5),
    ],
}
PAPER_CT_RIVALS = ("ect", "sct", "scd")


class StudyLike(Protocol):
    """What the report needs of either suite's study."""

    cfg: Any
    out: Path
    search: Any
    metric: str
    timings: dict[str, float]
    runs: dict[str, str]  # each row's Train run (its MLflow run key)


# --------------------------------------------------------------------------- results


def baseline(results: dict[str, Any]) -> dict[str, Any]:
    """The teacher's entry the ratios are taken against (35 NFE on digits, 99 on the ring)."""
    return next(r for r in results["teacher"]["results"] if r.get("baseline"))


def _by_nfe(entry: dict[str, Any], nfe: int) -> dict[str, Any] | None:
    return next((r for r in entry.get("results", []) if r["nfe"] == nfe), None)


def ratio(value: float, base: float) -> float:
    return value / base if base and math.isfinite(value) else math.nan


def add_ratios(results: dict[str, Any]) -> dict[str, Any]:
    """Every sampler's figure over the teacher's baseline, and the targets."""
    metric, base = results["metric"], baseline(results)[results["metric"]]
    for entry in results["teacher"]["results"]:
        entry["ratio_to_teacher"] = ratio(entry[metric], base)
    for row in results["rows"]:
        for entry in row.get("results", []):
            entry["ratio_to_teacher"] = ratio(entry[metric], base)
    results["targets"] = targets(results)
    return results


def _best(rows: list[dict[str, Any]], nfe: int, metric: str, keep: Callable) -> float:
    values = [e[metric] for r in rows if keep(r) for e in [_by_nfe(r, nfe)] if e is not None]
    return min(values, default=math.nan)


def _teacher_at(results: dict[str, Any], nfe: int) -> dict[str, Any] | None:
    return next((r for r in results["teacher"]["results"] if r["nfe"] == nfe), None)


def _keep(which: str) -> Callable[[dict[str, Any]], bool]:
    if which == "ct-family":
        return lambda r: r["family"] == "ct"
    return lambda r: r["method"] == which


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The suite's targets: measured and recorded, never asserted by a timed test."""
    metric, rows = results["metric"], results["rows"]
    base = baseline(results)[metric]
    # A suite without a method (the fashion suite has no paper's CT) has no target for it.
    ran = {r["method"] for r in rows} | {"ct-family"}
    found = [
        (name, ratio(_best(rows, nfe, metric, _keep(which)), base), limit)
        for name, which, nfe, limit in TARGETS[results["suite"]]
        if which in ran
    ]
    paper_ct = _best(rows, 1, metric, _keep("ct"))
    for method in (m for m in PAPER_CT_RIVALS if m in ran and "ct" in ran):
        value = ratio(_best(rows, 1, metric, _keep(method)), paper_ct)
        found.append((f"{method.upper()} one-step better than the paper's CT", value, 1.0))
    own_one_step = _teacher_at(results, 1)
    if results["suite"] != "ring" and own_one_step is not None and "ect" in ran:
        # ECT starts from the teacher: its one step must beat the teacher's own one step.
        value = ratio(_best(rows, 1, metric, _keep("ect")), own_one_step[metric])
        found.append(("one-step ECT better than its teacher's one step", value, 1.0))
    return [
        {"target": t, "value": v, "limit": lim, "met": bool(v < lim) if math.isfinite(v) else None}
        for t, v, lim in found
    ]


def compare_line(report: dict[str, Any], study: dict[str, Any], where: str) -> str:
    """One line for a person: an evaluation's one- and n-step figures beside a study's teacher
    (its baseline sampler) and real against real, all scored the same way."""
    metric = report["features"]["frechet"]
    if study.get("metric") != metric:
        raise ValueError(f"{where} reports {study.get('metric')}, this evaluation {metric}")
    mine = ", ".join(f"{r['nfe']}-step {r[metric]:.1f}" for r in report["results"])
    base = baseline(study)
    floor = report["reference"]["split_half_frechet"]
    return (
        f"{metric}: {mine} | the study's teacher at {base['nfe']} NFE ({where}): "
        f"{base[metric]:.1f} | real against real: {floor:.2f}"
    )


# --------------------------------------------------------------------------- the table


def _cells(entry: dict[str, Any], results: dict[str, Any]) -> str:
    metric = results["metric"]
    cells = [f"{entry[metric]:.4g}", f"{entry['ratio_to_teacher']:.2f}x"]
    for key, _, fmt in COLUMNS[results["suite"]]:
        cells.append(fmt.format(entry[results.get(key, key)]))
    return " | ".join(cells)


def table(results: dict[str, Any]) -> str:
    """Markdown in the shape of the paper's Table 2: method, NFE, figure, and the ratio."""
    metric, base = results["metric"], baseline(results)
    extra = [h.format(**results) for _, h, _ in COLUMNS[results["suite"]]]
    head = ["Method", "NFE", f"{metric} ↓", f"vs teacher ({base['nfe']} NFE)", *extra]
    blank = " |" * (len(head) - 3)
    lines = [
        "| " + " | ".join(head) + " |",
        "|---|" + "---:|" * (len(head) - 1),
        f"| {results['floor_name']} | – | {results['floor']:.4g} |{blank}",
    ]
    for t in sorted(results["teacher"]["results"], key=lambda e: -e["nfe"]):
        lines.append(f"| Teacher, {t['sampler']} | {t['nfe']} | {_cells(t, results)} |")
    for r in results["rows"]:
        if r["status"] == "error":
            lines.append(f"| {r['name']} | – | failed: {r['error']} |{blank}")
            continue
        for e in r["results"]:
            lines.append(f"| {r['name']} | {e['nfe']} | {_cells(e, results)} |")
    return "\n".join(lines) + "\n"


def budgets(results: dict[str, Any]) -> list[str]:
    """Each row's budget in training images seen and its training wall time (a Tune trial's
    time on this machine; every row on one CPU), where the suite records them."""
    rows = [r for r in results["rows"] if "images" in r]
    if not rows:
        return []
    lines = ["", "| Row | training images | training wall time |", "|---|---:|---:|"]
    for r in rows:
        wall = f"{r['train_s'] / 60:.1f} min" if math.isfinite(r.get("train_s", math.nan)) else "–"
        lines.append(f"| {r['name']} | {r['images']:,} | {wall} |")
    return lines


def summary(results: dict[str, Any]) -> str:
    """The budget, the teacher's convergence and the targets, under the table."""
    t, metric = results["teacher"], results["metric"]
    curve = ", ".join(f"{c['step']}: {c[metric]:.4g}" for c in t["curve"])
    state = "levelled off" if t["converged"] else "still improving at its limit"
    lines = [
        results["budget_line"],
        f"Teacher: {metric} of its baseline sampler by training step: {curve} ({state}).",
        *budgets(results),
        "",
        "| Target | Measured | Limit | Met |",
        "|---|---:|---:|---|",
    ]
    for g in results["targets"]:
        met = {True: "yes", False: "no", None: "–"}[g["met"]]
        lines.append(f"| {g['target']} | {g['value']:.2f} | {g['limit']:.2f} | {met} |")
    timings = ", ".join(f"{k} {v:.0f} s" for k, v in results["timings_s"].items())
    lines += ["", f"Wall time on this machine: {timings}."]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- figures


def save_images(path: Path, images: list[torch.Tensor]) -> None:
    """A row's kept samples (per sampler), for the study's figure on a re-run too."""
    buffer = io.BytesIO()
    torch.save([i[:GRID_PANEL].clone() for i in images], buffer)
    write_bytes_atomic(str(path), buffer.getvalue())


def load_images(path: Path) -> list[torch.Tensor]:
    return torch.load(path, weights_only=True) if path.is_file() else []


def image_panels(
    results: dict[str, Any], teacher: list[torch.Tensor], rows: dict[str, list[torch.Tensor]]
) -> list[tuple[str, torch.Tensor]]:
    """(title, uint8 images): the teacher's baseline, then each finished row's one step."""
    metric, base = results["metric"], baseline(results)
    panels = []
    for entry, images in zip(results["teacher"]["results"], teacher, strict=False):
        if entry is base:
            panels.append((f"teacher, {entry['nfe']} NFE\n{metric} {entry[metric]:.1f}", images))
    for r in results["rows"]:
        if r["status"] != "error" and rows.get(r["name"]):
            one = r["results"][0]
            panels.append((f"{r['name']}, 1 step\n{metric} {one[metric]:.1f}", rows[r["name"]][0]))
    return panels


def image_figure(panels: list[tuple[str, torch.Tensor]], path: Path) -> Path:
    """One 4 x 4 grid per panel, all from the same noise."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from cmray.eval.images import grid_array

    cols = min(4, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3.6 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (title, images) in zip(axes.flat, panels, strict=False):
        ax.imshow(grid_array(images.float().div(127.5).sub(1)))
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def nfe_plot(results: dict[str, Any], path: Path) -> Path:
    """The figure against NFE: the teacher's curve, each row's one and two steps, the floor."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = results["metric"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    teacher = sorted(results["teacher"]["results"], key=lambda e: e["nfe"])
    nfe = [e["nfe"] for e in teacher]
    ax.plot(nfe, [e[metric] for e in teacher], "k-o", label="teacher")
    for r in results["rows"]:
        if r["status"] != "error":
            points = sorted(r["results"], key=lambda e: e["nfe"])
            ax.plot([e["nfe"] for e in points], [e[metric] for e in points], "-s", label=r["name"])
    if results["floor"] > 0:
        ax.axhline(results["floor"], color="gray", ls="--", label=results["floor_name"])
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("NFE (network evaluations per sample)")
    ax.set_ylabel(f"{metric} (lower is better)")
    ax.legend(fontsize=7, loc="upper right")
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_all(
    study: StudyLike, results: dict[str, Any], samples: Callable[[Path], Path], log: Log
) -> list[Path]:
    """results.json, table.md, samples.png (drawn by ``samples``) and nfe.png."""
    out = study.out
    write_bytes_atomic(str(out / "results.json"), (json.dumps(results, indent=2) + "\n").encode())
    text = table(results) + "\n" + summary(results)
    write_bytes_atomic(str(out / "table.md"), text.encode())
    paths = [out / "results.json", out / "table.md", samples(out / "samples.png")]
    paths.append(nfe_plot(results, out / "nfe.png"))
    log(text)
    for p in paths:
        log(f"wrote {p}")
    return paths


# --------------------------------------------------------------------------- MLflow


def open_parent(study: StudyLike) -> Any:
    """The study's MLflow run, keyed by the rows' search's path: the search finds the same
    run, so the rows' trials nest under it; returns the tracker (None without MLflow)."""
    if not study.cfg.tracking.enabled:
        return None
    from cmray.tracking import Tracker

    tracker = Tracker(_quiet(study), study.cfg.name, study.search.root)
    tracker.started(timeout=180.0)
    tracker.log_text(dump_yaml(study.cfg), "study.yaml")
    return tracker


def log_row(study: StudyLike, row: dict[str, Any]) -> None:
    """A row's scores on its own (child) MLflow run."""
    if not study.cfg.tracking.enabled or row["status"] == "error":
        return
    from cmray.tracking import Tracker

    metrics = {}
    for e in row["results"]:
        for key in (study.metric, "ratio_to_teacher"):
            metrics[f"eval_{e['nfe']}step_{key}"] = e[key]
    tracker = Tracker(_quiet(study), row["name"], study.runs[row["name"]])
    tracker.log_metrics(_finite(metrics), 0)
    tracker.close()


def close_parent(
    study: StudyLike, tracker: Any, results: dict[str, Any], paths: list[Path]
) -> None:
    """The rows' scores on their runs; the study's figures, table and results on its own."""
    if tracker is None:
        return
    from cmray.experiments.reproduce import slug

    for row in results["rows"]:
        log_row(study, row)
    metric = results["metric"]
    metrics = {"floor": results["floor"], "teacher_baseline": baseline(results)[metric]}
    for r in results["rows"]:
        for e in r.get("results", []):
            metrics[f"{slug(r['name'])}_{e['nfe']}step"] = e[metric]
    tracker.log_metrics(_finite(metrics), 0)
    for path in paths:
        tracker.submit(lambda c, r, p=str(path): c.log_artifact(r, p))
    tracker.close()


def _quiet(study: StudyLike) -> Any:
    """The study's tracking without a system-metrics monitor: these runs only take results
    (the rows' and the teacher's own runs monitor their training)."""
    from dataclasses import replace

    return replace(study.cfg.tracking, system_metrics=False)


def _finite(metrics: dict[str, float]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if math.isfinite(float(v))}
