# One environment for everything: .venv, CPU torch pinned so a fresh machine never
# pulls a multi-GB CUDA build. The library itself only asks for torch>=2.3.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_PIN := torch==2.13.0
# Peers the tests and the benchmark compare against. --no-deps: open_clip's own
# requirements (torchvision, timm) would pull another torch; only its loss.py is used.
PEERS := open-clip-torch==3.3.0
# sentence-transformers' MultipleNegativesRankingLoss, which text_negatives reproduces
# (tests/test_peers_targets.py); --no-deps: transformers and the rest come with '.[dev]'.
TEST_PEERS := sentence-transformers==6.0.1
STAMP := $(VENV)/.installed
# What the lent GPU machine lacks (its own Python 3.12, no registry): pure-Python wheels
# that `run` carries in .whl/ (ignored by git) and benchmarks/gpu_check.sh installs.
GPU_WHEELS := $(PEERS) inf-cl==1.2.1

.PHONY: setup test test-cpus lint format demo bench verify audit gpu-wheels gpu-check-dry clean

# pip runs quietly (-q), and a fresh setup takes minutes: each step says first what it
# does, so `make demo` or `make test` on a new clone is never silent for long.
$(STAMP): pyproject.toml Makefile
	@test -x $(BIN)/python || { echo "setup: creating $(VENV) with $(PY)" && $(PY) -m venv $(VENV); }
	@echo "setup: upgrading pip in $(VENV)"
	@$(BIN)/pip install -q --upgrade pip
	@echo "setup: installing $(TORCH_PIN) (the largest download)"
	@$(BIN)/pip install -q $(TORCH_PIN)
	@echo "setup: installing this package, editable, with its extras and test tools ('.[dev]')"
	@$(BIN)/pip install -q -e '.[dev]'
	@echo "setup: installing the peers the tests compare against: $(PEERS) $(TEST_PEERS) (--no-deps)"
	@$(BIN)/pip install -q --no-deps $(PEERS) $(TEST_PEERS)
	@touch $(STAMP)
	@echo "setup: done; $(VENV) is ready"

setup: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

# The numerical tests again on emulated older CPUs, so that a result depending on which
# BLAS or SIMD kernel the machine picks fails here, not on a user's machine: AVX2 without
# AVX-512, then AVX only. Each line sets OpenBLAS (NumPy, hence the Triton interpreter),
# MKL and ATen (PyTorch) and NumPy's own dispatch.
NUMERIC_TESTS := tests/test_loss.py tests/test_siglip.py tests/test_fused.py \
	tests/test_distributed.py tests/test_compat_open_clip.py tests/test_accumulate.py \
	tests/test_small_losses.py tests/test_accumulate_safety.py tests/test_fsdp2.py \
	tests/test_compat_transformers.py tests/test_targets.py tests/test_accumulate_targets.py
AVX2_CPU := OPENBLAS_CORETYPE=Haswell MKL_ENABLE_INSTRUCTIONS=AVX2 ATEN_CPU_CAPABILITY=avx2 \
	NPY_DISABLE_CPU_FEATURES="X86_V4 AVX512_ICL AVX512_SPR"
AVX_CPU := OPENBLAS_CORETYPE=SandyBridge MKL_ENABLE_INSTRUCTIONS=AVX ATEN_CPU_CAPABILITY=default \
	NPY_DISABLE_CPU_FEATURES="X86_V3 X86_V4 AVX512_ICL AVX512_SPR"

test-cpus: $(STAMP)
	$(AVX2_CPU) $(BIN)/python -m pytest -q -p no:cacheprovider $(NUMERIC_TESTS)
	$(AVX_CPU) $(BIN)/python -m pytest -q -p no:cacheprovider $(NUMERIC_TESTS)

lint: $(STAMP)
	$(BIN)/ruff check src tests examples benchmarks
	$(BIN)/ruff format --check src tests examples benchmarks

format: $(STAMP)
	$(BIN)/ruff format src tests examples benchmarks
	$(BIN)/ruff check --fix src tests examples benchmarks

# Each run gets a new folder: runs/clip, then runs/clip-2, ... (palmtree train, no --name).
demo: $(STAMP)
	$(BIN)/palmtree train

bench: $(STAMP)
	$(BIN)/palmtree bench

verify: $(STAMP)
	$(BIN)/palmtree verify --nproc 3

# Compile every fused kernel for sm_90 and sm_80 (no GPU needed); refresh docs/kernels.md.
audit: $(STAMP)
	env -u TRITON_INTERPRET $(BIN)/python benchmarks/compile_audit.py --write-docs docs/kernels.md

gpu-wheels:
	$(PY) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
		--implementation cp --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
		-d .whl $(GPU_WHEELS)

# benchmarks/gpu_check.sh at tiny sizes on this CPU (tests/test_gpu_check.py runs it too).
gpu-check-dry: $(STAMP)
	SMOKE=1 PY=$(BIN)/python OUT=runs/gpu-check-dry bash benchmarks/gpu_check.sh

clean:
	rm -rf $(VENV) runs .pytest_cache
