# `make demo` and `make test` each set up .venv from scratch on a fresh machine, then run.
#
# torch: on CPU-only Linux we pin the CPU build (torch==2.13.0 resolves to 2.13.0+cpu where a CPU wheel is on
# pip's find-links/index, as on our dev and CI machines), so setup does not download GBs of CUDA libraries.
# Override TORCH_SPEC / TORCH_PIP_ARGS for another build, e.g.
#   make TORCH_SPEC=torch TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cu128" test
SHELL       := /bin/bash
.SHELLFLAGS := -eo pipefail -c
PYTHON      ?= python3
# pip on our machines warns about absent local index folders; keep its real errors, drop that noise.
QUIET       := 2>&1 | { grep -v '^WARNING: Location' || true; }
VENV        ?= .venv
PY          := $(VENV)/bin/python
# --no-compile: pip would byte-compile every installed module (torch alone: 20 of its 28 s); Python compiles
# the ones a process imports on first import, and the setup warms those every test process needs in one process
# (WARM_IMPORTS while the extension compiles, then WARM_DDPM: ~14 CPU-s that five concurrent pytest processes
# would otherwise each spend).
PIP         := $(PY) -m pip --disable-pip-version-check
INSTALL     := $(PIP) install -q --no-compile
# PYTHONDONTWRITEBYTECODE (set on some machines, ours included) would undo that: every pytest worker and every
# `python -m ddpm` subprocess would recompile what it imports and re-rewrite the tests (~5 CPU-s per process).
export PYTHONDONTWRITEBYTECODE :=
WARM_IMPORTS := torch.onnx, onnxscript, onnxruntime, openvino, diffusers, scipy.stats, sklearn.linear_model, \
	matplotlib.pyplot, hypothesis, httpx, pytest, xdist
WARM_DDPM    := ddpm._C, ddpm.cli, ddpm.trainer.train, ddpm.export.pipeline, ddpm.runtime.sampling, ddpm.serve
TORCH_SPEC  ?= torch==2.13.0
TORCH_PIP_ARGS ?=
STAMP       := $(VENV)/.ddpm-installed
# Anything that changes what gets built or installed re-runs the install step.
BUILD_INPUTS := pyproject.toml CMakeLists.txt $(wildcard csrc/*) $(wildcard ddpm/*.pyi)
DEMO_DIR    ?= runs/demo
PYTEST_ARGS ?=
# pytest-xdist workers: one per core this process may use (tests/conftest.py puts each on one torch thread and
# trains the quality tests' reference models in the background meanwhile).
TEST_WORKERS ?= $(shell nproc 2>/dev/null || echo 2)
# The files that hold `serial` tests (collecting only them spares the second pytest run ~10 s of imports).
SERIAL_FILES ?= $(shell grep -l "mark.serial" tests/test_*.py 2>/dev/null)

.PHONY: setup demo test lint format bench clean

setup: $(STAMP)

$(STAMP): $(BUILD_INPUTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(INSTALL) --upgrade pip $(QUIET)
	$(INSTALL) "scikit-build-core>=0.10" "pybind11>=2.12" $(QUIET)
	# The extension compiles (~40 s: C++, and CUDA where nvcc is) in the background while the foreground installs
	# torch and the dependencies pyproject.toml lists (tools/requirements.py) and byte-compiles what every test
	# process imports, before pytest starts five of them at once. Either failing fails the setup (a torch that did not
	# install fails clearly at its import).
	$(INSTALL) --no-build-isolation --no-deps -e . > $(VENV)/build.log 2>&1 & build=$$!; \
	$(INSTALL) "$(TORCH_SPEC)" numpy $(TORCH_PIP_ARGS) $(QUIET) \
	  && $(PY) -c "import torch" \
	  && $(PY) tools/requirements.py test > $(VENV)/requirements.txt \
	  && $(INSTALL) -r $(VENV)/requirements.txt $(QUIET) \
	  && $(PY) -c "import $(WARM_IMPORTS)" \
	  || { kill $$build 2>/dev/null; wait $$build; exit 1; }; \
	wait $$build || { grep -v '^WARNING: Location' $(VENV)/build.log; echo "make setup: the extension did not build (pip's log above)"; exit 1; }
	$(PY) -c "import $(WARM_DDPM)" # the extension must import
	touch $(STAMP)

demo: $(STAMP)
	bash scripts/demo.sh $(DEMO_DIR)

# The layer contract (import-linter, pyproject.toml [tool.importlinter]) runs first: a broken layer fails fast.
# DDPM_TEST_SHARED: one folder for both pytest runs, so the serial run reuses the exports the first one made.
test: $(STAMP)
	$(VENV)/bin/lint-imports --no-cache
	export DDPM_TEST_SHARED=$$(mktemp -d) && trap 'rm -rf "$$DDPM_TEST_SHARED"' EXIT; \
	$(PY) -m pytest -n $(TEST_WORKERS) -m "not serial" $(PYTEST_ARGS); \
	$(PY) -m pytest -m serial $(SERIAL_FILES) $(PYTEST_ARGS) || test $$? -eq 5  # 5: the selection held no serial test

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports --no-cache

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

clean:
	rm -rf build runs .pytest_cache .ruff_cache
