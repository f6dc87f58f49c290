#!/usr/bin/env bash
# The real CLI on a real GPU, end to end, in about a minute: pretrain (fast path: CUDA augmentation, bf16,
# channels_last, compile), SIGTERM mid-run and resume to the same final loss as an uninterrupted twin, kNN,
# fast-linear evaluation, export, and the SGD linear evaluation stopped by SIGTERM and resumed. Complements the tests docs/gpu.md lists (which run the CUDA step under fake CUDA on CI).
#   OUT=/folder DATA_ROOT=carry bash benchmarks/gpu_cli_check.sh
# Exits non-zero on the first failure; prints "gpu_cli_check: ok" when every step passed.
set -eu -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/out}
PY=${PY:-python3}
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/inductor-cache}  # the suite's: its compiles are reused
W=$(mktemp -d /tmp/gpu-cli.XXXX)
# knobs for a CPU rehearsal of the script: DEVICE=cpu WIDTH=8 SUBSET=512 BATCH=32 ITERS=12
DEVICE=${DEVICE:-cuda}; WIDTH=${WIDTH:-64}; SUBSET=${SUBSET:-8192}; BATCH=${BATCH:-512}; ITERS=${ITERS:-60}
SAVE=$(( ITERS / 3 ))
COMMON=(--data cifar10 --arch resnet18 --width "$WIDTH" --train_subset "$SUBSET" --test_subset 2000
        --batch_size "$BATCH" --iters "$ITERS" --save_freq "$SAVE" --log_freq "$SAVE" --eval_freq 0
        --device "$DEVICE" --seed 0)
step() { echo "[gpu_cli_check] $*"; }

step "uninterrupted run"
$PY -m simclr pretrain "${COMMON[@]}" --run_dir "$W/full"
step "the same run, SIGTERM after the first checkpoint, then --resume"
$PY -m simclr pretrain "${COMMON[@]}" --run_dir "$W/cut" &
pid=$!
for _ in $(seq 600); do ls "$W/cut"/checkpoints/*"$SAVE".pt >/dev/null 2>&1 && break; sleep 0.1; done
kill -TERM "$pid"; wait "$pid" || true
$PY -m simclr pretrain --resume "$W/cut"
$PY - "$W/full" "$W/cut" <<'PYEOF'
import json, sys
def last(run):
    rows = [json.loads(l) for l in open(f"{run}/metrics.jsonl") if l.strip()]
    rows = [r for r in rows if "loss" in r]
    return rows[-1]["step"], rows[-1]["loss"]
a, b = last(sys.argv[1]), last(sys.argv[2])
print("final (step, loss): uninterrupted", a, "interrupted + resumed", b)
assert a[0] == b[0], (a, b)
# compiled bf16 kernels on a GPU are not bitwise deterministic run to run; the same trajectory within noise
assert abs(a[1] - b[1]) < 0.05 * abs(a[1]) + 1e-3, (a, b)
PYEOF
step "kNN, fast-linear evaluation, export"
$PY -m simclr knn --encoder_ckpt "$W/full" --train_subset "$SUBSET" --test_subset 2000 --device "$DEVICE" --run_dir "$W/knn"
$PY -m simclr eval --encoder_ckpt "$W/full" --protocol fast-linear --train_subset "$SUBSET" --test_subset 2000 \
  --device "$DEVICE" --run_dir "$W/eval"
$PY -m simclr export "$W/full" --format torchvision --out "$W/enc.pth"
step "the SGD linear evaluation on the fly, SIGTERM after its first head checkpoint, then --resume"
EV=(--encoder_ckpt "$W/full" --train_subset "$SUBSET" --test_subset 2000 --device "$DEVICE" --augmentation RandomCrop
    --iters "$ITERS" --batch_size "$BATCH" --save_freq "$SAVE" --seed 0)
$PY -m simclr eval "${EV[@]}" --run_dir "$W/lin-full"
$PY -m simclr eval "${EV[@]}" --run_dir "$W/lin-cut" &
pid=$!
for _ in $(seq 600); do ls "$W/lin-cut"/checkpoints/linear-head-*.pt >/dev/null 2>&1 && break; sleep 0.1; done
kill -TERM "$pid" 2>/dev/null || true; wait "$pid"  # a clean stop exits 0 (so does a run that had finished)
$PY -m simclr eval --resume "$W/lin-cut"
$PY - "$W/lin-full" "$W/lin-cut" <<'PYEOF'
import json, sys
a, b = (json.load(open(f"{run}/eval.json"))["top1"] for run in sys.argv[1:])
print("linear top-1: uninterrupted", a, "interrupted + resumed", b)
assert abs(a - b) <= 2.0, (a, b)  # bit-exact on a CPU (tests/evaluate/test_resume.py); a GPU's kernels add noise
PYEOF
cp "$W/full/env.json" "$OUT/cli_env.json" 2>/dev/null || true
step "gpu_cli_check: ok"
