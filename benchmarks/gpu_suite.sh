#!/usr/bin/env bash
# The GPU measurements of benchmarks/RESULTS.md in one command, and the same parts as a CPU smoke test.
#
#   bash benchmarks/gpu_suite.sh gpu     # on the GPU machine: <= 6 minutes of command time (the part limits sum
#                                        # to 350 s), CIFAR-10 under DATA_ROOT (default carry/)
#   bash benchmarks/gpu_suite.sh smoke   # on any CPU, tiny sizes, a few minutes; writes every file gpu mode writes
#   bash benchmarks/gpu_suite.sh plan    # print the parts, their time limits and files (gpu mode), run nothing
#
# Setup for a GPU machine that gets a copy of the tree (the repository need not be installed there:
# PYTHONPATH=src is enough; torch, torchvision, numpy, pillow, pyyaml, tqdm must be importable):
#   mkdir -p carry && cp -r ../shared/data/cifar10 carry/     # once, on the machine that sends the tree
#   OUT=/some/folder bash benchmarks/gpu_suite.sh gpu          # carry: carry/cifar10
#
# Every part runs under its own time limit (`timeout`), so one that overruns costs only itself. A part fails
# when its command exits non-zero, hits its limit, or leaves no valid JSON file; the suite then goes on with
# the next part, prints a summary of every part with its status, and exits 1 (2: CIFAR-10 not found). Files in
# $OUT (default benchmarks/out):
#   env.txt              GPU, driver, versions, commit
#   bench_resnet18.json  simclr bench, ResNet-18, batch 512 (fast path first, then the reference)
#   bench_resnet50.json  simclr bench, ResNet-50, batch 1024
#   tta_resnet18.json    time to accuracy, ResNet-18, $TTA_MINUTES minutes from launch, with kNN curve points
#                        ("curve", "minutes_to_knn": read "80% kNN within N minutes" off one run)
#   summary.json         every part: status (ok / failed (exit N) / timeout / no valid JSON), seconds, limit
#   suite.log            everything printed
# Knobs (environment): TTA_MINUTES (gpu default 1.75; its limit follows), SUITE_ONLY=part,part (run only
# those parts), BENCH_WORKERS (default: CPU count, at most 16), PY (default python3), EXTRA_BENCH / EXTRA_TTA
# (arguments appended to every bench / the time-to-accuracy command).
set -u -o pipefail
cd "$(dirname "$0")/.."
MODE=${1:-gpu}
case "$MODE" in gpu|smoke|plan) ;; *) echo "error: mode must be gpu, smoke or plan, got '$MODE'" >&2; exit 2;; esac

PARTS=(env cache bench_resnet18 bench_resnet50 tta_resnet18)
# time limits in seconds; gpu mode's sum must stay below 360 (6 minutes; tests/bench/test_gpu_suite.py checks)
declare -A GPU_LIMIT=([env]=20 [cache]=40 [bench_resnet18]=70 [bench_resnet50]=95 [tta_resnet18]=125)
declare -A SMOKE_LIMIT=([env]=60 [cache]=300 [bench_resnet18]=300 [bench_resnet50]=300 [tta_resnet18]=240)
declare -A JSON_OF=([env]="" [cache]="" [bench_resnet18]=bench_resnet18.json [bench_resnet50]=bench_resnet50.json
                    [tta_resnet18]=tta_resnet18.json)

if [ "$MODE" = smoke ]; then
  TTA_MINUTES=${TTA_MINUTES:-0.75}
  BENCH18=(--arch resnet18 --width 8 --batch_size 16 --steps 1 --warmup 1 --train_subset 64 --device cpu --workers 0)
  BENCH50=(--arch resnet50 --width 8 --batch_size 16 --steps 1 --warmup 1 --train_subset 64 --device cpu --workers 0)
  TTA=(--arch resnet18 --width 8 --batch_size 32 --train_subset 256 --test_subset 100 --device cpu
       --eval_reserve_s 10 --curve_points 2)
else
  TTA_MINUTES=${TTA_MINUTES:-1.75}
  WORKERS=${BENCH_WORKERS:-$(( $(nproc) < 16 ? $(nproc) : 16 ))}
  BENCH18=(--arch resnet18 --batch_size 512 --steps 30 --warmup 5 --workers "$WORKERS")
  BENCH50=(--arch resnet50 --batch_size 1024 --steps 20 --warmup 3 --workers "$WORKERS")
  TTA=(--arch resnet18 --curve_points 4)
fi
# the time-to-accuracy part's limit: its own budget (which counts its setup) plus 20 s to start and exit
TTA_LIMIT=$(awk "BEGIN{print int($TTA_MINUTES*60 + 20)}")
if [ "$MODE" = smoke ]; then SMOKE_LIMIT[tta_resnet18]=$(( TTA_LIMIT + 120 )); else GPU_LIMIT[tta_resnet18]=$TTA_LIMIT; fi

limit_of() { if [ "$MODE" = smoke ]; then echo "${SMOKE_LIMIT[$1]}"; else echo "${GPU_LIMIT[$1]}"; fi; }

if [ "$MODE" = plan ]; then
  total=0
  for p in "${PARTS[@]}"; do
    echo "part $p limit_s ${GPU_LIMIT[$p]} json ${JSON_OF[$p]:--}"
    total=$(( total + GPU_LIMIT[$p] ))
  done
  echo "total_limit_s $total"
  exit 0
fi

OUT=${OUT:-benchmarks/out}
mkdir -p "$OUT"
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
if [ "$MODE" = gpu ]; then export DATA_ROOT=${DATA_ROOT:-carry}; else export DATA_ROOT=${DATA_ROOT:-../shared/data}; fi
export SIMCLR_CACHE=${SIMCLR_CACHE:-/tmp/simclr-cache}
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/inductor-cache}
PY=${PY:-python3}
LOG="$OUT/suite.log"
: > "$LOG"
T0=$(date +%s)
stamp() { echo "[suite +$(( $(date +%s) - T0 ))s] $*" | tee -a "$LOG"; }
SUMMARY=()
FAILED=0

wanted() { [ -z "${SUITE_ONLY:-}" ] || [[ ",$SUITE_ONLY," == *",$1,"* ]]; }

# run_part NAME COMMAND...: the command under the part's time limit; its status goes into the summary
run_part() {
  local name=$1; shift
  wanted "$name" || return 0
  local limit json rc status t0
  limit=$(limit_of "$name")
  json=${JSON_OF[$name]}
  [ -z "$json" ] || rm -f "$OUT/$json"
  stamp "part $name (limit ${limit} s): $*"
  t0=$(date +%s)
  timeout -k 5 "$limit" "$@" 2>&1 | tee -a "$LOG"
  rc=${PIPESTATUS[0]}
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    status="timeout"
  elif [ "$rc" -ne 0 ]; then
    status="failed (exit $rc)"
  elif [ -n "$json" ] && ! "$PY" -c 'import json, sys; json.load(open(sys.argv[1]))' "$OUT/$json" 2>/dev/null; then
    status="no valid JSON ($json)"
  else
    status="ok"
  fi
  [ "$status" = ok ] || FAILED=$(( FAILED + 1 ))
  SUMMARY+=("$name|$status|$(( $(date +%s) - t0 ))|$limit|$json")
  stamp "part $name: $status"
}

write_env() {
  {
    echo "mode: $MODE"
    echo "date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
    echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git status --porcelain --untracked-files=no 2>/dev/null | grep -q . && echo +dirty)"
    if command -v nvidia-smi >/dev/null; then
      nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1
    else
      echo "nvidia-smi: not found"
    fi
    "$PY" -c "import sys, torch, torchvision; print('python', sys.version.split()[0], 'torch', torch.__version__, 'torchvision', torchvision.__version__, 'cuda', torch.version.cuda, 'gpu', torch.cuda.is_available())"
    echo "cpus: $(nproc)"
  } > "$OUT/env.txt"
  cat "$OUT/env.txt"
}

finish() {
  "$PY" - "$OUT/summary.json" "$MODE" "$(( $(date +%s) - T0 ))" "${SUMMARY[@]}" <<'EOF'
import json, sys, time
path, mode, wall, rows = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4:]
parts = [dict(zip(("name", "status", "seconds", "limit_s", "json"), r.split("|"))) for r in rows]
for p in parts:
    p["seconds"], p["limit_s"], p["json"] = int(p["seconds"]), int(p["limit_s"]), p["json"] or None
ok = all(p["status"] == "ok" for p in parts)
json.dump({"mode": mode, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "ok": ok, "wall_s": wall,
           "parts": parts}, open(path, "w"), indent=2)
print(f"{'part':<16} {'status':<24} {'seconds':>7} {'limit':>6}")
for p in parts:
    print(f"{p['name']:<16} {p['status']:<24} {p['seconds']:>7} {p['limit_s']:>6}")
EOF
  if [ "$FAILED" -gt 0 ]; then
    stamp "FAILED: $FAILED of ${#SUMMARY[@]} parts failed (summary above, $OUT/summary.json)"
    exit 1
  fi
  stamp "all ${#SUMMARY[@]} parts ok ($OUT)"
  exit 0
}

stamp "gpu_suite $MODE: parts ${SUITE_ONLY:-${PARTS[*]}}; output in $OUT"
export -f write_env
export MODE OUT PY
run_part env bash -c write_env  # `timeout` runs programs, not shell functions
if [ ! -d "$DATA_ROOT/cifar10/train" ]; then
  stamp "error: CIFAR-10 not found under DATA_ROOT=$DATA_ROOT (expected $DATA_ROOT/cifar10/train/<class>/*.jpg); copy ../shared/data/cifar10 to carry/ and name carry/cifar10 in carry"
  SUMMARY+=("data|failed (CIFAR-10 not found)|0|0|")
  FAILED=$(( FAILED + 1 ))
  finish
fi
run_part cache "$PY" -c "from simclr.data import get_dataset; [get_dataset('cifar10', s) for s in ('pretrain', 'test')]; print('CIFAR-10 decoded into the array cache')"
# shellcheck disable=SC2086  # EXTRA_* are word-split on purpose
run_part bench_resnet18 "$PY" -m simclr bench --data cifar10 "${BENCH18[@]}" ${EXTRA_BENCH:-} --json "$OUT/bench_resnet18.json"
# shellcheck disable=SC2086
run_part bench_resnet50 "$PY" -m simclr bench --data cifar10 "${BENCH50[@]}" ${EXTRA_BENCH:-} --json "$OUT/bench_resnet50.json"
# shellcheck disable=SC2086
run_part tta_resnet18 "$PY" benchmarks/time_to_accuracy.py --minutes "$TTA_MINUTES" "${TTA[@]}" ${EXTRA_TTA:-} \
  --json "$OUT/tta_resnet18.json"
finish
