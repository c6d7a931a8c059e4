#!/usr/bin/env bash
# The one command for a GPU host. Its steps, and what each should take on an H100/H200-class host (estimates: no GPU
# has run them yet); every step runs under its own time limit (--dry-run prints them), even when an earlier one failed:
#   nvidia-smi       seconds    the GPU and driver as nvidia-smi sees them
#   venv             5-15 min   .venv-gpu with .[serve,gpu,export,train,dev,bench]: onnxruntime-gpu (never the CPU
#                               onnxruntime), TensorRT, cuda-python, CUDA torch: several GB from PyPI and pypi.nvidia.com
#   doctor           < 1 min    python -m service doctor: driver, CUDA, cuDNN, TensorRT, the providers that load
#   export           1-3 min    ConvNeXt-T (random init) -> fp32/fp16/bf16 ONNX with parity (bf16's is numpy: the most)
#   tensorrt-fp32    1-3 min    TensorRT engine (batch 1..32) + parity vs ONNX Runtime fp32; the same for fp16 and bf16
#   ort-cuda         < 1 min    ONNX Runtime CUDA fp32/fp16 vs CPU fp32, the session checked to run on CUDA
#   train-amp        < 3 min    python -m training on the GPU: AMP fp16 (GradScaler) and bf16, 20 steps of the demo;
#                               then fp16 with channels_last, torch.compile (not without a C compiler) and EMA,
#                               and a --resume of that run
#   pytest-gpu       3-8 min    pytest -m gpu tests/gpu
#   bench            ~1 min     python -m bench engine on the CUDA provider, fp32 + fp16, batch 1/8/32
#   roadmap          3-7 min    per roadmap step: TensorRT fp16/bf16 + ORT CUDA fp32 (default ROADMAP_STEPS: kernel7
#                               gelu, the cost of ReLU -> GELU); all 17 Table 10 steps with --full-roadmap: 1-2 hours
# In all 15-35 min after the venv. OUT_DIR/report.md (+ logs/) is rewritten before and after every step and when the
# check is stopped (Ctrl-C, SIGTERM): it says which steps passed, failed, timed out, were skipped or not run. Exit
# status 1 if any failed or timed out, 2 when the host cannot run the check, 128+n when signal n stopped it. A GPU
# below compute capability 8.0 (Turing) has no bf16: its bf16 steps are skipped with the reason (not a failure).
#
# Usage: bash scripts/gpu_check.sh [--dry-run] [--python PY] [--full-roadmap] [OUT_DIR]  (default gpu-check-<UTC time>)
#   --python PY     no install (a host without PyPI, whose PY has CUDA torch): the venv step is skipped, every step
#                   runs with PY's packages and the checkout on PYTHONPATH, and a step needing a package PY lacks is
#                   NOT RUN with the package named (not a failure); pytest-gpu runs the tests/gpu files PY can
#   --full-roadmap  the roadmap step over all 17 Table 10 steps (or ROADMAP_STEPS=all)
# Env: GPU_CHECK_PYTHON (as --python), ROADMAP_STEPS (step keys, default "kernel7 gelu"), GPU_CHECK_LIMIT_<STEP>
#      (a step's limit in seconds, e.g. GPU_CHECK_LIMIT_ROADMAP=3600), GPU_CHECK_BUDGET_S (the whole check's seconds:
#      a step gets at most what is left, and none once it is spent), GPU_VENV (.venv-gpu), PYTHON (python3, makes
#      the venv), NVIDIA_PYPI_URL (a mirror of pypi.nvidia.com, TensorRT's libraries).
# Needs: NVIDIA driver >= 580 + a GPU of compute capability >= 7.5, GNU timeout; for the venv python3.11+ with venv.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DRY_RUN=0
FULL_ROADMAP=0
OUT=""
NO_INSTALL_PYTHON="${GPU_CHECK_PYTHON:-}"
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --full-roadmap) FULL_ROADMAP=1 ;;
    --python)
      [ $# -ge 2 ] || { echo "gpu_check.sh: --python needs an interpreter, e.g. --python python3" >&2; exit 2; }
      NO_INSTALL_PYTHON="$2"; shift ;;
    --python=*) NO_INSTALL_PYTHON="${1#--python=}" ;;
    -h|--help) sed -n '2,/^[^#]/{/^#/s/^# \{0,1\}//p}' "${BASH_SOURCE[0]}"; exit 0 ;;
    -*) echo "gpu_check.sh: unknown option $1" >&2; exit 2 ;;
    *) OUT="$1" ;;
  esac
  shift
done
OUT="${OUT:-$ROOT/gpu-check-$(date -u +%Y%m%dT%H%M%SZ)}"
VENV="${GPU_VENV:-$ROOT/.venv-gpu}"
PYTHON="${PYTHON:-python3}"
NVIDIA_PYPI_URL="${NVIDIA_PYPI_URL:-https://pypi.nvidia.com}"
NO_INSTALL=""
if [ -n "$NO_INSTALL_PYTHON" ]; then
  NO_INSTALL=1
  PY="$(command -v "$NO_INSTALL_PYTHON" || echo "$NO_INSTALL_PYTHON")"
  [[ "$PY" == /* ]] || PY="$PWD/$PY"  # a relative path would break in the steps that cd
else
  PY="$VENV/bin/python"
fi
# The project imports from the checkout, installed or not (no install: nothing else puts it on sys.path).
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
REPO="$OUT/models"
MODEL=convnext-tiny
# bench/roadmap_engines.py: BF16_MIN_COMPUTE_CAPABILITY and gpu_engines_for (tests/deploy checks they agree).
BF16_MIN_MAJOR=8
PRE_AMPERE_GPU_ENGINES="tensorrt-fp16 onnxruntime-cuda-fp32"
BF16_SKIP_MARK="needs a GPU of compute capability >= 8.0"  # in every bf16 skip reason (bench's bf16_problem too)
# model/roadmap_steps.py: Table 10's rows (tests/deploy checks the count). The default pair is ReLU -> GELU at kernel 7,
# the step whose cost on the GPU engines the check is there to measure; the whole sweep takes hours.
ROADMAP_ALL_STEPS=17
ROADMAP_DEFAULT_STEPS="kernel7 gelu"
ROADMAP_LIMIT_PER_STEP_S=900

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
ROADMAP_STEPS="${ROADMAP_STEPS:-$ROADMAP_DEFAULT_STEPS}"
if [ "$FULL_ROADMAP" = 1 ] || [ "$ROADMAP_STEPS" = all ]; then ROADMAP_STEPS=""; fi  # empty: every step
# Word splitting on purpose: ROADMAP_STEPS is a space-separated list of step keys.
# shellcheck disable=SC2206
roadmap_keys=($ROADMAP_STEPS)
ROADMAP_COUNT=${#roadmap_keys[@]}
[ "$ROADMAP_COUNT" = 0 ] && ROADMAP_COUNT=$ROADMAP_ALL_STEPS
if [ -n "$NO_INSTALL" ]; then VENV_STEP="skipped: no install, --python $PY"
else VENV_STEP="create $VENV, install .[serve,gpu,export,train,dev,bench] (onnxruntime-gpu, TensorRT, cuda-python; no CPU onnxruntime)"
fi
TRAIN_AMP="fp16, then bf16"
[ -n "$BF16_SKIP" ] && TRAIN_AMP="fp16 (no bf16: $BF16_SKIP)"

STEPS=(  # name|time limit in seconds|what it does
  "nvidia-smi|60|the GPU and driver as nvidia-smi sees them"
  "venv|1800|$VENV_STEP"
  "doctor|300|python -m service doctor: driver, CUDA, cuDNN, TensorRT, providers that load, a one-layer engine"
  "export|900|ConvNeXt-T (random init) -> fp32 + fp16 + bf16 ONNX with parity vs PyTorch"
  "tensorrt-fp32|900|TensorRT fp32 engine (batch 1..32) + parity vs ONNX Runtime fp32"
  "tensorrt-fp16|900|TensorRT fp16 engine (batch 1..32) + parity vs ONNX Runtime fp32"
  "tensorrt-bf16|900|${BF16_SKIP:+skipped: $BF16_SKIP; }TensorRT bf16 engine (batch 1..32) + parity vs ONNX Runtime fp32"
  "ort-cuda|300|ONNX Runtime CUDAExecutionProvider (session.get_providers()[0] checked) fp32/fp16 within the export parity thresholds vs CPU fp32"
  "train-amp|600|python -m training --preset demo on the GPU, 20 steps with --amp $TRAIN_AMP; then fp16 with --channels-last --compile --ema-decay, and --resume of it"
  "pytest-gpu|1800|pytest -m gpu tests/gpu (a skipped test counts as a failure here, but for bf16 on a GPU without it)"
  "bench|600|python -m bench engine on the CUDA provider, fp32 + fp16, batch 1/8/32"
  "roadmap|$((ROADMAP_LIMIT_PER_STEP_S * ROADMAP_COUNT))|python -m bench roadmap --engines $ROADMAP_ENGINES${ROADMAP_STEPS:+ --steps $ROADMAP_STEPS}: TensorRT $ROADMAP_TENSORRT + ORT CUDA fp32 of $ROADMAP_COUNT Table 10 step(s) (OUT_DIR/roadmap/)"
)

limit_variable() {  # step name -> the variable that overrides its time limit
  local name="${1//-/_}"
  echo "GPU_CHECK_LIMIT_${name^^}"
}

limit_of() {  # step entry -> its time limit in seconds (its GPU_CHECK_LIMIT_<STEP>, else the table's)
  local name="${1%%|*}" rest="${1#*|}" variable
  variable="$(limit_variable "$name")"
  echo "${!variable:-${rest%%|*}}"
}

for entry in "${STEPS[@]}"; do
  if ! [[ "$(limit_of "$entry")" =~ ^[1-9][0-9]*$ ]]; then
    echo "gpu_check.sh: $(limit_variable "${entry%%|*}")=$(limit_of "$entry") is not a number of seconds" >&2; exit 2
  fi
done
if [ -n "${GPU_CHECK_BUDGET_S:-}" ] && ! [[ "$GPU_CHECK_BUDGET_S" =~ ^[1-9][0-9]*$ ]]; then
  echo "gpu_check.sh: GPU_CHECK_BUDGET_S=$GPU_CHECK_BUDGET_S is not a number of seconds" >&2; exit 2
fi

declare -A STATUS=() TOOK=() LOG=() NOTE=()  # per step: its outcome, seconds, log file, a note on its PASS
declare -A MISSING=()  # no install: step -> the packages PY lacks for it
GPU_TESTS=tests/gpu  # what pytest-gpu runs; no install: the files whose packages PY has
GPU_TESTS_NOT_RUN=""
NEEDS_REPORT=""

read_needs() {  # no install: which steps and tests/gpu files PY lacks packages for (scripts/gpu_check_needs.py)
  local kind name needs need needs_list runnable=() total=0 test_needs=() joined=""
  local -A seen=()
  NEEDS_REPORT="$("$PY" "$ROOT/scripts/gpu_check_needs.py" 2>&1)" || return
  while IFS=$'\t' read -r kind name needs; do
    if [ "$kind" = step ]; then
      MISSING[$name]=$needs
    elif [ "$kind" = test ]; then
      total=$((total + 1))
      if [ -z "$needs" ]; then runnable+=("$name")
      else GPU_TESTS_NOT_RUN+="not run: $name (needs $needs)"$'\n'; fi
      IFS=, read -ra needs_list <<< "$needs"
      for need in "${needs_list[@]}"; do
        need="${need# }"
        [ -n "${seen[$need]:-}" ] || test_needs+=("$need")
        seen[$need]=1
      done
    fi
  done <<< "$NEEDS_REPORT"
  GPU_TESTS="${runnable[*]}"
  if [ "${#runnable[@]}" = 0 ]; then
    for need in "${test_needs[@]}"; do joined+="${joined:+, }$need"; done
    MISSING[pytest-gpu]="${MISSING[pytest-gpu]:+${MISSING[pytest-gpu]}, }$joined"
  elif [ "${#runnable[@]}" != "$total" ]; then
    NOTE[pytest-gpu]="$((total - ${#runnable[@]})) of $total test files not run: their packages are missing (see the log)"
  fi
}

if [ "$DRY_RUN" = 1 ]; then
  [ -n "$NO_INSTALL" ] && read_needs
  echo "gpu_check.sh --dry-run: would write $OUT/report.md and $OUT/logs/ with $PY${NO_INSTALL:+ (no install)}," \
    "running (time limit per step${GPU_CHECK_BUDGET_S:+, $GPU_CHECK_BUDGET_S s in all}):"
  for entry in "${STEPS[@]}"; do
    name="${entry%%|*}"
    printf '  %-14s %6s s  %s\n' "$name" "$(limit_of "$entry")" \
      "${MISSING[$name]:+NOT RUN, needs ${MISSING[$name]}: }${NOTE[$name]:+${NOTE[$name]}: }${entry##*|}"
  done
  exit 0
fi

mkdir -p "$OUT/logs"
OUT="$(cd "$OUT" && pwd)"
REPO="$OUT/models"
STARTED=$SECONDS
CURRENT=""        # the step running now
STEP_STARTED=0
STEP_PID=""       # its `timeout` process
STOP_REASON=""    # why the steps not run yet never will be
FAILED=0

log_path() {  # index name
  printf '%s/logs/%02d-%s.log' "$OUT" "$1" "$2"
}

status_of() {  # name: its recorded status, or what it is while it has none
  if [ -n "${STATUS[$1]:-}" ]; then echo "${STATUS[$1]}"
  elif [ "$1" = "$CURRENT" ]; then echo "RUNNING (for $((SECONDS - STEP_STARTED)) s when this report was written)"
  elif [ -n "$STOP_REASON" ]; then echo "NOT RUN ($STOP_REASON)"
  else echo "PENDING"
  fi
}

write_report() {  # the report as things stand, replaced whole (a reader never sees half of one)
  local entry name status status_reason names=() rows=() failed=0 skipped=0 not_run=0 open=0 reasons="" result log
  [ -n "${STATUS[preflight]:-}" ] && names+=(preflight)
  for entry in "${STEPS[@]}"; do names+=("${entry%%|*}"); done
  for name in "${names[@]}"; do
    status="$(status_of "$name")"
    case "$status" in
      PASS*) ;;
      SKIP*) skipped=$((skipped + 1)); status_reason="${status#SKIP (}"; reasons+="${reasons:+; }${status_reason%)}" ;;
      "NOT RUN"*) not_run=$((not_run + 1)) ;;
      RUNNING*|PENDING) open=$((open + 1)) ;;
      *) failed=$((failed + 1)) ;;
    esac
    log="${LOG[$name]:-}"
    rows+=("| $name | $status | ${TOOK[$name]:-} | ${log:+logs/${log##*/}} |")
  done
  FAILED=$failed
  if [ "$open" != 0 ]; then
    result="in progress: $(( ${#names[@]} - open )) of ${#names[@]} steps done (this report is rewritten before and after every step: if it still says so, the check was killed)"
  else
    result="$([ "$failed" = 0 ] && echo "no step failed" || echo "$failed step(s) FAILED")"
    [ "$skipped" = 0 ] || result+="; $skipped skipped: $reasons"
    [ "$not_run" = 0 ] || result+="; $not_run not run"
  fi
  {
    echo "# GPU check $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo
    echo "- host: $(uname -n), commit $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')"
    echo "- GPU: $(nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total --format=csv,noheader 2>/dev/null | head -n 1 || true)"
    echo "- python: $PY ($([ -n "$NO_INSTALL" ] && echo "no install: --python" || echo "the venv step's"))"
    echo "- roadmap steps: ${ROADMAP_STEPS:-all $ROADMAP_ALL_STEPS}"
    echo "- result: ${STOP_REASON:+$STOP_REASON; }$result"
    echo "- took: $((SECONDS - STARTED)) s"
    echo
    echo "| step | status | seconds | log |"
    echo "|---|---|---|---|"
    printf '%s\n' "${rows[@]}"
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
  } > "$OUT/report.md.tmp" && mv -f "$OUT/report.md.tmp" "$OUT/report.md"
}

record() {  # name status seconds log: the step's outcome, into the report at once
  STATUS[$1]=$2 TOOK[$1]=$3 LOG[$1]=$4
  write_report
}

# Each step runs in a fresh bash under `timeout`, which puts it in a process group of its own, so a limit (or a stop)
# ends all of it: pip, python and whatever they started. It gets the script's functions and these settings.
STEP_SETTINGS=(ROOT OUT REPO MODEL PY VENV PYTHON NVIDIA_PYPI_URL NO_INSTALL BF16_SKIP BF16_SKIP_MARK ROADMAP_ENGINES
  ROADMAP_STEPS GPU_TESTS GPU_TESTS_NOT_RUN)

run_step() {  # index name limit_s whose_limit: the step's function under its limit; PASS, FAIL or TIMEOUT in the report
  local index=$1 name=$2 limit=$3 whose_limit=$4 log rc took said note
  log="$(log_path "$index" "$name")"
  echo "== [$index/${#STEPS[@]}] $name (limit $limit s)"
  CURRENT=$name STEP_STARTED=$SECONDS
  write_report
  timeout --kill-after=30 "$limit" bash -uo pipefail -c \
    "$(declare -p "${STEP_SETTINGS[@]}"); $(declare -f); step_${name//-/_}" > "$log" 2>&1 &
  STEP_PID=$!
  wait "$STEP_PID"  # in the background and waited for, so that a trapped signal is handled at once
  rc=$?
  STEP_PID="" CURRENT=""
  took=$((SECONDS - STEP_STARTED))
  if [ "$rc" = 0 ]; then  # with what the step noted of itself ("== note: ..." in its log), for the report's line
    said="$(sed -n 's/^== note: //p' "$log" | head -n 1)"
    said="${said//|/\\|}"  # a cell of report.md's table
    note="${NOTE[$name]:-}${said:+${NOTE[$name]:+; }$said}"
    record "$name" "PASS${note:+ ($note)}" "$took" "$log"
  elif [ "$rc" = 124 ] || { [ "$rc" = 137 ] && [ "$took" -ge "$limit" ]; }; then
    record "$name" "TIMEOUT (after $whose_limit)" "$took" "$log"
    echo "!! $name timed out after $took s: $log"; tail -n 5 "$log"
  else
    record "$name" "FAIL (exit $rc)" "$took" "$log"
    echo "!! $name failed (exit $rc): $log"; tail -n 5 "$log"
  fi
}

not_run_step() {  # index name status: a step that does not run here, recorded with why
  local log
  log="$(log_path "$1" "$2")"
  echo "== [$1/${#STEPS[@]}] $2: $3"
  echo "$3" > "$log"
  record "$2" "$3" 0 "$log"
}

on_stop() {  # signal name and number: end the running step, record it and what will not run, exit 128+n
  trap '' INT TERM HUP  # once is enough: a second signal (timeout sends two) must not cut the clean-up short
  STOP_REASON="the check was stopped by SIG$1"
  if [ -n "$STEP_PID" ]; then
    kill -TERM "$STEP_PID" 2>/dev/null  # timeout passes it on to the step's process group
    wait "$STEP_PID" 2>/dev/null
  fi
  if [ -n "$CURRENT" ]; then
    STATUS[$CURRENT]="STOPPED (by SIG$1 after $((SECONDS - STEP_STARTED)) s)" TOOK[$CURRENT]=$((SECONDS - STEP_STARTED))
    LOG[$CURRENT]="$(log_path "$STEP_INDEX" "$CURRENT")"
    CURRENT=""
  fi
  echo "!! stopped by SIG$1; report: $OUT/report.md" >&2
  exit $((128 + $2))  # the EXIT trap writes the report
}

step_nvidia_smi() {
  nvidia-smi
  nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total --format=csv
}

step_venv() {
  [ -x "$PY" ] || "$PYTHON" -m venv "$VENV" || return 1
  "$PY" -m pip install -q --upgrade pip || return 1
  # pip prefers NVIDIA's real TensorRT wheels on $NVIDIA_PYPI_URL to the placeholder sdists on PyPI.
  "$PY" -m pip install -e "${ROOT}[serve,gpu,export,train,dev,bench]" -c "$ROOT/deploy/gpu-constraints.txt" \
    --extra-index-url "$NVIDIA_PYPI_URL" || return 1
  if "$PY" -m pip show onnxruntime > /dev/null 2>&1; then
    echo "the CPU onnxruntime is installed next to onnxruntime-gpu: $PY -m pip uninstall -y onnxruntime onnxruntime-gpu" \
      "&& $PY -m pip install 'onnxruntime-gpu[cuda,cudnn]==1.31.1'"
    return 1
  fi
  "$PY" -m pip list 2>/dev/null | grep -i -E '^(onnxruntime|tensorrt|cuda-|nvidia-|torch )'
}

step_doctor() {
  # No install: the GPU is what the doctor must find; the packages PY lacks are the other steps' NOT RUN lines.
  local require=()
  [ -n "$NO_INSTALL" ] && require=(--require gpu)
  "$PY" -m service doctor --json "${require[@]}" > "$OUT/doctor.json"
  "$PY" -m service doctor "${require[@]}"
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

step_train_amp() {  # the training loop's CUDA paths (autocast, fp16's GradScaler), which nothing else here runs
  local amp
  # python -m training takes the GPU when torch sees one, and the CPU without a word otherwise: refuse that here.
  "$PY" -c 'import sys, torch
sys.exit(None if torch.cuda.is_available() else f"torch {torch.__version__} sees no CUDA GPU: training would run on the CPU")' \
    || return 1
  for amp in fp16 bf16; do
    if [ "$amp" = bf16 ] && [ -n "$BF16_SKIP" ]; then echo "== --amp bf16: skipped, $BF16_SKIP"; continue; fi
    echo "== --amp $amp"
    # A fresh run each time: a rerun into the same OUT_DIR finds the last one's checkpoints, which training refuses.
    "$PY" -m training --preset demo --epochs 1 --max-steps-per-epoch 20 --amp "$amp" --output "$OUT/train-$amp" \
      --overwrite-checkpoints --quiet || return 1
  done
  # What the demo preset leaves off: channels_last, torch.compile on CUDA (Triton), the EMA on the GPU; then a
  # --resume of that run on the GPU (its CUDA RNG state and GradScaler). DDP/NCCL needs two GPUs: not run here.
  # A host without a C compiler (Triton builds its launcher with one) runs them without --compile, and says so.
  local compile=--compile no_compiler
  no_compiler="$("$PY" -c 'from training.run import compile_toolchain_problem as p; print(p("cuda") or "")')" \
    || return 1
  if [ -n "$no_compiler" ]; then
    compile=""
    echo "== --compile: skipped, $no_compiler"
    echo "== note: the last two runs without --compile: no C compiler"
  fi
  echo "== --amp fp16 --channels-last ${compile:+--compile }--ema-decay 0.99, 1 epoch; then --resume to epoch 2"
  "$PY" -m training --preset demo --epochs 1 --max-steps-per-epoch 10 --amp fp16 --channels-last $compile \
    --ema-decay 0.99 --output "$OUT/train-compiled" --overwrite-checkpoints --quiet || return 1
  "$PY" -m training --preset demo --epochs 2 --max-steps-per-epoch 10 --amp fp16 --channels-last $compile \
    --ema-decay 0.99 --output "$OUT/train-compiled" --resume "$OUT/train-compiled/checkpoint_last.pth" --quiet
}

unexpected_skips() {  # pytest -rs output on stdin -> its SKIPPED lines, less bf16's on a GPU without bf16
  if [ -n "$BF16_SKIP" ]; then grep -E '^SKIPPED' | grep -v -F "$BF16_SKIP_MARK"; else grep -E '^SKIPPED'; fi
}

step_pytest_gpu() {
  local summary rc
  [ -z "$GPU_TESTS_NOT_RUN" ] || printf '%s' "$GPU_TESTS_NOT_RUN"
  # Word splitting on purpose: GPU_TESTS is a space-separated list of test paths.
  # shellcheck disable=SC2086
  summary="$(cd "$ROOT" && "$PY" -m pytest -m gpu -q -rs -p no:cacheprovider $GPU_TESTS 2>&1)"
  rc=$?
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

step_roadmap() {  # the longest step: each roadmap step exports 3 ONNX variants and builds 2 engines
  local steps=()
  # Word splitting on purpose: ROADMAP_STEPS is a space-separated list of step keys (empty: all of them).
  # shellcheck disable=SC2206
  [ -n "$ROADMAP_STEPS" ] && steps=(--steps $ROADMAP_STEPS)
  # Word splitting on purpose: ROADMAP_ENGINES is "gpu" or the engine names a pre-Ampere GPU runs.
  # shellcheck disable=SC2086
  (cd "$ROOT" && "$PY" -m bench roadmap --engines $ROADMAP_ENGINES "${steps[@]}" --batch-sizes 1 32 --seconds 2 \
    --out "$OUT/roadmap")
}

preflight_problem() {  # prints why this host cannot run the check at all, if it cannot
  if ! command -v nvidia-smi > /dev/null 2>&1; then
    echo "no NVIDIA driver here (nvidia-smi not found): gpu_check.sh needs a GPU host with driver >= 580;" \
      "in a container, run it with the NVIDIA Container Toolkit (--gpus all). See README.md, 'GPU hosts'."
  elif [ -n "$NO_INSTALL" ]; then
    if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
      echo "--python $NO_INSTALL_PYTHON: not a Python 3.11+ this host can run (the project's requires-python)"
    fi
  elif [ ! -x "$PY" ] && ! "$PYTHON" -c 'import sys, venv, ensurepip; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    echo "$PYTHON cannot make the venv: it is missing, older than 3.11, or lacks venv/ensurepip" \
      "(Debian/Ubuntu: apt-get install python3-venv); point PYTHON=... at a Python 3.11+ that has them," \
      "or run with --python PY to use an interpreter that has the packages already."
  fi
  if ! command -v timeout > /dev/null 2>&1; then
    echo "GNU timeout (coreutils) not found: every step runs under it."
  fi
}

trap write_report EXIT
trap 'on_stop INT 2' INT
trap 'on_stop TERM 15' TERM
trap 'on_stop HUP 1' HUP

# Fail fast where the check cannot run: creating the venv downloads gigabytes for nothing.
problem="$(preflight_problem)"
if [ -n "$problem" ]; then
  log="$OUT/logs/00-preflight.log"
  echo "$problem" | tee "$log" >&2
  STOP_REASON="the host failed the preflight"
  record preflight "FAIL" 0 "$log"
  echo "report: $OUT/report.md" >&2
  exit 2
fi

if [ -n "$NO_INSTALL" ]; then
  read_needs
  echo "$NEEDS_REPORT" > "$OUT/logs/00-python-needs.log"
fi

STEP_INDEX=0
for entry in "${STEPS[@]}"; do
  STEP_INDEX=$((STEP_INDEX + 1))
  name="${entry%%|*}"
  limit="$(limit_of "$entry")"
  whose_limit="its limit of $limit s; $(limit_variable "$name")=SECONDS sets another"
  if [ "$name" = venv ] && [ -n "$NO_INSTALL" ]; then
    not_run_step "$STEP_INDEX" "$name" "SKIP (no install: --python $PY)"; continue
  fi
  if [ "$name" = tensorrt-bf16 ] && [ -n "$BF16_SKIP" ]; then
    not_run_step "$STEP_INDEX" "$name" "SKIP ($BF16_SKIP)"; continue
  fi
  if [ -n "${MISSING[$name]:-}" ]; then
    not_run_step "$STEP_INDEX" "$name" "NOT RUN (needs ${MISSING[$name]}: not in $PY)"; continue
  fi
  if [ -n "${GPU_CHECK_BUDGET_S:-}" ]; then
    left=$((GPU_CHECK_BUDGET_S - (SECONDS - STARTED)))
    if [ "$left" -le 0 ]; then
      not_run_step "$STEP_INDEX" "$name" "NOT RUN (the check's budget, GPU_CHECK_BUDGET_S=$GPU_CHECK_BUDGET_S s, was spent)"
      continue
    fi
    if [ "$left" -lt "$limit" ]; then
      limit=$left whose_limit="the $left s left of GPU_CHECK_BUDGET_S=$GPU_CHECK_BUDGET_S"
    fi
  fi
  run_step "$STEP_INDEX" "$name" "$limit" "$whose_limit"
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
