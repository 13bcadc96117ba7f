"""The ``cmray`` command: config checking, the 2D experiment, editing, evaluation, sampling,
model retrieval, and submitting pipelines as Ray jobs."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import cmray
from cmray.config import add_config_args, config_from_args, dump_yaml, exit_on_config_error
from cmray.data.config import PrepareConfig
from cmray.models import MODEL_BATCH
from cmray.train.config import TrainConfig
from cmray.train.toy_config import Toy2DConfig
from cmray.tune.config import TuneConfig

SCHEMAS = {
    "toy2d": Toy2DConfig,
    "train": TrainConfig,
    "tune": TuneConfig,
    "prepare-data": PrepareConfig,
}


def _config_command(args: argparse.Namespace) -> int:
    """Validate a config and print it resolved: the check to run before submitting a job."""
    sys.stdout.write(dump_yaml(config_from_args(SCHEMAS[args.schema], args)))
    return 0


def _toy2d_command(args: argparse.Namespace) -> int:
    import torch

    from cmray.experiments import toy2d

    cfg = config_from_args(Toy2DConfig, args)
    torch.set_num_threads(1)
    toy2d.run(cfg, args.out)
    return 0


def _edit_command(args: argparse.Namespace) -> int:
    import cmray.tracking  # noqa: F401 - registers MLflow model URIs as model sources
    from cmray.eval.images import save_grid
    from cmray.experiments.edit import run_edit
    from cmray.models import load_model

    try:
        f, cfg = load_model(args.model)
        panels = run_edit(
            f,
            args.task,
            cfg.net.resolution,
            args.input,
            args.mask,
            args.sigmas,
            args.factor,
            args.sigma,
            args.seed,
            clip=not args.no_clip,
            eps=cfg.boundary,
        )
    except (OSError, ValueError) as exc:
        print(f"edit error: {exc}", file=sys.stderr)
        return 2
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_grid(panels, args.out)
    print(f"wrote {args.out}")
    return 0


def _add_edit_parser(sub: argparse._SubParsersAction) -> None:
    from cmray.experiments.edit import DEFAULT_SIGMAS, TASKS

    edit = sub.add_parser("edit", help="zero-shot editing with a trained model (Algorithm 4)")
    edit.add_argument(
        "--model", required=True, help="models:/NAME@ALIAS, checkpoint directory or URL"
    )
    edit.add_argument("--task", required=True, choices=TASKS)
    edit.add_argument("--input", help="image file (PNG/JPEG); resized to the model's size")
    edit.add_argument("--mask", help="inpaint: mask image, white = the region to fill")
    edit.add_argument(
        "--sigmas",
        type=float,
        nargs="+",
        default=list(DEFAULT_SIGMAS),
        help="descending noise levels t_1 > ... > t_N of Algorithm 4",
    )
    edit.add_argument("--factor", type=int, default=4, help="super_resolution: scale factor")
    edit.add_argument("--sigma", type=float, default=0.5, help="denoise: the noise level")
    edit.add_argument("--seed", type=int, default=0)
    edit.add_argument(
        "--no-clip",
        action="store_true",
        help="do not clamp each denoised estimate to [-1, 1] before the projection",
    )
    edit.add_argument("--out", required=True, type=Path, help="output PNG (panels side by side)")
    edit.set_defaults(run=_edit_command)


def _eval_command(args: argparse.Namespace) -> int:
    from cmray.eval import evaluate as ev
    from cmray.eval.config import EvalConfig

    cfg = config_from_args(EvalConfig, args)
    try:
        if getattr(args, "compare", None) and not Path(args.compare).is_file():
            raise FileNotFoundError(f"--compare {args.compare}: no such results.json")
        ev.preflight(cfg, with_model=args.action == "run")
        if args.action == "ref-stats":
            stats = ev.compute_ref_stats(cfg)
            print(f"{stats.count} images; two halves: {stats.split_half:.3f}")
            return 0
        report = ev.evaluate(cfg)
    except (OSError, ValueError) as exc:
        print(f"eval error: {exc}", file=sys.stderr)
        return 2
    print("\n".join(ev.summary_lines(report)))
    print(f"wrote {cfg.out}/eval.json and {cfg.out}/samples.png")
    if getattr(args, "compare", None):
        import json

        from cmray.experiments.reproduce_report import compare_line

        study = json.loads(Path(args.compare).read_text())
        print(compare_line(report, study, args.compare))
    return 0


def _add_eval_parser(sub: argparse._SubParsersAction) -> None:
    evaluate = sub.add_parser(
        "eval",
        help="sample quality: reference statistics, FID/IS/precision/recall (as "
        "pipelines/evaluate.py)",
    )
    evaluate.add_argument(
        "action",
        choices=("ref-stats", "run"),
        help="ref-stats: featurize the dataset's real images and save the statistics beside "
        "its manifest; run: score one-step and multistep samples of a model",
    )
    add_config_args(evaluate)
    evaluate.add_argument(
        "--compare",
        metavar="RESULTS",
        help="a reproduction study's results.json: print this model's figures beside its "
        "teacher's and real against real (make demo: docs/reproduce/digits/results.json)",
    )
    evaluate.set_defaults(run=_eval_command)


def _count(text: str) -> int:
    """An argparse type: an integer of at least 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: accepted: an integer >= 1")
    return value


# The paper's two-step choices: the middle grid index for LSUN CD (N = 40) and CT (N = 151).
TWO_STEP_INDEX = {40: 17, 151: 67}


def _sample_command(args: argparse.Namespace) -> int:
    import torch

    import cmray.tracking  # noqa: F401 - registers MLflow model URIs as model sources
    from cmray.core.sampling import class_labels, in_batches
    from cmray.eval.images import sample_format, save_samples
    from cmray.models import load_model

    try:
        sample_format(args.out)
        f, cfg = load_model(args.model, args.device)
    except (OSError, ValueError) as exc:
        print(f"sample error: {exc}", file=sys.stderr)
        return 2
    net = cfg.net
    shape = (args.num, net.in_channels, net.resolution, net.resolution)
    gen = torch.Generator().manual_seed(args.seed)
    z = torch.randn(shape, generator=gen).to(args.device)
    try:
        labels = class_labels(net.num_classes, args.num, args.class_label, gen)
    except ValueError as exc:
        print(f"sample error: {exc}", file=sys.stderr)
        return 2
    f = in_batches(f, args.batch, None if labels is None else labels.to(args.device))
    x, nfe = _draw(f, cfg, z, gen, args)
    try:
        fmt = save_samples(x.cpu(), args.out)
    except (OSError, ValueError) as exc:
        print(f"sample error: {exc}", file=sys.stderr)
        return 2
    what = {"grid": "a grid", "npz": "arr_0, N x H x W x C uint8", "pngs": "one PNG each"}[fmt]
    print(f"wrote {args.num} samples ({nfe} NFE each) to {args.out} ({what})")
    return 0


def _draw(f: Any, cfg: Any, z: Any, gen: Any, args: argparse.Namespace) -> tuple[Any, int]:
    """Algorithm 1 for a consistency model; EDM's Heun sampler (35 NFE) for a teacher."""
    from cmray.core.sampling import sample_multistep, sample_teacher_ode
    from cmray.core.schedules import karras_sigmas

    noise = cfg.noise
    if not cfg.is_consistency:
        grid = karras_sigmas(args.points, noise.sigma_min, noise.sigma_max, noise.rho)
        result = sample_teacher_ode(f, z, grid.to(z.device), "heun", to_zero=True)
        return result.x.clamp(-1, 1), result.nfe
    taus = args.taus or (_two_step_taus(cfg) if args.steps == 2 else [])
    result = sample_multistep(f, z, taus, gen, cfg.boundary, noise.sigma_max, clip=(-1, 1))
    return result.x, result.nfe


def _two_step_taus(cfg: Any) -> list[float]:
    """The published middle level: sCM's sigma_d tan(1.1), ECT's 0.821, or CD/CT's grid index."""
    from cmray.core.sampling import taus_from_indices

    fixed = cfg.two_step_sigma()
    if fixed is not None:
        return [fixed]
    noise, N = cfg.noise, cfg.N or 40
    middle = TWO_STEP_INDEX.get(N, round(17 / 39 * (N - 1)))
    return taus_from_indices([0, middle, N - 1], N, noise.sigma_min, noise.sigma_max, noise.rho)


def _fetch_command(args: argparse.Namespace) -> int:
    from cmray.tracking.config import is_mlflow_uri

    if not is_mlflow_uri(args.model):
        print(
            f"fetch error: {args.model!r} is not an MLflow model URI (models:/NAME@ALIAS, "
            "models:/NAME/VERSION or runs:/RUN_ID/model)",
            file=sys.stderr,
        )
        return 2
    from cmray.models.files import one_line
    from cmray.tracking.models import fetch_model

    try:
        path = fetch_model(args.model, args.out)
    except Exception as exc:  # MLflow raises its own types for unknown names and versions
        print(f"fetch error: {args.model}: {one_line(exc)}", file=sys.stderr)
        return 2
    print(f"model file: {path}")
    return 0


def _submit_command(args: argparse.Namespace) -> int:
    from cmray.jobs import follow_hint, parse_env, submit

    env = parse_env(args.env or ())
    job_id = submit(
        args.pipeline, args.address, args.config, args.overrides or (), args.working_dir, env
    )
    print(f"submitted {args.pipeline} as Ray job {job_id}\n{follow_hint(args.address, job_id)}")
    return 0


def _add_submit_parser(sub: argparse._SubParsersAction) -> None:
    from cmray.jobs import PIPELINES

    submit = sub.add_parser(
        "submit",
        help="check a config, then run its pipeline as a Ray job (wraps ray job submit)",
    )
    submit.add_argument("pipeline", choices=list(PIPELINES), help="which pipeline to run")
    submit.add_argument(
        "--address",
        default=os.environ.get("RAY_ADDRESS") or None,
        required=not os.environ.get("RAY_ADDRESS"),
        help="the cluster's job server, http://HEAD:8265 (default: $RAY_ADDRESS)",
    )
    submit.add_argument("--config", required=True, help="the pipeline's YAML config")
    submit.add_argument(
        "--set", dest="overrides", metavar="KEY=VALUE", action="append", help="config overrides"
    )
    submit.add_argument(
        "--working-dir", default=".", help="uploaded as the job's working directory"
    )
    submit.add_argument(
        "--env", metavar="KEY=VALUE", action="append", help="environment variable for the job"
    )
    submit.set_defaults(run=_submit_command)


def _add_model_parsers(sub: argparse._SubParsersAction) -> None:
    sample = sub.add_parser("sample", help="one- or few-step samples from a model, as a PNG grid")
    sample.add_argument("--model", required=True, help="models:/NAME@ALIAS, checkpoint or file")
    sample.add_argument("--steps", type=int, choices=(1, 2), default=1)
    sample.add_argument("--taus", type=float, nargs="+", help="multistep taus (Algorithm 1)")
    sample.add_argument(
        "--points",
        type=_count,
        default=18,
        help="EDM teachers: Karras points of the Heun solve (18: 35 NFE, as EDM)",
    )
    sample.add_argument("--num", type=_count, default=64)
    sample.add_argument(
        "--batch", type=_count, default=MODEL_BATCH, help="images per network call (GPU memory)"
    )
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--device", default="cpu", help="cpu or cuda")
    sample.add_argument(
        "--out",
        required=True,
        help="FILE.png: one grid; FILE.npz: arr_0 as N x H x W x C uint8 (openai's reference "
        "evaluator); DIR/: one PNG per sample (EDM's fid.py, clean-fid, torch-fidelity)",
    )
    sample.set_defaults(run=_sample_command)
    sample.add_argument(
        "--class",
        dest="class_label",
        type=int,
        help="class-conditional models: every sample of this class (default: uniform classes)",
    )
    fetch = sub.add_parser("fetch", help="download a model from the MLflow registry")
    fetch.add_argument("--model", required=True, help="models:/NAME@ALIAS or models:/NAME/3")
    fetch.add_argument("--out", required=True, type=Path)
    fetch.set_defaults(run=_fetch_command)


def _import_command(args: argparse.Namespace) -> int:
    from cmray.models import ModelSourceError

    if args.format == "openai":
        from cmray.models.openai import import_openai as convert
    else:
        from cmray.models.diffusers import import_diffusers as convert
    try:
        path, cfg = convert(args.source, args.out, args.kind)
    except (OSError, ModelSourceError) as exc:
        print(f"import error: {exc}", file=sys.stderr)
        return 2
    classes = f", {cfg.net.num_classes} classes" if cfg.net.num_classes else ""
    print(f"wrote {path}: a {cfg.kind} model, {cfg.net.resolution}x{cfg.net.resolution}{classes}")
    return 0


def _add_import_parser(sub: argparse._SubParsersAction) -> None:
    imp = sub.add_parser("import", help="convert someone else's model into a cmray model file")
    formats = imp.add_subparsers(dest="format", required=True)
    openai = formats.add_parser("openai", help="a released openai/consistency_models .pt file")
    openai.add_argument("source", help="edm_*.pt, cd_*.pt or ct_*.pt (a path or URL)")
    pipeline = formats.add_parser(
        "diffusers", help="a ConsistencyModelPipeline directory (the hub's openai/diffusers-*)"
    )
    pipeline.add_argument("source", help="the directory, with unet/ and scheduler/")
    for fmt, kinds in ((openai, ("edm", "cd", "ct")), (pipeline, ("cd", "ct"))):
        fmt.add_argument("--out", required=True, type=Path, help="the cmray model file to write")
        fmt.add_argument("--kind", choices=kinds, help="what the model is (default: from the name)")
        fmt.set_defaults(run=_import_command)
    export = sub.add_parser("export", help="write a cmray model in another library's format")
    targets = export.add_subparsers(dest="format", required=True)
    to_diffusers = targets.add_parser(
        "diffusers", help="a directory ConsistencyModelPipeline.from_pretrained loads"
    )
    to_diffusers.add_argument(
        "--model", required=True, help="models:/NAME@ALIAS, checkpoint or file"
    )
    to_diffusers.add_argument("--out", required=True, type=Path, help="the directory to write")
    to_diffusers.set_defaults(run=_export_command)


def _export_command(args: argparse.Namespace) -> int:
    import cmray.tracking  # noqa: F401 - registers MLflow model URIs as model sources
    from cmray.models import ModelSourceError
    from cmray.models.diffusers import export_diffusers

    try:
        out = export_diffusers(args.model, args.out)
    except (OSError, ModelSourceError) as exc:
        print(f"export error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {out}: ConsistencyModelPipeline.from_pretrained({str(out)!r}) loads it")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cmray", description="Consistency models on Ray.")
    parser.add_argument("--version", action="version", version=f"cmray {cmray.__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("config", help="validate a config and print it resolved")
    check.add_argument("schema", choices=sorted(SCHEMAS), help="which experiment the file is for")
    add_config_args(check)
    check.set_defaults(run=_config_command)
    toy = sub.add_parser("toy2d", help="run the 2D experiment (as pipelines/toy2d.py)")
    add_config_args(toy)
    toy.add_argument("--out", required=True, type=Path, help="output directory")
    toy.set_defaults(run=_toy2d_command)
    _add_edit_parser(sub)
    _add_eval_parser(sub)
    _add_model_parsers(sub)
    _add_submit_parser(sub)
    _add_import_parser(sub)
    return parser


@exit_on_config_error
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
