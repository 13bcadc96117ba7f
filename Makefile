# The whole set-up is `make demo` or `make test`: both create or reuse .venv and install into it.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
OUT ?= runs/toy2d

.PHONY: demo test test-fast lint format bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "installing cmray and its dependencies into $(VENV) (a few minutes the first time; log: $(VENV)/pip.log)"
	$(BIN)/python -m pip install -e '.[dev]' > $(VENV)/pip.log 2>&1 || { tail -n 40 $(VENV)/pip.log; exit 1; }
	$(BIN)/python -c "import cmray, torch, ray, mlflow, lpips, webdataset"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python pipelines/toy2d.py --out $(OUT)

test: $(STAMP)
	$(BIN)/python -m pytest

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

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
