"""Training on a real local Ray: two DDP workers, one signalled then killed; a drained node."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cmray.config import to_dict
from cmray.train import state as ckpt
from cmray.train.worker import (
    FAULT_ONCE_ENV,
    FAULT_SIGNAL_ENV,
    FAULT_STEP_ENV,
    SAMPLE_FILE,
    launch,
)

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def kill_file(ray_cluster: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The session's Ray, with this test's run sending SIGTERM to rank 0 after step 6 and
    SIGKILL after step 10, once each (the chaos variables travel from the driver to the run's
    workers)."""
    marker = tmp_path / "killed"
    monkeypatch.setenv(FAULT_STEP_ENV, "6,10")
    monkeypatch.setenv(FAULT_SIGNAL_ENV, "TERM,KILL")
    monkeypatch.setenv(FAULT_ONCE_ENV, str(marker))
    return marker


def test_two_workers_survive_sigterm_then_a_kill_and_lose_nothing(
    digits16: str, kill_file: Path, tmp_path: Path
) -> None:
    """SIGTERM to rank 0's process after step 6: every rank checkpoints step 7, rank 0 exits as
    Ray's handler would, and Ray restarts the group there (not at the periodic checkpoint, 4).
    Then a SIGKILL after step 10 sends the run back to its last checkpoint, 8. The final weights
    are those of a run never interrupted, bit for bit."""
    from test_train import tiny_config

    # A report every step. Ray Train holds one unread report a worker, so once step 10's is
    # queued, step 8's checkpoint has been registered: the crash cannot race it.
    cfg = tiny_config(digits16, steps=12, checkpoint_every=4, log_every=1)
    cfg.run.num_workers, cfg.run.max_failures = 2, 2
    cfg.run.storage_path, cfg.run.name = str(tmp_path), "chaos"
    result = launch(cfg)
    assert kill_file.read_text() == "killed at step 6\nkilled at step 10\n"  # each came, once
    assert result.metrics["step"] == 12
    assert result.metrics["start_step"] == 8  # a crash goes back to the last checkpoint
    # Only steps 9 to 12 were read after it: rank 0's half of their global batches.
    assert result.metrics["data_samples"] == 4 * cfg.data.batch_size // 2
    # The checkpoints kept (the newest 3): the notice's step 7, then 8 from the group that
    # SIGTERM's restart began at 7 (not at 4), then 12 from the group the crash began at 8.
    kept = {m["step"]: m for _, m in result.best_checkpoints}
    assert sorted(kept) == [7, 8, 12] and kept[7]["preempted"]
    assert (kept[8]["start_step"], kept[12]["start_step"]) == (7, 8)
    with result.checkpoint.as_directory() as directory:
        assert ckpt.verify_checkpoint(directory) == 12
        markers = sorted(p.name for p in Path(directory).glob("complete-rank*.json"))
        assert markers == ["complete-rank0.json", "complete-rank1.json"]
        assert (Path(directory) / SAMPLE_FILE).stat().st_size > 0
        world = json.loads((Path(directory) / "complete-rank0.json").read_text())["world_size"]
        assert world == 2
        weights = torch.load(Path(directory) / ckpt.STATE_FILE, weights_only=True)["online"]

    # The uninterrupted run: two DDP ranks over gloo in this test, as Ray Train's workers are.
    from test_elastic import run

    straight = run(2, to_dict(cfg), tmp_path / "straight", steps=12)["weights"]
    assert all(torch.equal(weights[k], straight[k]) for k in weights)


def test_a_drained_node_loses_no_step_and_an_elastic_run_shrinks_and_grows_back(
    digits16: str, tmp_path: Path
) -> None:
    """benchmarks/preemption.py on its own multi-node Ray (this process is the session Ray's
    driver): a node of one rank is drained with a deadline through Ray's drain call, then
    reclaimed. Fixed at two workers with a spare node, the run checkpoints on the notice and
    restarts there: every step trained once, the weights those of a run never interrupted (two
    DDP ranks over gloo, the same reduction), bit for bit. Elastic over [1, 2] with no spare, it
    goes on with one worker and the same global batch, and grows back to two when a node joins:
    each step's loss that of the uninterrupted run, to reduction order."""
    from test_elastic import LOSS_RTOL, run

    out = tmp_path / "drill.json"
    command = [sys.executable, str(ROOT / "benchmarks" / "preemption.py")]
    command += ["--manifest", f"{digits16}/manifest.json", "--scenarios", "notice,elastic"]
    # Growing back takes Ray ~30 s (a node joins, the group restarts); the one-worker group
    # holds meanwhile, so the elastic run needs no steps to spare. Both runs follow one
    # reference, whose checkpoints hold every 5th step.
    command += ["--steps", "20", "--checkpoint-every", "5"]
    command += ["--drain-at", "3", "--deadline", "8", "--grow-after", "1", "--json", str(out)]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    drill = json.loads(out.read_text())

    notice, elastic = drill["notice"], drill["elastic"]
    steps = [e["step"] for e in notice["log"]]
    assert steps == list(range(1, 21)) and notice["steps_lost"] == 0
    (saved,) = [e for e in notice["log"] if e["preempted"]]
    assert saved["checkpoint"]  # the notice's step went to storage before the restart
    after = [e for e in notice["log"] if e["step"] > saved["step"]]
    assert {e["start_step"] for e in after} == {saved["step"]}  # resumed there, not earlier
    with open(Path(notice["checkpoint"]) / ckpt.STATE_FILE, "rb") as fh:
        state = torch.load(fh, weights_only=True)
    reference = run(2, state["config"], tmp_path / "ref", steps=20)
    at_20 = torch.load(tmp_path / "ref" / "step-000000020" / ckpt.STATE_FILE, weights_only=True)
    assert all(torch.equal(state["online"][k], v) for k, v in at_20["online"].items())

    worlds = [e["world_size"] for e in elastic["log"]]
    assert [w for i, w in enumerate(worlds) if i == 0 or w != worlds[i - 1]] == [2, 1, 2]
    assert {e["global_batch"] for e in elastic["log"]} == {64}
    assert elastic["steps_lost"] == 0 and elastic["log"][-1]["step"] == 20
    for entry in elastic["log"]:
        expected = reference["losses"][entry["step"]]
        assert entry["loss"] == pytest.approx(expected, rel=LOSS_RTOL), entry
    with open(Path(elastic["checkpoint"]) / ckpt.STATE_FILE, "rb") as fh:
        grown = torch.load(fh, weights_only=True)["online"]
    # 20 steps of rounding drift, over the whole network: Adam's normalised steps let a
    # near-zero tensor (the zero-initialised output bias) drift as far as its own size.
    delta = torch.cat([(grown[k] - v).flatten() for k, v in reference["weights"].items()])
    whole = torch.cat([v.flatten() for v in reference["weights"].values()])
    assert delta.norm() <= 1e-4 * whole.norm()
