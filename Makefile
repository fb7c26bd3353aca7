# One environment for everything: .venv, CPU torch pinned so a fresh machine never
# pulls a multi-GB CUDA build. The library itself only asks for torch>=2.3.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_PIN := torch==2.13.0
# Peers the tests and the benchmark compare against. --no-deps: open_clip's own
# requirements (torchvision, timm) would pull another torch; only its loss.py is used.
PEERS := open-clip-torch==3.3.0
STAMP := $(VENV)/.installed

.PHONY: setup test lint format demo bench verify clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH_PIN)
	$(BIN)/pip install -q -e '.[dev]'
	$(BIN)/pip install -q --no-deps $(PEERS)
	touch $(STAMP)

setup: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check src tests examples benchmarks
	$(BIN)/ruff format --check src tests examples benchmarks

format: $(STAMP)
	$(BIN)/ruff format src tests examples benchmarks
	$(BIN)/ruff check --fix src tests examples benchmarks

demo: $(STAMP)
	$(BIN)/palmtree train

bench: $(STAMP)
	$(BIN)/palmtree bench

verify: $(STAMP)
	$(BIN)/palmtree verify --nproc 3

clean:
	rm -rf $(VENV) runs .pytest_cache
