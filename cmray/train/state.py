"""Everything a run needs to continue, and its one save/load pair (edm2's ``CheckpointIO`` idea).

The checkpoint directory's layout, and how a complete one is recognised, are the model layer's
(``cmray.models.checkpoints``): evaluation and sampling read checkpoints too. The data position
is not stored: it is a function of the step (``data_position``), as the shuffle order is of
(seed, epoch), and the noise of (seed, step, position in the global batch); so a checkpoint
resumes at any world size.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cmray.core.ema import EMABank
from cmray.models.checkpoints import (  # noqa: F401 - the layout, re-exported for writers
    CHECKPOINT_DIR,
    LOCAL_CHECKPOINTS,
    STATE_FILE,
    IncompleteCheckpointError,
    checkpoint_name,
    latest_checkpoint,
    verify_checkpoint,
)
from cmray.storage import local_temp_beside


@dataclass
class TrainState:
    """The online net, its target, EMA copies, optimizer and step."""

    online: nn.Module
    target: nn.Module | None
    ema: EMABank
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None
    step: int = 0
    skipped_steps: int = 0
    nonfinite_run: int = 0
    config: dict[str, Any] = field(default_factory=dict)

    def shared_state(self) -> dict[str, Any]:
        """What every rank holds identically; rank 0 saves it."""
        return {
            "step": self.step,
            "skipped_steps": self.skipped_steps,
            "nonfinite_run": self.nonfinite_run,
            "online": unwrap(self.online).state_dict(),
            "target": None if self.target is None else self.target.state_dict(),
            "ema": self.ema.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": None if self.scaler is None else self.scaler.state_dict(),
            "config": self.config,
        }

    def rank_state(self) -> dict[str, Any]:
        """What differs between ranks: the global generators (dropout). Noise and noise levels
        are drawn per sample from (seed, step, position), so they need no saved state."""
        cuda = [torch.cuda.get_rng_state(i) for i in range(torch.cuda.device_count())]
        return {
            "torch": torch.get_rng_state(),
            "cuda": cuda,
            "python": random.getstate(),
        }

    def load_shared(self, data: dict[str, Any]) -> None:
        unwrap(self.online).load_state_dict(data["online"])
        if self.target is not None:
            self.target.load_state_dict(data["target"])
        self.ema.load_state_dict(data["ema"])
        self.optimizer.load_state_dict(data["optimizer"])
        if self.scaler is not None and data["scaler"] is not None:
            self.scaler.load_state_dict(data["scaler"])
        self.step, self.skipped_steps = data["step"], data["skipped_steps"]
        self.nonfinite_run = data["nonfinite_run"]

    def load_rank(self, data: dict[str, Any]) -> None:
        torch.set_rng_state(data["torch"])
        for i, state in enumerate(data["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(state, i)
        random.setstate(_as_random_state(data["python"]))


def unwrap(module: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel wrapper (or the module itself)."""
    return module.module if hasattr(module, "module") else module


def _as_random_state(state: Any) -> tuple:
    # torch.load gives lists back where random.getstate() had tuples.
    version, internal, gauss = state
    return version, tuple(internal), gauss


def data_position(step: int, batches_per_epoch: int) -> tuple[int, int]:
    """(epoch, batch within it) where the stream stands after ``step`` steps, one batch each."""
    return step // batches_per_epoch, step % batches_per_epoch


# --------------------------------------------------------------------------------- files


def _save(obj: Any, path: Path) -> int:
    with local_temp_beside(path) as tmp:
        torch.save(obj, tmp)
    return path.stat().st_size


def save_checkpoint(
    state: TrainState, directory: str | os.PathLike[str], rank: int, world_size: int
) -> Path:
    """Write this rank's part of a checkpoint; the marker goes last."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    files = {}
    if rank == 0:
        files[STATE_FILE] = _save(state.shared_state(), directory / STATE_FILE)
    files[f"rng-rank{rank}.pt"] = _save(state.rank_state(), directory / f"rng-rank{rank}.pt")
    marker = {"step": state.step, "rank": rank, "world_size": world_size, "files": files}
    with local_temp_beside(directory / f"complete-rank{rank}.json") as tmp:
        Path(tmp).write_text(json.dumps(marker))
    return directory


def load_checkpoint(state: TrainState, directory: str | os.PathLike[str], rank: int) -> int:
    """Restore ``state`` from a complete checkpoint; returns its step."""
    directory = Path(directory)
    step = verify_checkpoint(directory)
    state.load_shared(torch.load(directory / STATE_FILE, weights_only=True, map_location="cpu"))
    rng_file = directory / f"rng-rank{rank}.pt"
    if rng_file.is_file():  # absent on ranks the saving run did not have: dropout reseeded
        state.load_rank(torch.load(rng_file, weights_only=True))
    return step
