# Two commands for a fresh machine: `make repro` (set up + run the pipeline), `make test`.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: setup repro test bench clean-venv

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

repro: setup
	dvc repro
	python -m stages.headline

test: setup
	pytest

bench: setup
	$(BIN)/python -m pip install --quiet -e '.[bench]'
	python benchmarks/bench_data.py
	python benchmarks/bench_topk.py
	python benchmarks/bench_resize.py
	python benchmarks/bench_loader.py
	python benchmarks/train_step.py
	python benchmarks/bench_ga.py

clean-venv:
	rm -rf $(VENV)
