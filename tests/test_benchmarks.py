"""The GPU benchmark runs end to end on a CPU, so GPU time is not spent finding its bugs."""

from __future__ import annotations

import importlib
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture(scope="module")
def import_benchmark():
    """``importlib.import_module`` with the benchmarks' directory on the path, as when run."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        yield importlib.import_module
    finally:
        sys.path.remove(str(BENCHMARKS))


@pytest.fixture(scope="module")
def gpu_cd_step(import_benchmark):
    return import_benchmark("gpu_cd_step")


def test_peak_tflops_matches_device_names(gpu_cd_step):
    assert gpu_cd_step.peak_tflops("NVIDIA H100 80GB HBM3") == 989.4
    assert gpu_cd_step.peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert gpu_cd_step.peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert math.isnan(gpu_cd_step.peak_tflops("CPU x86_64"))


def test_baseline_is_the_infra_readme_assumption(gpu_cd_step):
    # infra/README.md's table: 29.5 img/s per H100 for CD, 44.2 for CT, 58.9 for EDM.
    rates = {k: gpu_cd_step.assumed_img_per_s(k, 989.4) for k in ("cd", "ct", "edm")}
    assert [round(rates[k], 1) for k in ("cd", "ct", "edm")] == [29.4, 44.2, 58.9]


def test_cd_lpips_step_runs_the_shipped_setting_and_both_sweeps(gpu_cd_step, tmp_path, capsys):
    out = tmp_path / "rows.json"
    # A global batch of 16 is 2 a GPU on the config's 8, in passes of 1.
    small = ["--set", "data.batch_size=16", "--set", "loop.microbatch=1"]
    argv = ["--preset", "tiny", "--device", "cpu", "--batches", "1", "--repeats", "1", *small]
    assert gpu_cd_step.main([*argv, "--precision", "fp32", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    rows = result["rows"]
    settings = [(r["setting"], r["batch"], r["microbatches"]) for r in rows]
    assert settings == [("shipped", 2, 2), ("off", 1, 1), ("on", 1, 1)]
    assert all(r["img_per_s"] > 0 for r in rows)
    # LPIPS's VGG16 at 224x224 dominates the tiny net's step: tens of GFLOP per image.
    assert 0.01 < result["tflop_per_image"] < 1.0
    # The shipped config's run (600k steps x a global 16 here) at the shipped rate per GPU.
    shipped = rows[0]["img_per_s"]
    assert result["shipped"]["gpu_hours"] == pytest.approx(600_000 * 16 / shipped / 3600)
    assert "largest batch in one pass, checkpointing on: 1" in capsys.readouterr().out


@pytest.fixture(scope="module")
def activation_memory(import_benchmark):
    return import_benchmark("activation_memory")


CT_L2 = ["--config", "configs/lsun_bedroom256_ct_lpips.yaml", "--set", "objective.metric=l2"]


def test_fake_tensors_count_what_real_tensors_save(activation_memory, tmp_path):
    import torch

    from cmray.train.loop import build_trainer

    step = activation_memory.step_args([*CT_L2, "--preset", "tiny", "--device", "cpu"])
    cfg = activation_memory.make_config(step, tmp_path, "off")
    trainer = build_trainer(cfg, torch.device("cpu"))
    fake = activation_memory.saved_bytes(trainer, 2)
    assert fake == activation_memory.saved_bytes(trainer, 2, fake=False)
    assert fake["bfloat16"] > 0  # the step's autocast, as shipped


def test_activation_memory_reports_the_largest_pass(activation_memory, capsys):
    assert activation_memory.main([*CT_L2, "--preset", "tiny"]) == 0
    out = capsys.readouterr().out
    per_image = float(re.search(r"per image: ([0-9.]+) GiB", out).group(1))
    largest = int(re.search(r"largest pass on 80 GiB .*: (\d+)", out).group(1))
    assert per_image > 0 and largest > 1000  # a 1.4M-parameter net at 32x32


def test_an_scm_step_saves_the_same_with_its_jvp_as_with_the_fake_count(
    activation_memory, tmp_path
):
    """The fake count runs sCM's tangent as a finite difference (forward-mode AD cannot run on
    fake tensors); the real step with its JVP saves exactly the same for backward."""
    import torch

    from cmray.config import from_dict, to_dict, with_values
    from cmray.train.config import TrainConfig
    from cmray.train.loop import build_trainer

    scd = ["--config", "configs/lsun_bedroom256_scd.yaml", "--preset", "tiny", "--device", "cpu"]
    cfg = activation_memory.make_config(activation_memory.step_args(scd), tmp_path, "off")
    activation_memory.write_teacher(cfg, tmp_path / activation_memory.TEACHER_FILE)
    counts = {}
    for method in ("jvp", "fd"):
        spec = with_values(to_dict(cfg), {"objective.scm.jvp": method})
        trainer = build_trainer(from_dict(TrainConfig, spec), torch.device("cpu"))
        counts[method] = activation_memory.saved_bytes(trainer, 2, fake=method == "fd")
    assert counts["jvp"] == counts["fd"] and counts["fd"]["bfloat16"] > 0


def test_objective_cost_times_every_objective_against_ct(import_benchmark, capsys):
    objective_cost = import_benchmark("objective_cost")
    assert objective_cost.main(["--repeats", "1", "--batch", "2"]) == 0
    out = capsys.readouterr().out
    rates = dict(re.findall(r"^\s+(\w+)\s+[0-9.]+ images/s\s+ratio to ct ([0-9.]+)", out, re.M))
    assert set(rates) == {"ct", "cd", "ect", "sct", "scd"} and rates["ct"] == "1.00"
    assert all(float(r) > 0 for r in rates.values())


def test_train_launch_counts_busy_time_and_refuses_a_run_of_nothing(import_benchmark, capsys):
    """The launch benchmark's clock is the machine's busy time, which work moves; and it
    will not time zero launches."""
    bench = import_benchmark("train_launch")
    before = bench.busy_core_seconds()
    sum(i * i for i in range(3_000_000))  # about a tenth of a core-second of Python
    assert bench.busy_core_seconds() > before
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--launches", "0"])
    assert exit_info.value.code == 2
    assert "--launches and --workers must be at least 1" in capsys.readouterr().err


def test_the_launch_benchmark_charges_cpu_to_the_process_that_spent_it(import_benchmark):
    bench = import_benchmark("train_launch")
    burn = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.6: pass"
    with bench.ProcessClock(every_s=0.05) as clock:
        child = subprocess.Popen([sys.executable, "-c", burn])
        child.wait(60)
        time.sleep(0.2)  # the sampler catches up
    spent = clock.last[child.pid] - clock.start.get(child.pid, 0.0)
    assert 0.4 <= spent <= 1.0  # its 0.6 s and start-up, less what ended between samples
    assert clock.names[child.pid] == os.path.basename(sys.executable)
    assert clock.names[child.pid] in {name for _, _, name in clock.by_name()}
