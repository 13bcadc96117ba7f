# The whole set-up is `make demo` or `make test`: both create or reuse .venv and install into it.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
OUT ?= runs/toy2d
DATA ?= runs/data/digits16

.PHONY: lock demo demo-toy2d reproduce fashion-data test test-fast lint format bench bench-gpu clean

# Installs come from the committed lock (uv.lock) only: pip bootstraps the uv release the lock
# names (hash-checked), then `uv sync --frozen` installs exactly the locked set, and cmray goes in
# editable without build isolation, built by the locked setuptools. Nothing is resolved here.
# UV_PYTHON_DOWNLOADS=never: the venv's own interpreter is the one to use, never a downloaded one.
# --compile-bytecode: the .pyc files are written once here (about 20 s on 2 cores), not left to
# first import, which a PYTHONDONTWRITEBYTECODE environment repeats in every process: every Ray
# worker, actor and pipeline then compiled torch, Ray and mlflow again (6.5 s to import them
# instead of 3.0 s).
UV := UV_PYTHON_DOWNLOADS=never UV_PROJECT_ENVIRONMENT=$(VENV) $(BIN)/uv
$(STAMP): uv.lock pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "installing cmray and the locked stack into $(VENV) (a few minutes the first time; log: $(VENV)/install.log)"
	{ $(PYTHON) infra/locked_requirement.py uv > $(VENV)/uv-requirement.txt \
	  && $(BIN)/python -m pip install --require-hashes --no-deps -r $(VENV)/uv-requirement.txt \
	  && $(UV) sync --frozen --compile-bytecode --no-install-project --extra dev --group install \
	  && $(UV) pip install --no-deps --no-build-isolation -e . ; } > $(VENV)/install.log 2>&1 \
	  || { tail -n 40 $(VENV)/install.log; exit 1; }
	$(BIN)/python -c "import cmray, torch, ray, mlflow, lpips, webdataset"
	touch $(STAMP)

# Re-resolve pyproject.toml's ranges into uv.lock. Keeps every locked version that still fits;
# `make lock ARGS="--upgrade-package NAME"` moves one package (README, "Upgrading a dependency").
lock: $(STAMP)
	$(UV) lock $(ARGS)

# The whole small pipeline: real images -> local shards -> iCT on 2 Ray Train CPU workers ->
# checkpoints -> one- and two-step samples scored on 2 Ray actors with the digits-classifier
# proxy (not FID) -> runs/demo/eval/{eval.json,samples.png} (16.5-19 min on these 2 cores,
# 4.5-7.5 on a faster 2-core laptop), and one line with the figures beside the reproduction
# study's teacher and real against real.
# The row is the study's best without a teacher at the demo's 800 steps (no teacher fits its
# minutes; the study's took 28): iCT as the study's iCT row trains it (EMA 0.999 with EDM's
# warm-up, 0.25 ln sigma, N to the published 1280). At 800 steps on one core it scored 87.0
# one-step, the paper's CT sized to 800 steps 101.7 (the study's best at 2,400 steps).
DEMO_SET := --set run.name=digits_ict --set objective.noise.c_noise_scale=0.25 \
  --set objective.ct.s1=0 --set "loop.ema_rates=[0.999]" --set loop.ema_rampup=0.05
demo: $(STAMP)
	$(BIN)/python pipelines/prepare_data.py --source digits --out $(DATA) --resolution 16 --workers -1
	$(BIN)/python pipelines/train.py --config configs/digits_ct.yaml --set data.manifest=$(DATA)/manifest.json $(DEMO_SET)
	$(BIN)/python pipelines/evaluate.py --config configs/eval_digits.yaml --set manifest=$(DATA) --set out=runs/demo/eval \
	  --set model=runs/train/digits_ict --compare docs/reproduce/digits/results.json

# The paper's Table 2 in miniature on the bundled digits: an EDM teacher trained until its
# 35-NFE figure levels off, then CD, CT, iCT, ECT, sCT and sCD as one Ray Tune grid, each scored
# one- and two-step -> runs/reproduce/digits/{results.json,table.md,samples.png,nfe.png}
# (the digits: about 3.5 hours on 2 cores; re-running resumes). SUITE=digits; STUDY_OUT moves it.
# SUITE=fashion: Fashion-MNIST (its official files from Debian's dataset-fashion-mnist, installed
# here when apt-get can; elsewhere the source downloads them once); SUITE=ring: the 2D ring.
SUITE ?= digits
reproduce: $(STAMP) $(if $(filter fashion,$(SUITE)),fashion-data)
	$(BIN)/python pipelines/reproduce.py --suite $(SUITE) $(if $(STUDY_OUT),--out $(STUDY_OUT))

# Fashion-MNIST's official idx.gz files from Debian's package, when they are not there yet and
# apt-get may install (root); otherwise the fashion-mnist source finds or downloads them itself.
FASHION_DIR := /usr/share/datasets/fashion-mnist
fashion-data:
	@test -f $(FASHION_DIR)/t10k-labels-idx1-ubyte.gz \
	  || { command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] \
	       && { apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; } >/dev/null 2>&1 \
	       && echo "installed dataset-fashion-mnist into $(FASHION_DIR)"; } \
	  || echo "Fashion-MNIST: not in $(FASHION_DIR); the fashion-mnist source will download it"

demo-toy2d: $(STAMP)
	$(BIN)/python pipelines/toy2d.py --out $(OUT)

# -X faulthandler keeps tracebacks on a crash through interpreter exit too (pytest's own
# handler stops at the end of the session), so a crash in a library's teardown names its thread.
# --durations: the slowest tests in every log, to keep the suite inside its 15-minute budget.
test: $(STAMP) fashion-data
	$(BIN)/python -X faulthandler -m pytest --durations=15

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: $(STAMP)
	$(BIN)/python benchmarks/sampling_speed.py
	$(BIN)/python benchmarks/data_throughput.py
	$(BIN)/python benchmarks/train_overhead.py
	$(BIN)/python benchmarks/fid_features.py
	$(BIN)/python benchmarks/unet_sampling.py
	$(BIN)/python benchmarks/teacher_load.py
	$(BIN)/python benchmarks/activation_memory.py
	$(BIN)/python benchmarks/train_launch.py

# On a CUDA machine: the LSUN-256 CD-LPIPS and CT-LPIPS training steps (largest batch with and
# without activation checkpointing, MFU, GPU-hours), FID features/s and U-Net sampling.
bench-gpu: $(STAMP)
	mkdir -p runs/bench
	$(BIN)/python benchmarks/gpu_cd_step.py --json runs/bench/cd_step.json
	$(BIN)/python benchmarks/gpu_cd_step.py --config configs/lsun_bedroom256_ct_lpips.yaml --json runs/bench/ct_step.json
	$(BIN)/python benchmarks/fid_features.py --device cuda
	$(BIN)/python benchmarks/unet_sampling.py --device cuda

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
