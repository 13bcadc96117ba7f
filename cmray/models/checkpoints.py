"""A training checkpoint, read as a model source: where its files are and when it is whole.

A checkpoint is a directory (``cmray.train.state`` writes it):

    state.pt             rank 0: online, target, EMA copies, optimizer, loss scaler, step, config
    rng-rank<r>.pt       each rank: CPU/CUDA generator states and the run's own generators
    complete-rank<r>.json  each rank, written after its files: their names and byte sizes

It is complete only when every rank's marker is present and every file it lists has the listed
size, so an upload cut short is never loaded. Files hold tensors and plain containers only,
and are read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import fsspec
import torch

from cmray.storage import is_local, url_to_fs

STATE_FILE = "state.pt"
# Where ``run_local`` keeps its checkpoints inside its run directory (Ray Train: the directory).
LOCAL_CHECKPOINTS = "checkpoints"
# Ours (``run_local``) and Ray Train's (``checkpoint_<timestamp>``) checkpoint directories.
CHECKPOINT_DIR = re.compile(r"^(step-\d{9}|checkpoint_.+)$")


class IncompleteCheckpointError(RuntimeError):
    """A checkpoint directory without every completion marker, or with a file cut short."""


def verify_checkpoint(directory: str | os.PathLike[str]) -> int:
    """The checkpoint's step if it is complete; ``IncompleteCheckpointError`` otherwise."""
    directory = Path(directory)
    first = directory / "complete-rank0.json"
    if not first.is_file():
        raise IncompleteCheckpointError(f"{directory} has no completion marker; not loading it")
    world = json.loads(first.read_text())["world_size"]
    for rank in range(world):
        marker_path = directory / f"complete-rank{rank}.json"
        if not marker_path.is_file():
            raise IncompleteCheckpointError(f"{directory} lacks rank {rank}'s marker")
        for name, size in json.loads(marker_path.read_text())["files"].items():
            path = directory / name
            if not path.is_file() or path.stat().st_size != size:
                raise IncompleteCheckpointError(f"{path} is missing or not {size} bytes")
    return json.loads(first.read_text())["step"]


def checkpoint_name(step: int) -> str:
    return f"step-{step:09d}"


def latest_checkpoint(root: str | os.PathLike[str]) -> Path | None:
    """The complete checkpoint with the highest step under ``root`` (a run directory).

    Incomplete ones (a marker or a file missing, a file cut short) are passed over.
    """
    root = Path(root)
    if not root.is_dir():
        return None
    best: tuple[int, Path] | None = None
    for path in root.iterdir():
        if not (path.is_dir() and CHECKPOINT_DIR.match(path.name)):
            continue
        try:
            step = verify_checkpoint(path)
        except IncompleteCheckpointError:
            continue
        if best is None or step > best[0]:
            best = (step, path)
    return None if best is None else best[1]


def checkpoint_at(root: str | os.PathLike[str], step: int) -> Path | None:
    """The complete checkpoint of ``step`` under ``root`` (a local run directory), if kept."""
    root = Path(root)
    for path in sorted(root.iterdir()) if root.is_dir() else []:
        if path.is_dir() and CHECKPOINT_DIR.match(path.name):
            try:
                if verify_checkpoint(path) == step:
                    return path
            except IncompleteCheckpointError:
                continue
    return None


def checkpoint_state(source: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """Where the state file of ``source`` is: a checkpoint (path or URL) or a local run
    directory's newest complete checkpoint. FileNotFoundError names what was looked for."""
    fs, path = url_to_fs(source.rstrip("/") + "/" + STATE_FILE)
    if not fs.exists(path) and "://" not in source:  # a local run directory: its newest
        # The same run directory works for a Ray Train run and a `train.py --local` one.
        newest = latest_checkpoint(source) or latest_checkpoint(Path(source) / LOCAL_CHECKPOINTS)
        if newest is not None:
            fs, path = url_to_fs(str(newest / STATE_FILE))
    if not fs.exists(path):
        raise FileNotFoundError(f"no checkpoint at {source} (looked for {path})")
    return fs, path


def read_checkpoint_file(fs: fsspec.AbstractFileSystem, path: str) -> dict[str, Any]:
    """A saved state or model file. A local file is memory-mapped so that only the tensors
    used are read: an EDM teacher's checkpoint holds the online and EMA nets and the
    optimizer's two moments, about 8 GB at 256x256, of which sampling needs one EMA copy."""
    if is_local(fs):
        try:
            return torch.load(path, weights_only=True, map_location="cpu", mmap=True)
        except (OSError, RuntimeError):  # a mount that cannot map files (some FUSE): read it
            pass
    with fs.open(path, "rb") as fh:
        return torch.load(fh, weights_only=True, map_location="cpu")
