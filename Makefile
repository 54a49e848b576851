# fastalign: set-up, tests and benchmarks on a fresh machine.
#   make test    create or reuse .venv, install, run the test suite
#   make bench   run the kernel benchmarks and write benchmarks/out/results.md
#   make demo    the embedded demo: a tiny model learns to sort digits on this CPU (runs/demo)
PYTHON ?= python3
VENV ?= .venv
# torch is installed first, and only when it is not importable: a bare `torch` requirement on a
# machine without it would pull the newest CUDA build. Override, e.g. TORCH_SPEC="torch==2.13.0".
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fastalign-installed
PYTEST_ARGS ?=
# OpenMP threads that sleep while they wait instead of spinning. On a shared CPU (another process
# busy on a core) torch's spinning threads wait out each other's time slices: a 512-token step of
# the demo model took 0.96 s with 2 spinning threads and 0.016 s with passive ones (2026-11-21).
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: install test bench demo clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install "$(TORCH_SPEC)"
	$(PY) -m pip install -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

test: install
	$(PY) -m pytest -q tests $(PYTEST_ARGS)

# Liger-Kernel is a peer measured by the benchmarks, never a dependency of fastalign.
bench: install
	$(PY) -c "import liger_kernel" 2>/dev/null || $(PY) -m pip install --no-deps liger-kernel \
		|| echo "liger-kernel not installed: its benchmarks will be skipped"
	$(PY) -m benchmarks $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .benchmarks benchmarks/out

# The embedded demo: built-in tiny model and task, nothing downloaded; about 20 s on 2 CPU cores.
demo: install
	$(PY) -m fastalign.cli demo --output-dir runs/demo
