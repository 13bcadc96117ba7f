"""Reading a model from any source, and cmray's own model file.

A source is a cmray model file (``*.pt``), a checkpoint directory or URL (its first EMA copy),
or a local run directory (its newest complete checkpoint). Other layers teach
:func:`load_model` more sources with :func:`register_resolver`: ``cmray.tracking`` registers
MLflow's ``models:/`` and ``runs:/`` URIs when it is imported, so this layer never imports
MLflow, and every caller (the CLI, a CD run's teacher, evaluation actors, the MLflow pyfunc)
reads the same sources through one function.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import fsspec
import torch
from torch import nn

from cmray.config import ConfigError, from_dict, to_dict
from cmray.core.ema import EMABank
from cmray.models.build import build_model
from cmray.models.checkpoints import checkpoint_state, read_checkpoint_file
from cmray.models.config import ModelConfig
from cmray.storage import local_temp_beside, url_to_fs

MODEL_FORMAT = "cmray-model/2"  # /1 had the training config only; /2 adds the model config
READABLE_FORMATS = ("cmray-model/1", MODEL_FORMAT)

Resolver = Callable[[str], "str | None"]
_RESOLVERS: list[Resolver] = []


class ModelSourceError(ValueError):
    """A model source that cannot be read; the message is one line that names the source."""


def register_resolver(resolve: Resolver) -> None:
    """Accept more sources: ``resolve(source)`` returns a local path or URL that this module
    reads for the sources it knows, None for the rest, and raises ModelSourceError for a
    source it knows but cannot find."""
    if resolve not in _RESOLVERS:
        _RESOLVERS.append(resolve)


def resolve_source(source: str) -> str:
    for resolve in _RESOLVERS:
        found = resolve(source)
        if found is not None:
            return found
    return source


def one_line(exc: BaseException) -> str:
    """An exception as one line (storage and MLflow messages span several, with bodies)."""
    lines = [" ".join(line.split()) for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def locate_model(source: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The file behind a (resolved) source, without reading it; one-line errors."""
    try:
        if source.endswith(".pt"):
            fs, path = url_to_fs(source)
            if not fs.isfile(path):
                raise FileNotFoundError(f"no model file at {source}")
            return fs, path
        return checkpoint_state(source)
    except FileNotFoundError as exc:
        raise ModelSourceError(one_line(exc)) from None
    except Exception as exc:  # the storage's own errors: credentials, network, a bad URL
        raise ModelSourceError(f"{source}: {type(exc).__name__}: {one_line(exc)}") from None


def read_source(source: str) -> dict[str, Any]:
    """The file behind ``source``, read with ``weights_only``; one-line errors."""
    fs, path = locate_model(source)
    try:
        data = read_checkpoint_file(fs, path)
    except Exception as exc:  # torch's errors for a truncated or foreign file
        raise ModelSourceError(
            f"{source}: {path} is not a readable model or checkpoint file "
            f"({type(exc).__name__}: {one_line(exc)})"
        ) from None
    if not isinstance(data, dict):
        raise ModelSourceError(f"{source}: {path} holds a {type(data).__name__}, not a model")
    return data


def model_config_of(data: dict[str, Any], source: str) -> ModelConfig:
    """The model config a model file or checkpoint state carries (older files: derived from
    the training config they carry)."""
    fmt = data.get("format")
    if fmt is not None and fmt not in READABLE_FORMATS:
        raise ModelSourceError(
            f"{source}: model file format {fmt!r}; this cmray reads {', '.join(READABLE_FORMATS)}"
        )
    try:
        if "model" in data:
            return from_dict(ModelConfig, data["model"])
        return ModelConfig.from_training(data["config"])
    except (KeyError, TypeError, ConfigError) as exc:
        raise ModelSourceError(f"{source}: no usable model config ({one_line(exc)})") from None


def sampling_weights(data: dict[str, Any]) -> dict[str, torch.Tensor]:
    """A model file's weights, or a checkpoint's first EMA copy (its online net without EMA)."""
    if "weights" in data:
        return data["weights"]
    return EMABank.copy_state(data.get("ema") or {}) or data["online"]


def read_model(source: str) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """A source's model config and sampling weights, without building the network."""
    source = resolve_source(str(source))
    data = read_source(source)
    cfg = model_config_of(data, source)
    try:
        return cfg, sampling_weights(data)
    except KeyError as exc:
        raise ModelSourceError(f"{source}: holds no weights ({one_line(exc)})") from None


def load_model(
    source: str | os.PathLike[str], device: torch.device | str = "cpu"
) -> tuple[nn.Module, ModelConfig]:
    """A model, frozen and in eval mode, and its config, from any source (module docstring).

    The network is ``model(x, sigma)``: f_theta for CD/CT models, D for EDM teachers.
    """
    cfg, weights = read_model(str(source))
    net = build_model(cfg)
    try:
        net.load_state_dict(weights)
    except RuntimeError as exc:
        raise ModelSourceError(
            f"{source}: its weights do not fit its config ({one_line(exc)})"
        ) from None
    return net.requires_grad_(False).to(device).eval(), cfg


def write_model_file(
    path: str | os.PathLike[str],
    cfg: ModelConfig,
    weights: dict[str, torch.Tensor],
    training: dict[str, Any] | None = None,
    origin: dict[str, Any] | None = None,
) -> Path:
    """One file with the model config, the weights, and where the model came from: a run's
    resolved training config, or ``origin`` for an imported model. It is written beside
    ``path`` and renamed, so no reader sees half of it."""
    data: dict[str, Any] = {"format": MODEL_FORMAT, "model": to_dict(cfg), "weights": weights}
    if training is not None:
        data["config"] = training
    if origin is not None:
        data["origin"] = origin
    path = Path(path)
    with local_temp_beside(path) as tmp:
        torch.save(data, tmp)
    return path
