"""Training on a real local Ray: two DDP workers, a worker killed mid-run, resume by run name."""

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
    """The session's Ray, with this test's runs killing rank 0 once after step 6 (the chaos
    variables travel from the driver to the run's workers)."""
    marker = tmp_path / "killed"
    monkeypatch.setenv(FAULT_STEP_ENV, "6")
    monkeypatch.setenv(FAULT_ONCE_ENV, str(marker))
    return marker


def test_two_workers_survive_sigterm_and_a_kill_and_resume_by_name(
    digits16: str, kill_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGTERM to rank 0's process after step 6: every rank checkpoints step 7, rank 0 exits as
    Ray's handler would, and Ray restarts the group there (not at the periodic checkpoint, 4).
    Then the run goes on by name, and a SIGKILL after step 9 sends it back to step 8."""
    from test_train import tiny_config

    cfg = tiny_config(digits16, steps=8, checkpoint_every=4, log_every=2)
    cfg.run.num_workers, cfg.run.max_failures = 2, 1
    cfg.run.storage_path, cfg.run.name = str(tmp_path), "chaos"
    monkeypatch.setenv(FAULT_SIGNAL_ENV, "TERM")
    result = launch(cfg)
    assert kill_file.read_text() == "killed at step 6\n"  # the signal really came, once
    assert result.metrics["step"] == 8
    assert result.metrics["start_step"] == 7  # the restarted group began at SIGTERM's step
    with result.checkpoint.as_directory() as directory:
        assert ckpt.verify_checkpoint(directory) == 8
        markers = sorted(p.name for p in Path(directory).glob("complete-rank*.json"))
        assert markers == ["complete-rank0.json", "complete-rank1.json"]
        assert (Path(directory) / SAMPLE_FILE).stat().st_size > 0
        world = json.loads((Path(directory) / "complete-rank0.json").read_text())["world_size"]
        assert world == 2

    # An uninterrupted run ends with the same weights, bit for bit: the restart lost nothing.
    # The uninterrupted run: two DDP ranks over gloo in this test, as Ray Train's workers are.
    from test_elastic import run

    straight = run(2, to_dict(cfg), tmp_path / "straight", steps=8)["weights"]
    with result.checkpoint.as_directory() as a:
        wa = torch.load(Path(a) / ckpt.STATE_FILE, weights_only=True)["online"]
        assert all(torch.equal(wa[k], straight[k]) for k in wa)

    cfg.run.name, cfg.loop.steps = "chaos", 10  # the same name: continues from 8, not from 0
    cfg.loop.log_every = 1  # a report at step 9, where the crash comes
    crashed = tmp_path / "crashed"
    monkeypatch.setenv(FAULT_STEP_ENV, "9")
    monkeypatch.setenv(FAULT_ONCE_ENV, str(crashed))
    monkeypatch.setenv(FAULT_SIGNAL_ENV, "KILL")
    again = launch(cfg)
    assert crashed.read_text() == "killed at step 9\n"
    assert again.metrics["step"] == 10
    assert again.metrics["start_step"] == 8  # a crash goes back to the last checkpoint
    # Only steps 9 and 10 were read: rank 0's half of their global batches.
    assert again.metrics["data_samples"] == 2 * cfg.data.batch_size // 2


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
    # Growing back takes Ray ~30 s (a node joins, the group restarts): the elastic run must
    # outlast it. The curriculum's length is fixed (ct.K) so that both runs follow one
    # reference, whose checkpoints hold every 5th step.
    command += ["--steps", "20", "--elastic-steps", "50", "--checkpoint-every", "5"]
    command += ["--drain-at", "3", "--deadline", "8", "--grow-after", "1"]
    command += ["--set", "objective.ct.K=50", "--json", str(out)]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    drill = json.loads(out.read_text())
    # A report every step paces these runs to the controller's poll, and rank 0 says so.
    assert "waiting for Ray Train's controller to read reports" in done.stdout

    notice, elastic = drill["notice"], drill["elastic"]
    steps = [e["step"] for e in notice["log"]]
    assert steps == list(range(1, 21)) and notice["steps_lost"] == 0
    (saved,) = [e for e in notice["log"] if e["preempted"]]
    assert saved["checkpoint"]  # the notice's step went to storage before the restart
    after = [e for e in notice["log"] if e["step"] > saved["step"]]
    assert {e["start_step"] for e in after} == {saved["step"]}  # resumed there, not earlier
    with open(Path(notice["checkpoint"]) / ckpt.STATE_FILE, "rb") as fh:
        state = torch.load(fh, weights_only=True)
    reference = run(
        2, {**state["config"], "loop": state["config"]["loop"]}, tmp_path / "ref", steps=50
    )
    at_20 = torch.load(tmp_path / "ref" / "step-000000020" / ckpt.STATE_FILE, weights_only=True)
    assert all(torch.equal(state["online"][k], v) for k, v in at_20["online"].items())

    worlds = [e["world_size"] for e in elastic["log"]]
    assert [w for i, w in enumerate(worlds) if i == 0 or w != worlds[i - 1]] == [2, 1, 2]
    assert {e["global_batch"] for e in elastic["log"]} == {64}
    assert elastic["steps_lost"] == 0 and elastic["log"][-1]["step"] == 50
    for entry in elastic["log"]:
        expected = reference["losses"][entry["step"]]
        assert entry["loss"] == pytest.approx(expected, rel=LOSS_RTOL), entry
    with open(Path(elastic["checkpoint"]) / ckpt.STATE_FILE, "rb") as fh:
        grown = torch.load(fh, weights_only=True)["online"]
    # 50 steps of rounding drift, over the whole network: Adam's normalised steps let a
    # near-zero tensor (the zero-initialised output bias) drift as far as its own size.
    delta = torch.cat([(grown[k] - v).flatten() for k, v in reference["weights"].items()])
    whole = torch.cat([v.flatten() for v in reference["weights"].values()])
    assert delta.norm() <= 1e-4 * whole.norm()
