#!/usr/bin/env bash
# What fastalign measures on a GPU, on a machine with CUDA, PyTorch and Triton but no package index.
# One stage per call, each well inside 10 minutes:
#
#   benchmarks/gpu_session.sh tests     the kernel tests and the benchmark-path test, natively
#                                       (no Triton interpreter), plus the packed-model tests
#   benchmarks/gpu_session.sh kernels [K]  the kernel table: python -m benchmarks on the GPU shapes,
#                                       with fractions of HBM bandwidth and matmul peak (K: a pytest -k
#                                       expression selecting some of them)
#   benchmarks/gpu_session.sh dpo       a DPO step of a Qwen2-0.5B-shaped model in bf16, fastalign
#                                       against TRL and TRL + Liger (python -m benchmarks.peers --profile gpu)
#
# Beforehand, on a machine with an index: `make gpu-wheels` puts the pure-Python packages such a
# machine may lack (TRL, liger-kernel, datasets and its two small dependencies) in .whl/, and the
# HH-RLHF pairs in .gpu/; both are ignored by git and must travel with the working tree.
# Logs and tables go to $OUT (or benchmarks/out/gpu).
set -euo pipefail
cd "$(dirname "$0")/.."
stage=${1:?usage: benchmarks/gpu_session.sh tests|kernels|dpo}
results=${OUT:-benchmarks/out/gpu}
mkdir -p "$results"
py=${PYTHON:-python3}
export OMP_WAIT_POLICY=PASSIVE PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
unset TRITON_INTERPRET

if compgen -G ".whl/*.whl" >/dev/null; then
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
# fastalign itself, editable and without dependencies (torch, triton, transformers, peft are there).
"$py" -c "import fastalign.kernels" 2>/dev/null \
  || "$py" -m pip install -q --no-index --no-deps --no-build-isolation -e . >"$results/install.log" 2>&1
export FASTALIGN_HH_DATA=${FASTALIGN_HH_DATA:-$PWD/.gpu/hh-rlhf-harmless-base-test.jsonl.gz}

{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || echo "no nvidia-smi"
  "$py" -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__,
'transformers', transformers.__version__, 'cuda', torch.version.cuda)"
  "$py" -m pip list 2>/dev/null | grep -i -E "^(trl|liger|datasets|pyarrow|peft|accelerate|flash)" || true
} | tee "$results/device.txt"

case "$stage" in
  tests)
    "$py" -m pytest -q -p no:cacheprovider tests/kernels tests/test_benchmark_paths.py tests/models \
      2>&1 | tee "$results/tests.log"
    ;;
  kernels)
    # The kernel table only (make bench also runs the CPU-sized end-to-end benchmarks).
    # A second argument narrows it (a pytest -k expression), to split the table over two calls
    # should it run long: kernels linear_logprobs, then kernels "not linear_logprobs".
    PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} "$py" -m benchmarks -k "(test_logprobs or gae) and (${2:-test})" \
      2>&1 | tee "$results/kernels.log"
    cp benchmarks/out/results.md benchmarks/out/latest.json "$results/" 2>/dev/null || true
    ;;
  dpo)
    # Peers run with the same interpreter: TRL and liger-kernel come from .whl/. Each run is a
    # fresh process (CUDA start, Triton compiles): 2 rounds of 3 systems keep inside 10 minutes.
    PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} "$py" -m benchmarks.peers --profile gpu --peer-python "$(command -v "$py")" \
      --systems fastalign,trl,trl-liger --rounds "${ROUNDS:-2}" 2>&1 | tee "$results/dpo.log"
    cp benchmarks/out/vs_trl_gpu/vs_trl.md benchmarks/out/vs_trl_gpu/vs_trl.png benchmarks/out/vs_trl_gpu/runs.jsonl \
      "$results/" 2>/dev/null || true
    ;;
  *)
    echo "unknown stage $stage: tests, kernels or dpo" >&2
    exit 2
    ;;
esac
