#!/usr/bin/env bash
# The one command for a GPU host: its own venv (.[serve,gpu,export,dev,bench]: onnxruntime-gpu, never the CPU onnxruntime),
# the doctor, ConvNeXt-T -> fp32/fp16/bf16 ONNX, TensorRT engines fp32/fp16/bf16 with parity, ONNX Runtime CUDA
# parity (on the CUDA provider for real), pytest -m gpu, a short benchmark and the modernization roadmap on the GPU
# engines. Every step runs even when an earlier one failed; the report (OUT_DIR/report.md + OUT_DIR/logs/) says
# which, and the exit status is 1 if any did. A GPU below compute capability 8.0 (Turing) has no bf16: the bf16
# engine step is skipped with the reason (not a failure) and the roadmap times the other GPU engines.
#
# Usage: bash scripts/gpu_check.sh [--dry-run] [OUT_DIR]      (OUT_DIR default: gpu-check-<UTC time>)
# Needs: NVIDIA driver >= 580 + a GPU of compute capability >= 7.5, python3.11+ with venv, PyPI and
#        pypi.nvidia.com (TensorRT's libraries; mirror: NVIDIA_PYPI_URL=...). Env: GPU_VENV (default .venv-gpu),
#        PYTHON (default python3), ROADMAP_STEPS (step keys for the roadmap step, e.g. "kernel7 gelu"; default all).
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DRY_RUN=0
OUT=""
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY_RUN=1 ;;
    -h|--help) sed -n '2,13p' "${BASH_SOURCE[0]}"; exit 0 ;;
    -*) echo "gpu_check.sh: unknown option $arg" >&2; exit 2 ;;
    *) OUT="$arg" ;;
  esac
done
OUT="${OUT:-$ROOT/gpu-check-$(date -u +%Y%m%dT%H%M%SZ)}"
VENV="${GPU_VENV:-$ROOT/.venv-gpu}"
PYTHON="${PYTHON:-python3}"
NVIDIA_PYPI_URL="${NVIDIA_PYPI_URL:-https://pypi.nvidia.com}"
PY="$VENV/bin/python"
REPO="$OUT/models"
MODEL=convnext-tiny
# bench/roadmap_engines.py: BF16_MIN_COMPUTE_CAPABILITY and gpu_engines_for (tests/deploy checks they agree).
BF16_MIN_MAJOR=8
PRE_AMPERE_GPU_ENGINES="tensorrt-fp16 onnxruntime-cuda-fp32"
BF16_SKIP_MARK="needs a GPU of compute capability >= 8.0"  # in every bf16 skip reason (bench's bf16_problem too)

bf16_skip_reason() {  # why this host's GPUs cannot build bf16 engines (one below compute capability 8.0), or nothing
  local name cap
  while IFS=, read -r name cap; do
    cap="${cap// /}"
    if [[ "$cap" =~ ^[0-9]+\.[0-9]+$ ]] && [ "${cap%%.*}" -lt "$BF16_MIN_MAJOR" ]; then
      echo "bf16 $BF16_SKIP_MARK (Ampere or newer); $name is $cap"
      return
    fi
  done < <(nvidia-smi --query-gpu=name,compute_cap --format=csv,noheader 2>/dev/null)
}

BF16_SKIP="$(bf16_skip_reason)"
ROADMAP_ENGINES=gpu ROADMAP_TENSORRT=fp16/bf16
if [ -n "$BF16_SKIP" ]; then ROADMAP_ENGINES="$PRE_AMPERE_GPU_ENGINES" ROADMAP_TENSORRT=fp16; fi

STEPS=(
  "nvidia-smi|the GPU and driver as nvidia-smi sees them"
  "venv|create $VENV, install .[serve,gpu,export,dev,bench] (onnxruntime-gpu, TensorRT, cuda-python; no CPU onnxruntime)"
  "doctor|python -m service doctor: driver, CUDA, cuDNN, TensorRT, providers that load, a one-layer engine"
  "export|ConvNeXt-T (random init) -> fp32 + fp16 + bf16 ONNX with parity vs PyTorch"
  "tensorrt-fp32|TensorRT fp32 engine (batch 1..32) + parity vs ONNX Runtime fp32"
  "tensorrt-fp16|TensorRT fp16 engine (batch 1..32) + parity vs ONNX Runtime fp32"
  "tensorrt-bf16|${BF16_SKIP:+skipped: $BF16_SKIP; }TensorRT bf16 engine (batch 1..32) + parity vs ONNX Runtime fp32"
  "ort-cuda|ONNX Runtime CUDAExecutionProvider (session.get_providers()[0] checked) fp32/fp16 within the export parity thresholds vs CPU fp32"
  "pytest-gpu|pytest -m gpu tests/gpu (a skipped test counts as a failure here, but for bf16 on a GPU without it)"
  "bench|python -m bench engine on the CUDA provider, fp32 + fp16, batch 1/8/32"
  "roadmap|python -m bench roadmap --engines $ROADMAP_ENGINES: TensorRT $ROADMAP_TENSORRT + ORT CUDA fp32 per Table 10 step (OUT_DIR/roadmap/)"
)

if [ "$DRY_RUN" = 1 ]; then
  echo "gpu_check.sh --dry-run: would write $OUT/report.md and $OUT/logs/, running:"
  for entry in "${STEPS[@]}"; do printf '  %-14s %s\n' "${entry%%|*}" "${entry#*|}"; done
  exit 0
fi

mkdir -p "$OUT/logs"
OUT="$(cd "$OUT" && pwd)"
REPO="$OUT/models"
RESULTS=()
FAILED=0
SKIPPED=0

record() {  # name status seconds log
  RESULTS+=("| $1 | $2 | $3 | logs/$(basename "$4") |")
  case "$2" in
    PASS) ;;
    SKIP*) SKIPPED=$((SKIPPED + 1)) ;;
    *) FAILED=$((FAILED + 1)) ;;
  esac
}

write_report() {
  {
    echo "# GPU check $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo
    echo "- host: $(uname -n), commit $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')"
    echo "- GPU: $(nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total --format=csv,noheader 2>/dev/null | head -n 1 || true)"
    echo "- result: $([ "$FAILED" = 0 ] && echo "all steps passed" || echo "$FAILED step(s) FAILED")$(
      [ "$SKIPPED" = 0 ] || echo "; $SKIPPED skipped: $BF16_SKIP")"
    echo
    echo "| step | status | seconds | log |"
    echo "|---|---|---|---|"
    printf '%s\n' "${RESULTS[@]}"
    for log in "$OUT"/logs/*.log; do
      [ -e "$log" ] || continue
      echo
      echo "<details><summary>$(basename "$log")</summary>"
      echo
      echo '```'
      tail -n 40 "$log"
      echo '```'
      echo "</details>"
    done
  } > "$OUT/report.md"
}

run_step() {  # index name function
  local log started=$SECONDS rc
  log="$OUT/logs/$(printf '%02d' "$1")-$2.log"
  echo "== [$1/${#STEPS[@]}] $2"
  ( "$3" ) > "$log" 2>&1
  rc=$?
  if [ "$rc" = 0 ]; then record "$2" PASS $((SECONDS - started)) "$log"
  else record "$2" "FAIL (exit $rc)" $((SECONDS - started)) "$log"; echo "!! $2 failed (exit $rc): $log"; tail -n 5 "$log"; fi
}

skip_step() {  # index name reason: a step this GPU cannot run, recorded with why (not a failure)
  local log
  log="$OUT/logs/$(printf '%02d' "$1")-$2.log"
  echo "== [$1/${#STEPS[@]}] $2: skipped, $3"
  echo "skipped: $3" > "$log"
  record "$2" "SKIP ($3)" 0 "$log"
}

step_nvidia_smi() {
  nvidia-smi
  nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total --format=csv
}

step_venv() {
  [ -x "$PY" ] || "$PYTHON" -m venv "$VENV" || return 1
  "$PY" -m pip install -q --upgrade pip || return 1
  # pip prefers NVIDIA's real TensorRT wheels on $NVIDIA_PYPI_URL to the placeholder sdists on PyPI.
  "$PY" -m pip install -e "${ROOT}[serve,gpu,export,dev,bench]" -c "$ROOT/deploy/gpu-constraints.txt" \
    --extra-index-url "$NVIDIA_PYPI_URL" || return 1
  if "$PY" -m pip show onnxruntime > /dev/null 2>&1; then
    echo "the CPU onnxruntime is installed next to onnxruntime-gpu: $PY -m pip uninstall -y onnxruntime onnxruntime-gpu" \
      "&& $PY -m pip install 'onnxruntime-gpu[cuda,cudnn]==1.31.1'"
    return 1
  fi
  "$PY" -m pip list 2>/dev/null | grep -i -E '^(onnxruntime|tensorrt|cuda-|nvidia-|torch )'
}

step_doctor() {
  "$PY" -m service doctor --json > "$OUT/doctor.json"
  "$PY" -m service doctor
}

step_export() {
  "$PY" -m export onnx --model convnext_tiny --name "$MODEL" --repository "$REPO" --precisions fp32,fp16,bf16
}

tensorrt_step() {
  "$PY" -m export tensorrt --name "$MODEL" --repository "$REPO" --precision "$1" \
    --min-batch 1 --opt-batch 8 --max-batch 32
}
step_tensorrt_fp32() { tensorrt_step fp32; }
step_tensorrt_fp16() { tensorrt_step fp16; }
step_tensorrt_bf16() { tensorrt_step bf16; }

step_ort_cuda() {
  "$PY" "$ROOT/scripts/gpu_check_onnx.py" parity "$REPO" "$MODEL" --provider cuda --precisions fp32 fp16
}

unexpected_skips() {  # pytest -rs output on stdin -> its SKIPPED lines, less bf16's on a GPU without bf16
  if [ -n "$BF16_SKIP" ]; then grep -E '^SKIPPED' | grep -v -F "$BF16_SKIP_MARK"; else grep -E '^SKIPPED'; fi
}

step_pytest_gpu() {
  local summary
  summary="$(cd "$ROOT" && "$PY" -m pytest -m gpu -q -rs -p no:cacheprovider tests/gpu 2>&1)"
  local rc=$?
  echo "$summary"
  if [ -n "$(unexpected_skips <<< "$summary")" ]; then
    echo "a GPU test skipped on this GPU host: see the reasons above"
    return 1
  fi
  return "$rc"
}

step_bench() {
  local precision path
  for precision in fp32 fp16; do
    path="$("$PY" "$ROOT/scripts/gpu_check_onnx.py" path "$REPO" "$MODEL" "$precision")" || return 1
    echo "== $precision: $path"
    "$PY" -m bench engine "$path" --provider cuda --batch-sizes 1 8 32 --iterations 20 || return 1
  done
}

step_roadmap() {  # the longest step: each of 17 steps exports 3 ONNX variants and builds 2 engines
  local steps=()
  # Word splitting on purpose: ROADMAP_STEPS is a space-separated list of step keys.
  # shellcheck disable=SC2206
  [ -n "${ROADMAP_STEPS:-}" ] && steps=(--steps $ROADMAP_STEPS)
  # Word splitting on purpose: ROADMAP_ENGINES is "gpu" or the engine names a pre-Ampere GPU runs.
  # shellcheck disable=SC2086
  (cd "$ROOT" && "$PY" -m bench roadmap --engines $ROADMAP_ENGINES "${steps[@]}" --batch-sizes 1 32 --seconds 2 \
    --out "$OUT/roadmap")
}

preflight_problem() {  # prints why this host cannot run the check at all, if it cannot
  if ! command -v nvidia-smi > /dev/null 2>&1; then
    echo "no NVIDIA driver here (nvidia-smi not found): gpu_check.sh needs a GPU host with driver >= 580;" \
      "in a container, run it with the NVIDIA Container Toolkit (--gpus all). See README.md, 'GPU hosts'."
  elif [ ! -x "$PY" ] && ! "$PYTHON" -c 'import sys, venv, ensurepip; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    echo "$PYTHON cannot make the venv: it is missing, older than 3.11, or lacks venv/ensurepip" \
      "(Debian/Ubuntu: apt-get install python3-venv); point PYTHON=... at a Python 3.11+ that has them."
  fi
}

# Fail fast where the check cannot run: creating the venv downloads gigabytes for nothing.
problem="$(preflight_problem)"
if [ -n "$problem" ]; then
  log="$OUT/logs/00-preflight.log"
  echo "$problem" | tee "$log" >&2
  record preflight "FAIL" 0 "$log"
  write_report
  echo "report: $OUT/report.md" >&2
  exit 2
fi

index=0
for entry in "${STEPS[@]}"; do
  index=$((index + 1))
  name="${entry%%|*}"
  if [ "$name" = tensorrt-bf16 ] && [ -n "$BF16_SKIP" ]; then skip_step "$index" "$name" "$BF16_SKIP"; continue; fi
  run_step "$index" "$name" "step_${name//-/_}"
  if [ "$name" = venv ] && [ -x "$PY" ]; then
    # The project's ONNX Runtime GPU sessions preload the nvidia-* wheels' CUDA libraries (runtime/ort_session.py:
    # preload_cuda_libraries); the loader path names their folders too, as the GPU image's does, for anything that
    # opens them by name without that preload.
    site="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
    export LD_LIBRARY_PATH="$site/nvidia/cu13/lib:$site/nvidia/cudnn/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    export PATH="$VENV/bin:$PATH"
  fi
done

write_report
echo "report: $OUT/report.md ($FAILED step(s) failed)"
[ "$FAILED" = 0 ]
