# fastalign: set-up, tests and benchmarks on a fresh machine.
#   make test    create or reuse .venv, install, run the test suite
#   make lint    ruff over the tree (the configuration is in pyproject.toml); CI runs it before the tests
#   make bench   run the kernel benchmarks and write benchmarks/out/results.md
#   make bench-peers  fastalign against TRL end to end (DPO, reward, SFT); makes the peer venv first
#   make bench-data   data preparation to the first step: fastalign, TRL and the tokenizer floor
#   make gpu-wheels  what travels to a GPU machine without a package index (benchmarks/gpu_session.sh)
#   make demo    the embedded demo: a tiny model learns to sort digits, then DDPO, on this CPU (runs/demo)
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

.PHONY: install lint test bench bench-peers bench-data gpu-wheels demo clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install "$(TORCH_SPEC)"
	$(PY) -m pip install -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

test: install
	$(PY) -m pytest -q tests $(PYTEST_ARGS)

lint: install
	$(PY) -m ruff check .

# Liger-Kernel is a peer measured by the benchmarks, never a dependency of fastalign. TRL's fused
# LM head (a kernel path) comes from TRL_SPEC installed without its dependencies into a folder of its
# own, on PYTHONPATH for the benchmarks only: fastalign's venv never gets TRL.
TRL_KERNELS ?= benchmarks/out/trl-kernels
bench: install
	$(PY) -c "import liger_kernel" 2>/dev/null || $(PY) -m pip install --no-deps liger-kernel \
		|| echo "liger-kernel not installed: its benchmarks will be skipped"
	test -d $(TRL_KERNELS)/trl || $(PY) -m pip install --no-deps --target $(TRL_KERNELS) "$(TRL_SPEC)" \
		|| echo "TRL not installed: its kernel path will be skipped"
	PYTHONPATH=$(abspath $(TRL_KERNELS)) $(PY) -m benchmarks $(PYTEST_ARGS)

# The peers of the end-to-end comparison (TRL, TRL + Liger-Kernel) live in their own venv under
# benchmarks/out (ignored), never in fastalign's: torch is installed first from TORCH_SPEC and pinned
# again beside TRL, so TRL's requirements cannot pull another torch. TRL_SPEC=trl for the newest.
PEERS_VENV ?= benchmarks/out/venv-peers
PEERS_PY := $(PEERS_VENV)/bin/python
PEERS_STAMP := $(PEERS_VENV)/.peers-installed
TRL_SPEC ?= trl==1.16.0
LIGER_SPEC ?= liger-kernel==0.8.5
PEERS_ARGS ?=

$(PEERS_STAMP):
	$(PYTHON) -m venv $(PEERS_VENV)
	$(PEERS_PY) -m pip install "$(TORCH_SPEC)"
	$(PEERS_PY) -m pip install "$(TORCH_SPEC)" "$(TRL_SPEC)" "$(LIGER_SPEC)"
	touch $(PEERS_STAMP)

# Interleaved rounds, each system in a fresh process (25-30 minutes on 2 CPU cores); writes
# benchmarks/out/vs_trl/ and the chart benchmarks/vs_trl.png. A smoke run that leaves the chart alone:
# PEERS_ARGS="--quick --chart benchmarks/out/vs_trl/quick.png".
bench-peers: install $(PEERS_STAMP)
	$(PY) -m benchmarks.peers --peer-python $(PEERS_PY) --chart benchmarks/vs_trl.png $(PEERS_ARGS)

# Data preparation to the first step (benchmarks/data_prep.py): SFT rows and DPO pairs at 10k, 100k and
# 1M rows, fastalign and TRL (peer venv, up to 100k rows) against the tokenizer's own batched encoding,
# first and cached runs, time and peak RSS per token. The workload is made once in
# benchmarks/out/data_prep/ (ignored), which gets results.jsonl and results.md. The full run takes hours
# on 2 cores; a smoke run: DATA_PREP_ARGS="--rows 10000".
DATA_PREP_ARGS ?=
bench-data: install $(PEERS_STAMP)
	$(PY) -m benchmarks.data_prep $(DATA_PREP_ARGS)

# For a GPU machine with no package index (benchmarks/gpu_session.sh runs there): the pure-Python
# packages it may lack, as wheels for Python 3.12 in .whl/, and the HH-RLHF pairs in .gpu/ (both
# ignored by git; they travel with the working tree, about 3 MB).
GPU_WHEELS ?= $(TRL_SPEC) $(LIGER_SPEC) datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
gpu-wheels:
	mkdir -p .whl .gpu
	$(PYTHON) -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl $(GPU_WHEELS)
	install -m 644 ../shared/data/hh-rlhf-harmless-base-test.jsonl.gz .gpu/

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .benchmarks benchmarks/out

# The embedded demo: built-in tiny models and tasks, nothing downloaded; about 80 s on 2 CPU cores.
demo: install
	$(PY) -m fastalign.cli demo --output-dir runs/demo
