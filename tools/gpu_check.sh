#!/usr/bin/env bash
# The GPU checks of this repository in one run, for a session lent a GPU (no network needed):
#
#   1. builds rpe_ops in place with its CUDA kernels, for the visible GPU's architecture only;
#   2. runs the CUDA tests (`pytest -m cuda`);
#   3. runs the three benchmarks at DeiT-S shapes, bf16, batch 128: tools/benchmark.py (train throughput, inference
#      and peak memory of the k and qkv models against timm's plain DeiT-S, every attention path, 224 and 384 px),
#      tools/benchmark_attention.py (one layer, k and qkv) and tools/benchmark_ops.py (the lookups alone);
#   4. writes one dated block of results (machine, versions, commands, outputs, time per step) to
#      $OUT/gpu_check_<date>.md when $OUT is set, else tools/gpu_check_<date>.md, and prints it.
#
# Usage (from anywhere; it runs from the repository root):
#   bash tools/gpu_check.sh             # on the GPU machine: the machine's python3 (torch, timm, pytest installed)
#   bash tools/gpu_check.sh --dry-run   # anywhere: the same steps on CPU at tiny sizes (no build unless the
#                                       # extension is missing, CUDA tests only collected); tests/test_benchmark_tool.py
#   PYTHON=.venv/bin/python bash tools/gpu_check.sh
#
# Expected time on one H100/H200 (16 CPU cores), about 6 minutes in all, each step bounded by `timeout`:
#   build ~2 min (nvcc, one architecture, MAX_JOBS = cores) | pytest -m cuda ~1 min | benchmark.py 224 px all paths
#   ~1.5 min (flex compiles once, ~30 s) | benchmark.py 384 px auto+math ~1 min | benchmark_attention.py ~20 s |
#   benchmark_ops.py ~30 s.
# The exit status is non-zero when a step failed (its output is in the block, and the later steps still run).
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
PY=${PYTHON:-python3}
DRY_RUN=0
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY_RUN=1 ;;
    -h | --help) sed -n '2,24p' "$0"; exit 0 ;;
    *) echo "error: unknown argument $arg (expected --dry-run)" >&2; exit 2 ;;
  esac
done

K_MODEL=deit_small_patch16_224_ctx_product_50_shared_k
QKV_MODEL=deit_small_patch16_224_ctx_product_50_shared_qkv
if [[ $DRY_RUN == 1 ]]; then
  # CPU, tiny, one thread: only whether every command and the Python parts run (flex has no CPU backward, so it is
  # left out of training; one thread, as OpenMP threads that wait for each other crawl on a shared machine)
  DEVICE=cpu
  BENCH_COMMON=(--device cpu --threads 1 --batch-size 2 --steps 1 --warmup 1 --memory-repeats 1 --malloc default)
  MODEL_ARGS_224=("${BENCH_COMMON[@]}" --img-size 32 --impls auto math)
  MODEL_ARGS_384=("${BENCH_COMMON[@]}" --img-size 48 --impls auto)
  ATTN_ARGS=(--device cpu --threads 1 --dtype float32 --batch-size 1 --heads 2 --grid 3 --reps 1 --warmup 1
    --impls auto sdpa math)
  OPS_ARGS=(--device cpu --threads 1 --quick --cases 2x2 --reps 1)
  PYTEST_ARGS=(-m cuda --collect-only -q)
else
  DEVICE=cuda
  BENCH_COMMON=(--device cuda --amp-dtype bfloat16 --batch-size 128 --steps 10 --warmup 3 --memory-repeats 1)
  MODEL_ARGS_224=("${BENCH_COMMON[@]}" --img-size 224 --impls auto sdpa flex math)
  MODEL_ARGS_384=("${BENCH_COMMON[@]}" --img-size 384 --impls auto math)
  ATTN_ARGS=(--device cuda --dtype bfloat16 --batch-size 128 --reps 30 --warmup 5 --impls sdpa flex math)
  OPS_ARGS=(--device cuda)
  PYTEST_ARGS=(-m cuda -q -p no:cacheprovider)
fi

OUT_DIR=${OUT:-tools}
mkdir -p "$OUT_DIR" || exit 2
STAMP=$(date -u +%Y%m%d-%H%M%S)
RESULTS="$OUT_DIR/gpu_check_$STAMP.md"
FAILED=0
SUMMARY=()

# run NAME LIMIT_S CMD...: runs CMD with a time limit, appends its command, output and status to the block.
run() {
  local name=$1 limit=$2
  shift 2
  local start end rc output
  start=$(date +%s)
  output=$(timeout "$limit" "$@" 2>&1)
  rc=$?
  end=$(date +%s)
  if [[ $rc != 0 ]]; then
    FAILED=1
  fi
  SUMMARY+=("| $name | $((end - start)) s | $([[ $rc == 0 ]] && echo ok || echo "FAILED (exit $rc$([[ $rc == 124 ]] && echo ', timed out'))") |")
  {
    echo
    echo "### $name"
    echo
    echo '```bash'
    echo "$*"
    echo '```'
    echo
    echo '```'
    echo "$output" | tail -n 80
    echo '```'
  } >>"$RESULTS.steps"
  echo "[gpu_check] $name: exit $rc after $((end - start)) s" >&2
}

GPU=$($PY - <<'EOF' 2>/dev/null
import torch
print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU visible")
EOF
)
VERSIONS=$($PY -c 'import sys, torch, timm; print(f"Python {sys.version.split()[0]}, torch {torch.__version__}, CUDA {torch.version.cuda}, timm {timm.__version__}")' 2>&1)
if [[ $DEVICE == cuda && $GPU == "no GPU visible" ]]; then
  echo "error: no CUDA GPU is visible to $PY (use --dry-run to check the script on CPU)" >&2
  exit 2
fi
: >"$RESULTS.steps"

# 1. The extension, in place (ninja reuses unchanged objects). One architecture, the visible GPU's, keeps nvcc short.
if [[ $DRY_RUN == 0 ]]; then
  ARCH=$($PY -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability(0))')
  run "build rpe_ops (CUDA, sm ${ARCH})" 300 env TORCH_CUDA_ARCH_LIST="$ARCH" RPE_OPS_CUDA=1 MAX_JOBS="$(nproc)" \
    bash -c "cd rpe_ops && $PY setup.py build_ext --inplace"
elif ! compgen -G "rpe_ops/_C*.so" >/dev/null; then
  run "build rpe_ops (CPU only)" 300 env RPE_OPS_CUDA=0 bash -c "cd rpe_ops && $PY setup.py build_ext --inplace"
fi
run "backend report" 60 "$PY" -m irpe

# 2. CUDA tests.
run "pytest -m cuda" 240 "$PY" -m pytest "${PYTEST_ARGS[@]}" tests/

# 3. Benchmarks.
# flex has no values path: benchmark.py says it skips the qkv model there and measures the rest
run "benchmark.py, k and qkv models, 224 px" 240 "$PY" tools/benchmark.py --models "$K_MODEL" "$QKV_MODEL" \
  "${MODEL_ARGS_224[@]}"
run "benchmark.py, k and qkv models, 384 px" 180 "$PY" tools/benchmark.py --models "$K_MODEL" "$QKV_MODEL" \
  "${MODEL_ARGS_384[@]}"
run "benchmark_attention.py, rpe on k" 90 "$PY" tools/benchmark_attention.py --rpe-on k "${ATTN_ARGS[@]}"
run "benchmark_attention.py, rpe on qkv" 90 "$PY" tools/benchmark_attention.py --rpe-on qkv "${ATTN_ARGS[@]}"
run "benchmark_ops.py" 120 "$PY" tools/benchmark_ops.py "${OPS_ARGS[@]}"

# 4. One dated block.
{
  echo "## GPU check $(date -u '+%Y-%m-%d %H:%M UTC')$([[ $DRY_RUN == 1 ]] && echo ' (dry run, CPU, tiny sizes)')"
  echo
  echo "Machine: $GPU; $(nproc) CPU cores; $VERSIONS; commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  echo "$(git status --porcelain 2>/dev/null | grep -q . && echo '(with uncommitted changes)')"
  echo "Command: bash tools/gpu_check.sh $*"
  echo
  echo "| step | time | status |"
  echo "|---|---|---|"
  printf '%s\n' "${SUMMARY[@]}"
  cat "$RESULTS.steps"
} >"$RESULTS"
rm -f "$RESULTS.steps"
cat "$RESULTS"
echo "[gpu_check] results: $RESULTS" >&2
exit $FAILED
