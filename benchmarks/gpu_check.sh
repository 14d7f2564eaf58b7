#!/usr/bin/env bash
# One-command GPU check: install in place, run the GPU test subset, run every benchmark, summarise.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]          (default: $OUT, else benchmarks/results/gpu_check)
#   bash benchmarks/gpu_check.sh --dry-run [OUT]    (no GPU needed: CPU smoke modes, same steps)
#
# Designed to finish within 8 minutes on one H100/H200. Every step runs under `timeout` and a failing
# step does not stop the others. Everything lands in OUT_DIR: one log per step, the benchmarks'
# JSON/Markdown files, summary.json (device, versions, date, per-step status) and summary.md, which
# is printed last. Without a GPU (or with --dry-run) the script runs the CPU smoke modes instead, so
# its logic is exercised anywhere.
set -u

DRY_RUN=0
if [[ "${1:-}" == "--dry-run" ]]; then DRY_RUN=1; shift; fi
OUT_DIR="${1:-${OUT:-benchmarks/results/gpu_check}}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 2
mkdir -p "$OUT_DIR" || { echo "cannot create $OUT_DIR" >&2; exit 2; }
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
PY="${PYTHON:-python}"
T_START=$(date +%s)

if [[ $DRY_RUN -eq 0 ]] && "$PY" -c "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  MODE=gpu
else
  MODE=cpu-dry-run
  export TRITON_INTERPRET=1   # Triton kernels only run in the interpreter without a GPU
fi
echo "gpu_check: mode=$MODE out=$OUT_DIR"

STEPS_TSV="$OUT_DIR/steps.tsv"
: > "$STEPS_TSV"

# run_step NAME TIMEOUT_S CMD...  -> log in $OUT_DIR/NAME.log, a line "name rc seconds" in steps.tsv
run_step() {
  local name=$1 limit=$2; shift 2
  local t0=$(date +%s)
  echo "== [$name] (limit ${limit}s): $*"
  timeout --kill-after=10 "$limit" "$@" > "$OUT_DIR/$name.log" 2>&1
  local rc=$?
  local dt=$(( $(date +%s) - t0 ))
  printf '%s\t%s\t%s\n' "$name" "$rc" "$dt" >> "$STEPS_TSV"
  if [[ $rc -eq 0 ]]; then echo "   ok (${dt}s)"; elif [[ $rc -eq 124 || $rc -eq 137 ]]; then echo "   TIMEOUT (${dt}s)"; else echo "   FAILED rc=$rc (${dt}s); tail:"; tail -n 5 "$OUT_DIR/$name.log"; fi
}

# 1. install in place (no dependency resolution: the machine has torch, triton, timm, pytest)
run_step install 60 "$PY" -m pip install --no-deps --no-build-isolation -e .

if [[ $MODE == gpu ]]; then
  # 2. benchmarks first (the numbers matter most). ViT-B/16 T=1 first (the acceptance configuration);
  # later configurations are skipped once --budget-s is spent, and rows are saved as they finish,
  # so even a timeout leaves results behind.
  run_step bench_train_step 190 "$PY" benchmarks/bench_train_step.py --out "$OUT_DIR" --budget-s 120 --profile
  run_step bench_attention 60 "$PY" benchmarks/bench_attention.py --out "$OUT_DIR"
  run_step bench_corrupt 30 "$PY" benchmarks/bench_corrupt.py --out "$OUT_DIR"
  # 3. tests: CUDA-marked tests elsewhere, then the kernels inside the custom ops and the engines
  # against the eager reference, compiled on the GPU (Inductor + Triton)
  run_step tests_cuda 60 "$PY" -m pytest -q -m cuda tests/ --ignore=tests/test_engines.py -p no:cacheprovider
  run_step tests_engines 100 "$PY" -m pytest -q tests/test_engines.py tests/test_custom_ops.py -m "not slow" \
    -k "cuda or triton or opcheck" -p no:cacheprovider
else
  run_step bench_train_step 300 "$PY" benchmarks/bench_train_step.py --small --compile-backend aot_eager --out "$OUT_DIR"
  run_step bench_attention 300 "$PY" benchmarks/bench_attention.py --out "$OUT_DIR"
  run_step bench_corrupt 120 "$PY" benchmarks/bench_corrupt.py --out "$OUT_DIR"
  run_step tests_engines 600 "$PY" -m pytest -q tests/test_custom_ops.py -p no:cacheprovider -k "opcheck and math"
fi

# 4. summary (JSON + Markdown), printed last
"$PY" - "$OUT_DIR" "$MODE" "$T_START" <<'PYEOF'
import datetime, glob, json, os, platform, subprocess, sys, time

out, mode, t_start = sys.argv[1], sys.argv[2], int(sys.argv[3])
info = {"mode": mode, "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "python": platform.python_version(), "host": platform.node()}
try:
    import torch
    info["torch"] = torch.__version__
    info["cuda"] = torch.version.cuda
    info["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU (no GPU)"
except Exception as exc:  # noqa: BLE001
    info["torch"] = f"unavailable: {exc}"
try:
    import triton
    info["triton"] = triton.__version__
except Exception:  # noqa: BLE001
    info["triton"] = None
try:
    info["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip() or None
except Exception:  # noqa: BLE001
    info["git_commit"] = None

steps = []
with open(os.path.join(out, "steps.tsv")) as f:
    for line in f:
        name, rc, secs = line.rstrip("\n").split("\t")
        rc = int(rc)
        status = "ok" if rc == 0 else "timeout" if rc in (124, 137) else f"failed (rc {rc})"
        log = os.path.join(out, name + ".log")
        last = ""
        if os.path.exists(log):
            tail = [l.strip() for l in open(log, errors="replace").read().splitlines() if l.strip()]
            last = tail[-1][:160] if tail else ""
        steps.append({"step": name, "status": status, "seconds": int(secs), "last_line": last})
info["total_seconds"] = int(time.time()) - t_start
summary = {"info": info, "steps": steps, "benchmarks": sorted(os.path.basename(p) for p in glob.glob(os.path.join(out, "*.json")) if not p.endswith("summary.json"))}
with open(os.path.join(out, "summary.json"), "w") as f:
    json.dump(summary, f, indent=2)

lines = ["# gpu_check summary", "",
         f"- device: {info.get('device')} ({mode})",
         f"- torch {info.get('torch')} (CUDA {info.get('cuda')}), triton {info.get('triton')}, python {info['python']}",
         f"- date: {info['date']}; commit {info.get('git_commit')}; total {info['total_seconds']} s", "",
         "| step | status | seconds | last log line |", "|---|---|---|---|"]
for s in steps:
    lines.append(f"| {s['step']} | {s['status']} | {s['seconds']} | {s['last_line'].replace('|', '/')} |")
for md in sorted(glob.glob(os.path.join(out, "train_step_*.md"))):
    body = open(md).read()
    # the engine table only (the profile is in the file itself)
    table = [l for l in body.splitlines() if l.startswith("|")]
    lines += ["", f"## {os.path.basename(md)}", ""] + table
with open(os.path.join(out, "summary.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
print("\n".join(lines))
PYEOF
