#!/usr/bin/env bash
# What fastalign measures on a GPU, on a machine with CUDA, PyTorch and Triton but no package index.
#
#   benchmarks/gpu_session.sh           everything, in at most 9 minutes with the installs: each stage
#                                       below under its own time limit, so a slow one cannot eat the next
#   benchmarks/gpu_session.sh tests     the kernel tests natively (no Triton interpreter; the
#                                       compile-for-GPU test, a CPU check, left out) and the benchmark paths
#   benchmarks/gpu_session.sh kernels [K]  the kernel table: selective_logprobs (fraction of HBM
#                                       bandwidth) and linear_logprobs (fraction of bf16 dense peak; chunked,
#                                       and fused where fastalign.kernels.fused_head exists) against the bare
#                                       lm_head matmuls. K: a pytest -k expression; KERNEL_CASES=gpu for
#                                       the full GPU table (longer than one stage's limit)
#   benchmarks/gpu_session.sh dpo       a DPO step of a Qwen2-0.5B-shaped model in bf16, fastalign against
#                                       TRL and TRL + Liger (python -m benchmarks.peers --profile gpu)
#
# Without CUDA (a rehearsal on a CPU) every stage still runs its plumbing and says what it skips:
# the tests stage runs the benchmark-path test only, the kernels stage the quick CPU table.
# Beforehand, on a machine with an index: `make gpu-wheels` puts the pure-Python packages such a
# machine may lack (TRL, liger-kernel, datasets and its two small dependencies) in .whl/, and the
# HH-RLHF pairs in .gpu/; both are ignored by git and must travel with the working tree.
# Logs and tables go to $OUT (or benchmarks/out/gpu). Limits (seconds): LIMIT_TESTS, LIMIT_KERNELS,
# LIMIT_DPO.
set -uo pipefail
cd "$(dirname "$0")/.."
stage=${1:-all}
results=${OUT:-benchmarks/out/gpu}
mkdir -p "$results"
py=${PYTHON:-python3}
export OMP_WAIT_POLICY=PASSIVE PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
unset TRITON_INTERPRET
started=$(date +%s)
say() { echo "== gpu_session [$(($(date +%s) - started))s] $*" | tee -a "$results/session.log"; }

# --- Set-up (seconds): wheels from .whl/, fastalign itself, the device --------------------------
if compgen -G ".whl/*.whl" >/dev/null; then
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    >"$results/wheels.log" 2>&1 || say "wheels from .whl/ did not install (see wheels.log); peers may be skipped"
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
else
  say "no .whl/ (make gpu-wheels): TRL, liger-kernel and datasets only if already installed"
fi
# fastalign itself from this tree, with no install: the package maps fastalign.kernels to kernels/.
if ! "$py" -c "import fastalign.kernels" 2>/dev/null; then
  "$py" -m pip install -q --no-index --no-deps --no-build-isolation -e . >"$results/install.log" 2>&1 \
    || say "pip install -e . failed (see install.log)"
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export FASTALIGN_HH_DATA=${FASTALIGN_HH_DATA:-$PWD/.gpu/hh-rlhf-harmless-base-test.jsonl.gz}

{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>/dev/null || echo "no nvidia-smi"
  "$py" -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__,
'transformers', transformers.__version__, 'cuda', torch.version.cuda, 'device',
torch.cuda.get_device_name() if torch.cuda.is_available() else 'none')"
  "$py" -m pip list 2>/dev/null | grep -i -E "^(trl|liger|datasets|pyarrow|peft|accelerate|flash)" || true
} 2>&1 | tee "$results/device.txt"
if "$py" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  cuda=1
else
  cuda=0
  say "no CUDA device here: a rehearsal, GPU-only work is skipped and says so"
fi

# --- Stages --------------------------------------------------------------------------------------
stage_tests() {
  if [ "$cuda" = 1 ]; then
    "$py" -m pytest -q -p no:cacheprovider -x tests/kernels tests/test_benchmark_paths.py \
      --deselect tests/kernels/test_compile_gpu.py
  else
    say "tests: no CUDA, native kernel tests skipped; the benchmark-path test only (plumbing)"
    "$py" -m pytest -q -p no:cacheprovider tests/test_benchmark_paths.py
  fi
}

stage_kernels() {
  local cases=${KERNEL_CASES:-session}
  if [ "$cuda" = 1 ]; then
    [ "$cases" = session ] && export FASTALIGN_BENCH_SESSION=1
  else
    say "kernels: no CUDA, the quick CPU table instead (no fraction of a GPU's limits)"
    export FASTALIGN_BENCH_QUICK=1
  fi
  "$py" -m benchmarks -k "test_logprobs and (${1:-test})" && cp benchmarks/out/results.md benchmarks/out/latest.json "$results/"
}

stage_dpo() {
  if [ "$cuda" = 0 ]; then
    say "dpo: no CUDA, the bf16 DPO step against TRL and TRL + Liger skipped"
    return 0
  fi
  # Peers run with the same interpreter: TRL and liger-kernel come from .whl/. Each run is a fresh
  # process (CUDA start, Triton compiles): 1 round of 3 systems by default.
  "$py" -m benchmarks.peers --profile gpu --peer-python "$(command -v "$py")" \
    --systems fastalign,trl,trl-liger --rounds "${ROUNDS:-1}" || return $?
  cp benchmarks/out/vs_trl_gpu/vs_trl.md benchmarks/out/vs_trl_gpu/vs_trl.png benchmarks/out/vs_trl_gpu/runs.jsonl \
    "$results/" 2>/dev/null || true
}

# run NAME LIMIT [ARGS]: one stage under `timeout`, its log in $OUT/NAME.log; never stops the others.
failed=0
run() {
  local name=$1 limit=$2
  shift 2
  say "$name: start (limit ${limit}s)"
  ( set -o pipefail; export -f say "stage_$name"; export py results started cuda
    timeout --kill-after=10 "$limit" bash -c "stage_$name \"\$@\"" _ "$@" 2>&1 | tee "$results/$name.log" )
  local rc=$?
  case $rc in
    0) say "$name: done" ;;
    124|137) say "$name: STOPPED at its ${limit}s limit (partial log in $name.log)"; failed=1 ;;
    *) say "$name: FAILED, exit $rc (see $name.log)"; failed=1 ;;
  esac
}

case "$stage" in
  all)
    run tests "${LIMIT_TESTS:-120}"
    run kernels "${LIMIT_KERNELS:-180}"
    run dpo "${LIMIT_DPO:-180}"
    say "all stages ran in $(($(date +%s) - started))s; logs and tables in $results"
    ;;
  tests) run tests "${LIMIT_TESTS:-540}" ;;
  kernels) run kernels "${LIMIT_KERNELS:-540}" "${2:-test}" ;;
  dpo) run dpo "${LIMIT_DPO:-540}" ;;
  *)
    echo "unknown stage $stage: nothing (all), tests, kernels or dpo" >&2
    exit 2
    ;;
esac
exit $failed
