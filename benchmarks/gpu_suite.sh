#!/usr/bin/env bash
# The GPU measurements of benchmarks/RESULTS.md in one go, sized to finish in under 9 minutes
# on one H100 (about 0.3 + 1.5 + 2.5 + 4 minutes). Run from the repository root:
#
#   mkdir -p carry && cp -r ../shared/data/cifar10 carry/     # once, on the machine that sends the tree
#   OUT=/some/folder bash benchmarks/gpu_suite.sh              # on the GPU machine (carry: carry/cifar10)
#
# The repository need not be installed there: PYTHONPATH=src is enough (torch, torchvision,
# numpy, pillow, pyyaml, tqdm must be importable). Each part has its own time limit, so one
# that overruns costs only itself; every part writes JSON (and a log) to $OUT:
#   env.txt                  GPU, driver, versions, commit
#   bench_resnet18.json      simclr bench, ResNet-18, batch 512, 30 timed steps per path
#   bench_resnet50.json      simclr bench, ResNet-50, batch 1024, 50 timed steps per path (the issue's command)
#   tta_resnet18.json        time to accuracy, ResNet-18, $TTA_MINUTES minutes from launch
#   suite.log                everything printed
# Knobs (environment): TTA_MINUTES (default 3.5), SKIP_TTA=1, BENCH_WORKERS (default: CPU count),
# EXTRA_BENCH / EXTRA_TTA (appended arguments; e.g. a CPU smoke test of this script:
#   EXTRA_BENCH='--device cpu --width 8 --train_subset 256 --steps 2 --warmup 1' EXTRA_TTA='--device cpu
#   --width 8 --train_subset 512 --test_subset 200' TTA_MINUTES=0.5 bash benchmarks/gpu_suite.sh).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/out}
mkdir -p "$OUT"
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
export DATA_ROOT=${DATA_ROOT:-carry}
export SIMCLR_CACHE=${SIMCLR_CACHE:-/tmp/simclr-cache}
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/inductor-cache}
PY=${PY:-python3}
TTA_MINUTES=${TTA_MINUTES:-3.5}
WORKERS=${BENCH_WORKERS:-$(nproc)}
LOG="$OUT/suite.log"
T0=$(date +%s)
stamp() { echo "[suite +$(( $(date +%s) - T0 ))s] $*" | tee -a "$LOG"; }

{
  echo "date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
  echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git status --porcelain --untracked-files=no 2>/dev/null | grep -q . && echo +dirty)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1
  $PY -c "import sys, torch, torchvision; print('python', sys.version.split()[0], 'torch', torch.__version__, 'torchvision', torchvision.__version__, 'cuda', torch.version.cuda, 'gpu', torch.cuda.is_available())" 2>&1
  echo "cpus: $(nproc)"
} > "$OUT/env.txt"
cat "$OUT/env.txt" | tee -a "$LOG"

if [ ! -d "$DATA_ROOT/cifar10/train" ]; then
  stamp "error: CIFAR-10 not found under DATA_ROOT=$DATA_ROOT (expected $DATA_ROOT/cifar10/train/<class>/*.jpg); copy ../shared/data/cifar10 to carry/ and name carry/cifar10 in carry"
  exit 2
fi

stamp "decoding CIFAR-10 into the array cache ($SIMCLR_CACHE)"
timeout 120 $PY -c "from simclr.data import get_dataset; [get_dataset('cifar10', s) for s in ('pretrain', 'test')]" 2>&1 | tee -a "$LOG"

stamp "bench resnet18"
timeout 130 $PY -m simclr bench --arch resnet18 --data cifar10 --batch_size 512 --steps 30 --warmup 5 \
  --workers "$WORKERS" ${EXTRA_BENCH:-} --json "$OUT/bench_resnet18.json" 2>&1 | tee -a "$LOG"
stamp "bench resnet18 exit ${PIPESTATUS[0]}"

stamp "bench resnet50"
timeout 190 $PY -m simclr bench --arch resnet50 --data cifar10 --batch_size 1024 --steps 50 --warmup 5 \
  --workers "$WORKERS" ${EXTRA_BENCH:-} --json "$OUT/bench_resnet50.json" 2>&1 | tee -a "$LOG"
stamp "bench resnet50 exit ${PIPESTATUS[0]}"

if [ "${SKIP_TTA:-0}" != 1 ]; then
  stamp "time to accuracy resnet18, $TTA_MINUTES min"
  LIMIT=$(awk "BEGIN{print int($TTA_MINUTES*60+45)}")
  timeout "$LIMIT" $PY benchmarks/time_to_accuracy.py --arch resnet18 --minutes "$TTA_MINUTES" \
    ${EXTRA_TTA:-} --json "$OUT/tta_resnet18.json" 2>&1 | tee -a "$LOG"
  stamp "time to accuracy exit ${PIPESTATUS[0]}"
fi
stamp "done"
