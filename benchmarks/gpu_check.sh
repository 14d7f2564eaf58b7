#!/usr/bin/env bash
# gpu_check.sh: install, benchmark and test fastebm on one GPU inside one time limit, and always
# leave a report.
#
#   bash benchmarks/gpu_check.sh [--dry-run] [--deadline S] [--commit ID] [--no-install] [OUT_DIR]
#
#   OUT_DIR       where the report goes (default: $OUT, else benchmarks/results/gpu_check); it
#                 receives at most 3 files: summary.md (every table; printed last), summary.json and
#                 gpu_check_detail.tar.gz (every log, the benchmarks' JSONL rows and reports).
#   --deadline S  stop starting work after S seconds, cap every step to what is left
#                 (default $GPU_CHECK_DEADLINE_S, else 540; 240 with --dry-run).
#   --commit ID   the commit being checked (default $GPU_CHECK_COMMIT, else `git rev-parse HEAD`
#                 where a .git exists). The GPU machine's copy may have no .git: pass it in.
#   --dry-run     CPU only (CI): the same steps and reporting on tiny shapes, CUDA hidden,
#                 Triton's interpreter on. Without it a GPU is required: torch seeing none is an
#                 error (exit 3), never a silent CPU run.
#   --no-install / --install   skip / force `pip install --no-deps --no-build-isolation -e .`
#                 (default: install on a GPU, not in a dry run).
#
# Order (most important first; every step runs under `timeout`, capped to the deadline; a failing
# step does not stop the rest): install; wheels carried in .whl/ (below); env (versions, device);
# bench_attention; tests_kernels (compiled Triton kernels); build_ext (the CUDA corruption extension,
# built once, after removing stale torch_extensions lock files); bench_corrupt; tests_corrupt;
# bench_train_step (ViT-B/16, T=1); then, while time remains: compile_check, tests_custom_ops,
# tests_engines, bench_train_step_t2, tests_cuda_rest, tests_distributed, tests_csrc_build.
# The summary is rewritten after every step and by a trap on exit, SIGTERM, SIGINT and SIGHUP.
#
# Exit status: 0 every step ok (steps after the priority ones may be skipped for time); 1 a step
# failed, timed out, or a priority step could not start before the deadline; 2 usage; 3 no usable
# GPU or no Python; 128+N stopped by signal N.
#
# Optional wheels (xformers for the attention baseline): put them in .whl/ at the repository root
# (ignored by git: list `.whl` in the device call's `carry`); they are installed with
#   python3 -m pip install -q --no-index --no-deps --target WORK/site .whl/*.whl
# and WORK/site is put first on PYTHONPATH for every later step.
set -u

die_usage() { echo "gpu_check: $1 (see --help)" >&2; exit 2; }

DRY_RUN=0 DEADLINE_S="" COMMIT="${GPU_CHECK_COMMIT:-}" OUT_DIR="" INSTALL=""
while (($#)); do
  case $1 in
    --dry-run) DRY_RUN=1 ;;
    --deadline) (($# >= 2)) || die_usage "--deadline needs a number of seconds"; DEADLINE_S=$2; shift ;;
    --deadline=*) DEADLINE_S=${1#*=} ;;
    --commit) (($# >= 2)) || die_usage "--commit needs a commit id"; COMMIT=$2; shift ;;
    --commit=*) COMMIT=${1#*=} ;;
    --install) INSTALL=1 ;;
    --no-install) INSTALL=0 ;;
    -h|--help) sed -n '2,38p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    -*) die_usage "unknown option $1" ;;
    *) [[ -z $OUT_DIR ]] || die_usage "one OUT_DIR only (got $OUT_DIR and $1)"; OUT_DIR=$1 ;;
  esac
  shift
done
DEADLINE_S=${DEADLINE_S:-${GPU_CHECK_DEADLINE_S:-$((DRY_RUN ? 240 : 540))}}
[[ $DEADLINE_S =~ ^[0-9]+$ ]] && ((DEADLINE_S >= 10)) || die_usage "--deadline must be a whole number of seconds >= 10, got '$DEADLINE_S'"
INSTALL=${INSTALL:-$((1 - DRY_RUN))}
MODE=$([[ $DRY_RUN == 1 ]] && echo cpu-dry-run || echo gpu)

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 2
OUT_DIR=${OUT_DIR:-${OUT:-benchmarks/results/gpu_check}}
mkdir -p "$OUT_DIR" || die_usage "cannot create OUT_DIR $OUT_DIR"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
T0=$(date +%s)
END=$((T0 + DEADLINE_S))
KILL_AFTER_S=5   # a step that ignores SIGTERM gets SIGKILL this much later
RESERVE_S=8      # kept free at the end for the summary and the tarball
MIN_STEP_S=10    # a step is not started with less than this left

if [[ -z $COMMIT ]]; then
  COMMIT=$(git rev-parse HEAD 2>/dev/null) && [[ -n $(git status --porcelain 2>/dev/null) ]] && COMMIT="$COMMIT (with uncommitted changes)"
  COMMIT=${COMMIT:-"unknown (pass --commit or GPU_CHECK_COMMIT)"}
fi
COMMIT=$(printf '%s' "$COMMIT" | tr -cd 'A-Za-z0-9 ._:/+()-' | cut -c1-100)

PY=""
for cand in "${PYTHON:-}" python3 python; do
  if [[ -n $cand ]] && command -v "$cand" >/dev/null 2>&1; then PY=$(command -v "$cand"); break; fi
done
if [[ -z $PY ]]; then
  printf '# gpu_check summary\n\n- result: **FAIL (exit 3)**\n- error: no python3 (or python) on PATH\n' > "$OUT_DIR/summary.md"
  cat "$OUT_DIR/summary.md"
  exit 3
fi

WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX") || exit 2
mkdir -p "$WORK/logs" "$WORK/rows" "$WORK/bench" "$WORK/junit"
: > "$WORK/steps.tsv"

# --- environment hygiene: the same code paths a user gets, nothing forced from outside
CLEARED=""
for var in $(compgen -e); do
  case $var in
    FASTEBM_TEST_SEED) ;;  # replaying a test seed is not a backend override
    FASTEBM_*|TRITON_INTERPRET) CLEARED+=" $var"; unset "$var" ;;
  esac
done
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
export MAX_JOBS=${MAX_JOBS:-$(nproc 2>/dev/null || echo 4)}   # ninja jobs of the extension build
if [[ $MODE == cpu-dry-run ]]; then
  export CUDA_VISIBLE_DEVICES="" TRITON_INTERPRET=1
  export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$WORK/torch_extensions}  # never touch a shared cache
fi
EXT_ROOT=${TORCH_EXTENSIONS_DIR:-${XDG_CACHE_HOME:-${HOME:-/root}/.cache}/torch_extensions}
PYTEST_TIMEOUT=()
if "$PY" -c "import pytest_timeout" >/dev/null 2>&1; then
  PYTEST_TIMEOUT=(--timeout "$((DRY_RUN ? 60 : 150))")
fi

# --- bookkeeping
CUR_PID="" CUR_NAME="" CUR_PRIO="" CUR_TYPE="" CUR_T0=0 CUR_CAP=0
FAILED=0 ERROR="" INTERRUPTED="" LAST_STATUS=""

record() {  # name priority type status rc start_s seconds cap_s note
  local note=${9//$'\t'/ }
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "$5" "$6" "$7" "$8" "${note//$'\n'/ }" >> "$WORK/steps.tsv"
  LAST_STATUS=$4
  case $4 in
    failed|timeout|interrupted) FAILED=$((FAILED + 1)) ;;
    skipped) [[ $2 == priority && $9 == deadline* ]] && FAILED=$((FAILED + 1)) ;;
  esac
}

summarize() {  # [--final ARGS...]
  if ! "$PY" benchmarks/gpu_check_summary.py --work "$WORK" --out "$OUT_DIR" --mode "$MODE" --t0 "$T0" \
       --deadline "$DEADLINE_S" --commit "$COMMIT" --cleared-env "$CLEARED" "$@" 2>>"$WORK/logs/summary.log"; then
    {  # the Python report failed: a plain one from the step list
      printf '# gpu_check summary (fallback: gpu_check_summary.py failed, see its log in the tarball)\n\n'
      printf -- '- mode %s; commit %s; %s\n\n| step | priority | type | status | rc | start s | seconds | cap s | note |\n|---|---|---|---|---|---|---|---|---|\n' \
        "$MODE" "$COMMIT" "$*"
      sed 's/\t/ | /g; s/^/| /; s/$/ |/' "$WORK/steps.tsv"
    } > "$OUT_DIR/summary.md"
    tar -czf "$OUT_DIR/gpu_check_detail.tar.gz" -C "$WORK" logs rows steps.tsv 2>/dev/null
    [[ ${1:-} == --final ]] && cat "$OUT_DIR/summary.md"
  fi
}

clear_extension_locks() {
  # torch <= 2.11 leaves its FileBaton `lock` file behind when a JIT build is killed, and every
  # later load of that extension then waits forever for it.
  [[ -d $EXT_ROOT ]] && find "$EXT_ROOT" -type f -name lock -print -delete 2>/dev/null | sed 's/^/removed stale lock /'
  return 0
}

seconds_left() { echo $((END - $(date +%s) - RESERVE_S)); }

cap_for() {  # the cap a step asking for $1 seconds would get now
  local left; left=$(($(seconds_left) - KILL_AFTER_S))
  echo $(( $1 < left ? $1 : left ))
}

run_step() {  # NAME PRIORITY(priority|extra) TYPE(setup|bench|tests|build|check) CAP CMD...
  local name=$1 prio=$2 type=$3 cap=$4 start rc status dt note=""
  shift 4
  start=$(date +%s)
  if (( $(seconds_left) < MIN_STEP_S )); then
    echo "== [$name] skipped: deadline (${DEADLINE_S}s) reached"
    record "$name" "$prio" "$type" skipped "" $((start - T0)) 0 0 "deadline: not started"
    summarize
    return
  fi
  cap=$(cap_for "$cap")
  echo "== [$name] ($prio, cap ${cap}s): $*"
  CUR_NAME=$name CUR_PRIO=$prio CUR_TYPE=$type CUR_T0=$start CUR_CAP=$cap
  timeout --kill-after="$KILL_AFTER_S" "$cap" "$@" > "$WORK/logs/$name.log" 2>&1 < /dev/null &
  CUR_PID=$!
  wait "$CUR_PID"
  rc=$?
  CUR_PID=""
  dt=$(($(date +%s) - start))
  case $rc in
    0) status=ok ;;
    124|137) status=timeout; note="killed at its ${cap}s cap" ;;
    *) status=failed; note="exit $rc: $(grep -v '^\s*$' "$WORK/logs/$name.log" | tail -n 1 | cut -c1-180)" ;;
  esac
  echo "   $status (${dt}s)${note:+: $note}"
  record "$name" "$prio" "$type" "$status" "$rc" $((start - T0)) "$dt" "$cap" "$note"
  clear_extension_locks >> "$WORK/logs/extension_locks.log"
  summarize
}

skip_step() { record "$1" "$2" "$3" skipped "" $(($(date +%s) - T0)) 0 0 "$4"; echo "== [$1] skipped: $4"; }

pytest_step() {  # NAME PRIORITY CAP PYTEST-ARGS...
  local name=$1 prio=$2 cap=$3
  shift 3
  run_step "$name" "$prio" tests "$cap" "$PY" -m pytest -v -rA --durations=20 -p no:cacheprovider \
    --junitxml="$WORK/junit/$name.xml" "${PYTEST_TIMEOUT[@]}" "$@"
}

finish() {
  local code rc=$?
  trap - EXIT TERM INT HUP
  if ((rc != 0)) && [[ -z $ERROR && -z $INTERRUPTED ]]; then
    ERROR="gpu_check.sh itself stopped with exit $rc (a bug in the script; see the output above)"
  fi
  if [[ -n $CUR_PID ]]; then  # stopped mid-step: stop the step's process group, record it
    kill -TERM "$CUR_PID" 2>/dev/null
    wait "$CUR_PID" 2>/dev/null
    record "$CUR_NAME" "$CUR_PRIO" "$CUR_TYPE" interrupted "" $((CUR_T0 - T0)) $(($(date +%s) - CUR_T0)) "$CUR_CAP" \
      "stopped by ${INTERRUPTED:-exit}"
    clear_extension_locks >> "$WORK/logs/extension_locks.log"
  fi
  if [[ -n $ERROR ]]; then code=$((rc == 3 ? 3 : 1))
  elif [[ $INTERRUPTED == SIGTERM ]]; then code=143
  elif [[ $INTERRUPTED == SIGINT ]]; then code=130
  elif [[ $INTERRUPTED == SIGHUP ]]; then code=129
  elif ((FAILED)); then code=1
  else code=0
  fi
  summarize --final --exit-code "$code" ${INTERRUPTED:+--interrupted "$INTERRUPTED"} ${ERROR:+--error "$ERROR"}
  [[ -n ${GPU_CHECK_KEEP_WORK:-} ]] || rm -rf "$WORK"
  exit "$code"
}
on_signal() { INTERRUPTED=$1; echo "gpu_check: $1 received, writing the summary" >&2; exit 1; }
trap finish EXIT
trap 'on_signal SIGTERM' TERM
trap 'on_signal SIGINT' INT
trap 'on_signal SIGHUP' HUP

echo "gpu_check: mode=$MODE deadline=${DEADLINE_S}s out=$OUT_DIR python=$PY commit=$COMMIT"
[[ -n $CLEARED ]] && echo "gpu_check: cleared from the environment:$CLEARED"

# ---------------------------------------------------------------------------------- priority steps
if ((INSTALL)); then
  run_step install priority setup 120 "$PY" -m pip install --no-deps --no-build-isolation -e .
else
  skip_step install priority setup "$([[ $MODE == gpu ]] && echo "--no-install" || echo "dry run (--install to run it)")"
fi
if compgen -G ".whl/*.whl" > /dev/null; then
  run_step wheels extra setup 90 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --upgrade --target "$WORK/site" .whl/*.whl
  [[ $LAST_STATUS == ok ]] && export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
fi
if [[ $MODE == gpu ]]; then
  run_step env priority setup 60 "$PY" benchmarks/_bench.py env --out "$WORK/env.json" --require-gpu
  if [[ $LAST_STATUS != ok ]]; then
    ERROR="torch sees no usable CUDA GPU ($(grep -v '^\s*$' "$WORK/logs/env.log" | tail -n 1 | cut -c1-200)); nothing else was run"
    exit 3
  fi
else
  run_step env priority setup 60 "$PY" benchmarks/_bench.py env --out "$WORK/env.json"
fi

run_step bench_attention priority bench 150 "$PY" benchmarks/bench_attention.py --out "$WORK/bench" \
  --rows "$WORK/rows/attention.jsonl"
pytest_step tests_kernels priority 150 -m cuda tests/test_attention_triton.py

echo "== stale torch_extensions locks under $EXT_ROOT:" | tee -a "$WORK/logs/extension_locks.log"
clear_extension_locks | tee -a "$WORK/logs/extension_locks.log"
run_step build_ext priority build 180 "$PY" benchmarks/_bench.py build-ext
run_step bench_corrupt priority bench 90 "$PY" benchmarks/bench_corrupt.py --out "$WORK/bench" \
  --rows "$WORK/rows/corrupt.jsonl"
pytest_step tests_corrupt priority 90 -m cuda tests/test_corrupt_kernels.py

if [[ $MODE == gpu ]]; then
  cap=$(cap_for 240)
  run_step bench_train_step priority bench 240 "$PY" benchmarks/bench_train_step.py --models vit_base_patch16 \
    --steps 1 --engines baseline,baseline_bf16,eager,explicit,func --budget-s $((cap / 2)) --profile \
    --out "$WORK/bench" --rows "$WORK/rows/train_step.jsonl"
else
  run_step bench_train_step priority bench 120 "$PY" benchmarks/bench_train_step.py --small --compile-backend aot_eager \
    --engines baseline,baseline_bf16,eager --out "$WORK/bench" --rows "$WORK/rows/train_step.jsonl"
fi

# ---------------------------------------------------------------------------------- while time remains
if [[ $MODE == gpu ]]; then CC=(--arch 90,80 --dtypes bfloat16,float32 --head-dims 64,128 --jobs 8); else CC=(--arch 90 --dtypes bfloat16 --head-dims 64); fi
run_step compile_check extra check 120 env -u TRITON_INTERPRET "$PY" -m fastebm.kernels.compile_check "${CC[@]}" \
  --jsonl "$WORK/rows/compile_check.jsonl"
if [[ $MODE == gpu ]]; then
  pytest_step tests_custom_ops extra 120 tests/test_custom_ops.py -k triton
else
  pytest_step tests_custom_ops extra 120 tests/test_custom_ops.py -k "opcheck and math"
fi
pytest_step tests_engines extra 240 -m cuda tests/test_engines.py
if [[ $MODE == gpu ]]; then
  cap=$(cap_for 200)
  run_step bench_train_step_t2 extra bench 200 "$PY" benchmarks/bench_train_step.py --models vit_base_patch16 \
    --steps 2 --engines baseline,baseline_bf16,eager,explicit,func --budget-s $((cap / 2)) \
    --out "$WORK/bench" --tag vit_b_t2 --rows "$WORK/rows/train_step_t2.jsonl"
  pytest_step tests_cuda_rest extra 150 -m cuda tests/ --ignore=tests/test_attention_triton.py \
    --ignore=tests/test_corrupt_kernels.py --ignore=tests/test_engines.py --ignore=tests/test_distributed.py
  pytest_step tests_distributed extra 200 -m cuda tests/test_distributed.py
  pytest_step tests_csrc_build extra 150 tests/test_csrc_build.py
else
  for name in bench_train_step_t2 tests_cuda_rest tests_distributed tests_csrc_build; do
    skip_step "$name" extra "$([[ $name == bench* ]] && echo bench || echo tests)" "GPU only"
  done
fi
exit 0  # the EXIT trap writes the final summary and sets the status
