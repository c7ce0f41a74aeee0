#!/usr/bin/env bash
# The GPU checks of this repository in one run, for a session lent a GPU for about 15 minutes (no network needed).
# At most 7 minutes on one H100 with 16 CPU cores: every step has its own time limit, and none runs past a
# 7-minute deadline from the start (a step that would is cut, and the ones left are recorded as not run).
#
#   0. pre-flight: prints the versions found (Python, torch, Triton, timm, nvcc, GPU); stops at once if one is missing;
#   1. builds rpe_ops in place with its CUDA kernels, for the visible GPU's architecture only;
#   2. a probe that fails unless rpe_ops' CUDA kernels are loaded, `auto` takes the Triton kernel on CUDA, and the
#      kernel runs and equals the sdpa path on a DeiT-S-shaped layer;
#   3. `pytest -m cuda -rs`: fails when a test fails or is skipped (a skip means a kernel did not run);
#   4. tools/benchmark.py at bf16, batch 128, 224 and 384 px: the k, qk and qkv models on `triton` and `sdpa` against
#      timm's plain DeiT-S (flash attention), train throughput and peak memory;
#   5. one training step of the qkv DeiT-S at batch 128 and 384 px on the sdpa path with the lookups of rpe_ops' CUDA
#      kernels and of PyTorch (inside rpe_ops.disabled()), and on the Triton kernel: the same loss and gradients;
#   6. tools/demo.py --device cuda: float16 AMP with the GradScaler (main.py's CUDA default), eval, resume;
#   7. torchrun --nproc_per_node=1 (NCCL) for two steps; 8. main.py --compile for four steps.
# Steps run in order of what their results are worth if the run is cut short. Each step's command, output and status
# are appended to the results file as soon as it ends, so a killed run keeps what ran:
# $OUT/gpu_check_<date>.md when $OUT is set, else tools/gpu_check_<date>.md.
#
# Usage (from anywhere; it runs from the repository root):
#   bash tools/gpu_check.sh             # on the GPU machine: the machine's python3 (torch, Triton, timm, pytest)
#   bash tools/gpu_check.sh --dry-run   # anywhere: the same steps on CPU at tiny sizes (no nvcc, no GPU; no build
#                                       # unless the extension is missing; CUDA tests only collected; the Triton
#                                       # path left out of the CPU benchmark); tests/test_benchmark_tool.py
#   PYTHON=.venv/bin/python bash tools/gpu_check.sh
#
# Expected time on one H100 (16 CPU cores), about 6 minutes: pre-flight 10 s | build ~90 s (nvcc, one architecture,
# MAX_JOBS = cores) | probe ~20 s (Triton compiles the kernel) | pytest -m cuda ~90 s | benchmark.py ~60 s per size |
# the ops/torch step ~20 s | demo ~40 s | torchrun ~20 s | --compile ~40 s. None of it has run on a GPU yet.
# The exit status is non-zero when a step failed, was cut or did not run (the later steps still run).
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
PY=${PYTHON:-python3}
DRY_RUN=0
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY_RUN=1 ;;
    -h | --help) sed -n '2,30p' "$0"; exit 0 ;;
    *) echo "error: unknown argument $arg (expected --dry-run)" >&2; exit 2 ;;
  esac
done

START=$(date +%s)
DEADLINE=$((START + (DRY_RUN ? 1200 : 420))) # 7 minutes on the GPU; the dry run on 2 shared CPU cores takes longer
K_MODEL=deit_small_patch16_224_ctx_product_50_shared_k
QK_MODEL=deit_small_patch16_224_ctx_product_50_shared_qk
QKV_MODEL=deit_small_patch16_224_ctx_product_50_shared_qkv
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX") || exit 2
trap 'rm -rf "$WORK"' EXIT
if [[ $DRY_RUN == 1 ]]; then
  # CPU, tiny, one thread: only whether every command and the Python parts run (the benchmark on the qkv model only,
  # the step limits tripled). Triton runs CPU tensors only in its
  # interpreter (minutes for a model), so the CPU benchmark compares sdpa with the plain model; the kernel's numbers
  # are tested in the interpreter by tests/test_triton_attention.py.
  DEVICE=cpu
  BENCH_COMMON=(--device cpu --threads 1 --batch-size 2 --steps 1 --warmup 1 --memory-repeats 1 --malloc default)
  BENCH_224=("${BENCH_COMMON[@]}" --img-size 32 --impls auto sdpa)
  BENCH_384=("${BENCH_COMMON[@]}" --img-size 48 --impls sdpa)
  BENCH_MODELS=("$QKV_MODEL")
  PYTEST_ARGS=(-m cuda --collect-only -q)
  STEP_ARGS=(cpu 32 2)
  LIMIT_SCALE=3 # 2 shared CPU cores
  TRAIN_ARGS=(--device cpu --num_workers 0)
else
  DEVICE=cuda
  BENCH_COMMON=(--device cuda --amp-dtype bfloat16 --batch-size 128 --steps 6 --warmup 2 --memory-repeats 1)
  BENCH_224=("${BENCH_COMMON[@]}" --img-size 224 --impls triton sdpa)
  BENCH_384=("${BENCH_COMMON[@]}" --img-size 384 --impls triton sdpa)
  BENCH_MODELS=("$K_MODEL" "$QK_MODEL" "$QKV_MODEL")
  PYTEST_ARGS=(-m cuda -q -rs -p no:cacheprovider)
  STEP_ARGS=(cuda 384 128)
  LIMIT_SCALE=1
  TRAIN_ARGS=(--device cuda --num_workers 4)
fi

OUT_DIR=${OUT:-tools}
mkdir -p "$OUT_DIR" || exit 2
RESULTS="$OUT_DIR/gpu_check_$(date -u +%Y%m%d-%H%M%S).md"
FAILED=0

# 0. Pre-flight: the versions, written first; a missing piece stops the run (nothing after it could pass).
VERSIONS=$("$PY" - "$DEVICE" <<'EOF' 2>&1
import importlib, sys
device = sys.argv[1]
missing = []
print(f"Python {sys.version.split()[0]}")
for name in ("torch", "triton", "timm", "pytest"):
    try:
        print(f"{name} {importlib.import_module(name).__version__}")
    except ImportError as err:
        print(f"{name}: MISSING ({err})")
        missing.append(name)
import torch  # noqa: E402
from torch.utils import cpp_extension  # noqa: E402
print(f"CUDA (torch) {torch.version.cuda}; CUDA_HOME {cpp_extension.CUDA_HOME}")
if torch.cuda.is_available():
    print(f"GPU {torch.cuda.get_device_name(0)} (sm_{''.join(map(str, torch.cuda.get_device_capability(0)))})")
elif device == "cuda":
    print("GPU: MISSING (none visible to torch)")
    missing.append("GPU")
sys.exit(f"missing: {', '.join(missing)}" if missing else 0)
EOF
)
PREFLIGHT_RC=$?
NVCC=$(command -v nvcc || { [[ -n ${CUDA_HOME:-} && -x $CUDA_HOME/bin/nvcc ]] && echo "$CUDA_HOME/bin/nvcc"; } || true)
if [[ -n $NVCC ]]; then
  VERSIONS+=$'\n'"nvcc $("$NVCC" --version | tail -n 1)"
elif [[ $DRY_RUN == 0 ]]; then
  VERSIONS+=$'\n'"nvcc: MISSING (not on PATH nor in \$CUDA_HOME/bin)"
  PREFLIGHT_RC=1
else
  VERSIONS+=$'\n'"nvcc: absent (dry run: not needed)"
fi
{
  echo "## GPU check $(date -u '+%Y-%m-%d %H:%M UTC')$([[ $DRY_RUN == 1 ]] && echo ' (dry run, CPU, tiny sizes)')"
  echo
  echo "Commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git status --porcelain 2>/dev/null | grep -q . && echo ' (with uncommitted changes)'); $(nproc) CPU cores; command: bash tools/gpu_check.sh $*"
  echo
  echo '```'
  echo "$VERSIONS"
  echo '```'
  echo
  echo "| step | time | status |"
  echo "|---|---|---|"
} >"$RESULTS"
echo "$VERSIONS" >&2
if [[ $PREFLIGHT_RC != 0 ]]; then
  echo "| pre-flight | $(($(date +%s) - START)) s | FAILED: a tool is missing (see the versions) |" >>"$RESULTS"
  echo "error: pre-flight failed: a tool is missing (see above); results: $RESULTS" >&2
  exit 2
fi
echo "| pre-flight | $(($(date +%s) - START)) s | ok |" >>"$RESULTS"

# run NAME LIMIT_S CMD...: runs CMD for at most LIMIT_S seconds and never past the deadline; appends its row and its
# output (the last 60 lines) to the results file at once.
run() {
  local name=$1 limit=$(($2 * LIMIT_SCALE))
  shift 2
  local start rc output status left
  start=$(date +%s)
  left=$((DEADLINE - start))
  if ((left < 15)); then
    FAILED=1
    echo "| $name | - | NOT RUN (the time budget is spent) |" >>"$RESULTS"
    echo "[gpu_check] $name: not run (budget spent)" >&2
    return
  fi
  ((limit > left)) && limit=$left
  output=$(timeout "$limit" "$@" 2>&1)
  rc=$?
  if [[ $rc == 0 ]]; then
    status=ok
  else
    FAILED=1
    status="FAILED (exit $rc$([[ $rc == 124 ]] && echo ", cut at $limit s"))"
  fi
  {
    echo "| $name | $(($(date +%s) - start)) s | $status |"
    echo
    echo '```'
    echo "\$ $*" | cut -c1-400
    echo "$output" | tail -n 60
    echo '```'
    echo
  } >>"$RESULTS"
  echo "[gpu_check] $name: $status after $(($(date +%s) - start)) s" >&2
}

# pytest whose skips count as failures: a CUDA test that skips did not run its kernel.
pytest_no_skips() {
  local output rc
  output=$("$PY" -m pytest "$@" 2>&1)
  rc=$?
  echo "$output"
  if [[ $rc == 0 ]] && echo "$output" | tail -n 3 | grep -q "skipped"; then
    echo "error: tests were skipped (see the SKIPPED lines): a skipped CUDA test is a failure here"
    return 1
  fi
  return $rc
}

# 1. The extension, in place (ninja reuses unchanged objects). One architecture, the visible GPU's, keeps nvcc short.
if [[ $DRY_RUN == 0 ]]; then
  ARCH=$("$PY" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability(0))')
  run "build rpe_ops (CUDA, sm ${ARCH})" 180 env TORCH_CUDA_ARCH_LIST="$ARCH" RPE_OPS_CUDA=1 MAX_JOBS="$(nproc)" \
    bash -c "cd rpe_ops && '$PY' setup.py build_ext --inplace"
elif ! compgen -G "rpe_ops/_C*.so" >/dev/null; then
  run "build rpe_ops (CPU only)" 300 env RPE_OPS_CUDA=0 bash -c "cd rpe_ops && '$PY' setup.py build_ext --inplace"
fi

# 2. Did the CUDA lookups load, does auto take the Triton kernel on CUDA, does it run and agree with sdpa?
run "probe: rpe_ops CUDA kernels and the Triton kernel ran" 60 "$PY" - "$DEVICE" <<'EOF'
import sys
import torch
import irpe, irpe_attention, rpe_ops
from rpe_ops import triton_attention

device = torch.device(sys.argv[1])
print(rpe_ops.report())
if device.type == "cpu":
    print(f"dry run: Triton available: {triton_attention.triton_available()}; CPU needs its interpreter, not probed")
    assert irpe_attention.resolve_attn_impl("auto", True, 0.0, torch.device("cuda")) in ("triton", "sdpa")
    sys.exit(0)
supported, why = rpe_ops.serves(device, torch.float32)
assert supported, f"rpe_ops' CUDA kernels are not in use: {why}"
path = irpe_attention.resolve_attn_impl("auto", True, 0.0, device)
assert path == "triton", f"auto takes {path!r} on CUDA, not the Triton kernel: {triton_attention.triton_usable(device)}"
modules = irpe.build_rpe(irpe.get_rpe_config(method="product", skip=1, rpe_on="qkv"), 64, 6)
for m in modules:
    m.to(device)
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.1)
q, k, v = (torch.randn(8, 6, 197, 64, device=device, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
calls = []
kernel = triton_attention.triton_rpe_attention
triton_attention.triton_rpe_attention = lambda *a, **kw: calls.append(1) or kernel(*a, **kw)
out = {impl: irpe_attention.rpe_attention(q, k, v, *modules, 14, 14, impl=impl) for impl in ("auto", "sdpa")}
assert calls == [1], "the Triton kernel did not run"
err = (out["auto"].float() - out["sdpa"].float()).abs().max().item()
out["auto"].float().square().sum().backward()
torch.cuda.synchronize()
print(f"Triton kernel ran; max |triton - sdpa| = {err:.3g} (bf16); backward ran")
assert err < 0.05, err
EOF

# 3. CUDA tests; a skip is a failure.
export PY
export -f pytest_no_skips
run "pytest -m cuda" 150 bash -c 'pytest_no_skips "$@"' pytest_no_skips "${PYTEST_ARGS[@]}" tests/

# 4. Benchmarks (the figures for tools/BENCHMARKS.md).
[[ $DRY_RUN == 1 ]] && echo "| benchmark.py: the triton path | - | left out of the dry run (CPU: interpreter only) |" >>"$RESULTS"
run "benchmark.py, k, qk and qkv models, 224 px" 110 "$PY" tools/benchmark.py --models "${BENCH_MODELS[@]}" \
  "${BENCH_224[@]}"
run "benchmark.py, k, qk and qkv models, 384 px" 110 "$PY" tools/benchmark.py --models "${BENCH_MODELS[@]}" \
  "${BENCH_384[@]}"

# 5. One training step of the qkv model: rpe_ops' CUDA lookups vs PyTorch's (sdpa path), and the Triton kernel.
run "qkv DeiT-S step: rpe_ops vs PyTorch lookups, and triton" 60 "$PY" - "${STEP_ARGS[@]}" <<'EOF'
import contextlib, sys
import timm
import torch
import rpe_models, rpe_ops  # noqa: F401
from rpe_ops import triton_attention

device, size, batch = torch.device(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
name = "deit_small_patch16_224_ctx_product_50_shared_qkv"
torch.manual_seed(0)
images = torch.randn(batch, 3, size, size, device=device)
labels = torch.randint(0, 1000, (batch,), device=device)
state = None
results = {}
served, why = rpe_ops.serves(device, torch.float32)
assert served, f"rpe_ops' lookups do not serve {device}: {why}"
runs = [("sdpa", "ops"), ("sdpa", "torch")]
if triton_attention.triton_usable(device)[0]:
    runs.append(("triton", "ops"))
for impl, backend in runs:
    model = timm.create_model(name, img_size=size, attn_impl=impl).to(device)
    if state is None:
        for n, p in model.named_parameters():
            if "rpe" in n:
                torch.nn.init.normal_(p, std=0.02)  # tables start at zero; random ones make the lookups count
        state = model.state_dict()
    model.load_state_dict(state)
    # bf16 autocast on the GPU; float32 in the dry run (Triton's interpreter computes tl.dot on bf16 wrongly)
    lookups = rpe_ops.disabled() if backend == "torch" else contextlib.nullcontext()
    with lookups, torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        loss = torch.nn.functional.cross_entropy(model(images), labels)
    loss.backward()
    results[impl, backend] = loss.item(), {n: p.grad.float() for n, p in model.named_parameters()}
    print(f"{impl:6s} backend {backend:5s}: loss {loss.item():.6f}")
ref_loss, ref_grads = results["sdpa", "torch"]
# a gradient's difference relative to its own size, or to 1e-3 of the largest one: some (the last block's rpe_k)
# are analytically ~0, their values rounding noise
floor = 1e-3 * max(g.norm().item() for g in ref_grads.values())
for key, (loss, grads) in results.items():
    worst = max((g - ref_grads[n]).norm().item() / max(ref_grads[n].norm().item(), floor) for n, g in grads.items())
    print(f"{key}: |loss - torch's| = {abs(loss - ref_loss):.2e}, worst relative gradient difference {worst:.2e}")
    # bf16 autocast: both runs round the same activations; they differ in the lookups' accumulation order only
    assert abs(loss - ref_loss) < 2e-2 and worst < 5e-2, key
EOF

# 6-8. The training script: the demo (fp16 AMP + GradScaler on CUDA, eval, resume), torchrun, --compile.
if [[ $DRY_RUN == 0 ]]; then
  run "tools/demo.py --device cuda (fp16 AMP, GradScaler, eval, resume)" 90 "$PY" tools/demo.py --device cuda \
    --out "$WORK/demo" --epochs 2 --min-acc 0
fi
run "synthetic dataset (4 classes x 8 images)" 60 "$PY" tools/make_synthetic_dataset.py --out "$WORK/data" \
  --num-classes 4 --train-per-class 8 --val-per-class 2 --image-size 56 --seed 0
MAIN_ARGS=(--model deit_tiny_patch16_224_ctx_product_50_shared_k --data-path "$WORK/data" --input-size 48 --epochs 1
  --batch-size 16 --no-model-ema "${TRAIN_ARGS[@]}")
run "torchrun --nproc_per_node=1, two steps" 60 "$PY" -m torch.distributed.run --standalone --nproc_per_node=1 \
  main.py "${MAIN_ARGS[@]}" --output_dir "$WORK/torchrun"
if [[ $DRY_RUN == 0 ]]; then
  run "main.py --compile, four steps" 90 "$PY" main.py "${MAIN_ARGS[@]}" --batch-size 8 --compile \
    --output_dir "$WORK/compile"
else  # inductor compiles the train and eval graphs for minutes on 2 shared CPU cores
  echo "| main.py --compile | - | left out of the dry run (CPU compile takes minutes) |" >>"$RESULTS"
fi

echo "Total: $(($(date +%s) - START)) s; exit status $FAILED" >>"$RESULTS"
cat "$RESULTS"
echo "[gpu_check] results: $RESULTS" >&2
exit $FAILED
