#!/usr/bin/env bash
# One call on a lent GPU (no network needed), run from a clean copy:
#
#   bash bench/device_check.sh            # OUT defaults to ./bench/out
#
# Stages, each under its own `timeout` so a hang cannot eat the lease:
#   1. environment (nvidia-smi, python / torch / triton / optional packages)   -> env.txt
#   2. offline install (pip -e, no deps, no index, the image's setuptools);
#      fallback PYTHONPATH=$PWD                                                   -> env.txt
#   3. GPU tests:  pytest -m gpu over every tests/ file that uses the gpu marker
#      (bf16, large shapes, int64 offsets, CUDA graphs, compiled models)          -> tests.log
#   4. core tests: pytest tests/ops/test_lora_linear.py (CPU tensors, as in CI)       -> tests.log
#   5. strategy cache: python -m bench --tune (Llama-7B shapes; winners per shape)   -> bench.log
#      benchmark:  python -m bench --cases headline,host (one case per goal P1..P7c, Q1..Q3, D1..D4
#      (DoRA, D3 n/a: a CPU goal), S1..S3 (serving delta: packed q|k|v decode, prefill), M-GPU (one
#      MoE experts block, fused vs the grouped_mm block alone; M-speed-CPU, M-memory n/a: CPU goals;
#      M2 decode and M3 prefill as information, last), then the
#      host-time cases of goals H1..H7: us per call, real Triton launches and no-op'd ones;
#      its own --time-budget so it reports before the stage limit)               -> bench.log,
#      bench.json, bench.md, time_vs_M.png, ratios.png
#   6. summary: stage results, then the goals table LAST                          -> summary.txt
# Everything lands flat in $OUT: 8 files at most (the device tool returns no more).
# DEVICE_CHECK_SKIP_INSTALL=1 skips the pip step (local runs that should not touch an
# existing environment). Whole script: under 8 minutes (DEVICE_CHECK_BUDGET_S, default
# 420 s, plus at most 15 s of kill grace per stage). Without CUDA it still runs: the GPU
# tests skip and the benchmark does its CPU harness run (small shapes, torch paths).
# Only the standard library, torch, triton and numpy are needed; pytest for stages 3-4;
# peft, matplotlib, tqdm, xdist are used when present.
# bench.md is what gets committed as bench/results/<date>-<gpu>.md (it holds the command).
set -u
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET LORA_FUSED_BACKEND

cd "$(dirname "$0")/.." || exit 1
ROOT=$PWD
OUT=${OUT:-$ROOT/bench/out}
mkdir -p "$OUT"
BUDGET=${DEVICE_CHECK_BUDGET_S:-420}
SECONDS=0
SUMMARY=()

if [ -z "${PYTHON:-}" ]; then
  for c in python3 python; do
    if command -v "$c" >/dev/null 2>&1 && "$c" -c "import torch" >/dev/null 2>&1; then PYTHON=$c; break; fi
  done
fi
PYTHON=${PYTHON:-python3}

# stage_timeout WANT RESERVE: WANT seconds, cut so that RESERVE seconds stay for later stages.
stage_timeout() {
  local want=$1 reserve=$2 left
  left=$(( BUDGET - SECONDS - reserve ))
  [ "$left" -lt "$want" ] && want=$left
  [ "$want" -lt 10 ] && want=10
  echo "$want"
}

# run_stage NAME LOG TIMEOUT CMD...: appended (tee -a) to $OUT/LOG, SIGINT at the limit (pytest
# and the benchmark then print what they have), SIGKILL 15 s later.
run_stage() {
  local name=$1 log=$2 limit=$3; shift 3
  local t0=$SECONDS rc mark
  mark="=== [$name] (limit ${limit}s, at ${SECONDS}s of ${BUDGET}s): $*"
  echo
  echo "$mark" | tee -a "$OUT/$log"
  timeout -s INT -k 15 "$limit" "$@" 2>&1 | tee -a "$OUT/$log"
  rc=${PIPESTATUS[0]}
  local status="rc=$rc"
  [ "$rc" -eq 124 ] && status="TIMEOUT after ${limit}s"
  [ "$rc" -eq 137 ] && status="KILLED after ${limit}s"
  local last part
  part=$(sed -n "\\|^=== \\[$name\\]|,\$p" "$OUT/$log")   # this stage's part of the log
  if echo "$part" | grep -q "^goals: "; then  # the benchmark: its goal counts
    last=$(echo "$part" | grep "^goals: " | tail -n 1)
  else                                       # pytest: its final counts line
    last=$(echo "$part" | grep -E "[0-9]+ (passed|failed|skipped|errors?|deselected)|no tests ran" | tail -n 1)
  fi
  SUMMARY+=("$(printf '%-11s %-22s %4ss  %s' "$name" "$status" "$((SECONDS - t0))" "$last")")
  return 0
}

# ---------------------------------------------------------------- 1. environment
{
  echo "=== [env] $(date -u '+%Y-%m-%d %H:%M:%S UTC') host $(hostname) $(uname -m)"
  echo "repo: $ROOT  commit: $(git rev-parse --short HEAD 2>/dev/null || echo '?')" \
       "$(git status --porcelain 2>/dev/null | wc -l | tr -d ' ') files changed"
  echo "python: $PYTHON ($(command -v "$PYTHON"))"
  if command -v nvidia-smi >/dev/null 2>&1; then
    timeout 20 nvidia-smi
    timeout 20 nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used,clocks.sm,clocks.max.sm,clocks.mem,temperature.gpu,power.draw,power.limit --format=csv
  else
    echo "nvidia-smi: not found (no GPU here: GPU stages will skip)"
  fi
  timeout 60 "$PYTHON" - <<'EOF'
import platform, sys
print("python", platform.python_version(), sys.executable)
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    l2 = getattr(p, "L2_cache_size", 0)
    print(f"device {p.name}: cc {p.major}.{p.minor}, {p.multi_processor_count} SMs, "
          f"{p.total_memory / 2**30:.1f} GiB, L2 {l2 / 2**20:.0f} MiB")
try:
    import triton
    print("triton", triton.__version__)
except Exception as exc:
    print("triton: not importable:", exc)
for name in ("numpy", "setuptools", "pytest", "xdist", "hypothesis", "pytest_benchmark", "peft",
             "transformers", "matplotlib", "tqdm"):
    try:
        mod = __import__(name)
        print(name, getattr(mod, "__version__", "?"))
    except Exception as exc:
        print(name, "missing:", type(exc).__name__)
EOF
} 2>&1 | tee "$OUT/env.txt"
HAS_CUDA=$(timeout 60 "$PYTHON" -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)
SUMMARY+=("$(printf '%-11s %-22s %4ss  %s' env "cuda=$HAS_CUDA" "$SECONDS" "$(grep -m1 -E '^device ' "$OUT/env.txt")")")

# ---------------------------------------------------------------- 2. offline install
if [ "${DEVICE_CHECK_SKIP_INSTALL:-0}" = "1" ]; then
  echo "=== [install] skipped (DEVICE_CHECK_SKIP_INSTALL=1)" | tee -a "$OUT/env.txt"
else
  run_stage install env.txt "$(stage_timeout 60 300)" \
    "$PYTHON" -m pip install --no-deps --no-build-isolation --no-index -e .
fi
if (cd /tmp && ROOT=$ROOT timeout 60 "$PYTHON" -c "import os, lora_fused, lora_fused.kernels.lora_linear as k; \
assert os.path.realpath(lora_fused.__file__).startswith(os.path.realpath(os.environ['ROOT'])), lora_fused.__file__; \
print('import ok:', lora_fused.__file__, k.__file__)") \
     >>"$OUT/env.txt" 2>&1; then
  echo "import check: $(tail -n 1 "$OUT/env.txt")"
else
  export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
  echo "pip -e install unusable: falling back to PYTHONPATH=$PYTHONPATH" | tee -a "$OUT/env.txt"
  SUMMARY+=("$(printf '%-11s %s' install "fallback PYTHONPATH=$ROOT (see env.txt)")")
fi

# ---------------------------------------------------------------- 3. GPU tests
PYTEST_OPTS=(-p no:cacheprovider -rfEs --durations=12 -o faulthandler_timeout=150)
GPU_PAR=()
# Several workers share the GPU: Triton/Inductor compilation (most of the time) runs in parallel.
if [ "$HAS_CUDA" = "1" ] && "$PYTHON" -c "import xdist" >/dev/null 2>&1; then
  GPU_PAR=(-n "${GPU_TEST_WORKERS:-4}")
fi
mapfile -t GPU_FILES < <(grep -rlE 'pytest\.mark\.gpu' --include='test_*.py' tests 2>/dev/null)
[ "${#GPU_FILES[@]}" -eq 0 ] && GPU_FILES=(tests/kernels/test_gpu.py)
run_stage gpu-tests tests.log "$(stage_timeout 200 180)" \
  "$PYTHON" -m pytest -q -m gpu --continue-on-collection-errors "${PYTEST_OPTS[@]}" \
  ${GPU_PAR[@]+"${GPU_PAR[@]}"} "${GPU_FILES[@]}"

# ---------------------------------------------------------------- 4. core tests
if [ -f tests/ops/test_lora_linear.py ]; then
  run_stage core-tests tests.log "$(stage_timeout 60 160)" \
    "$PYTHON" -m pytest -q "${PYTEST_OPTS[@]}" tests/ops/test_lora_linear.py
fi

# ---------------------------------------------------------------- 5. strategy cache, then benchmark
# --tune times every strategy x block config for Llama-7B's layer shapes (decode to prefill,
# with and without dropout) and caches the winners (~/.cache/lora_fused): the benchmark's
# `fused` rows then run the measured choice. Its log (which strategy won each shape) heads
# bench.log; cut at its limit, the buckets measured so far stay cached.
if [ "$HAS_CUDA" = "1" ]; then
  run_stage tune bench.log "$(stage_timeout 120 160)" "$PYTHON" -m bench --tune --model llama-7b
fi
LIMIT=$(stage_timeout 220 5)
BENCH_ARGS=(--cases headline,host --out "$OUT" --time-budget $(( LIMIT > 90 ? LIMIT - 45 : LIMIT / 2 )))
if [ "$HAS_CUDA" != "1" ] || [ "$LIMIT" -lt 150 ]; then BENCH_ARGS+=(--quick); fi
run_stage bench bench.log "$LIMIT" "$PYTHON" -m bench "${BENCH_ARGS[@]}"

# ---------------------------------------------------------------- 6. summary, goals table last
{
  echo
  echo "=== summary ($(date -u '+%H:%M:%S UTC'), ${SECONDS}s of ${BUDGET}s; files in $OUT: $(ls "$OUT" | tr '\n' ' '))"
  for line in "${SUMMARY[@]}"; do echo "  $line"; done
  grep -hE "^(FAILED|ERROR) " "$OUT/tests.log" 2>/dev/null | head -n 25 | sed 's/^/  /'
  echo
  # The strategy each headline shape runs (4096 x 4096, r 16: --tune's winners, forward and backward)
  grep -E "^tune: q\|k\|v\|o_proj +M=(1|16|64|8192) " "$OUT/bench.log" 2>/dev/null | sed 's/^/  /'
  echo
  if grep -q "^GOALS" "$OUT/bench.log" 2>/dev/null; then
    sed -n '/^GOALS/,$p' "$OUT/bench.log"
  else
    echo "GOALS: no table (the benchmark did not finish; see bench.log)"
    tail -n 15 "$OUT/bench.log" 2>/dev/null
  fi
} 2>&1 | tee "$OUT/summary.txt"
