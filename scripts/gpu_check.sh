#!/usr/bin/env bash
# The prepared device check: what a lent GPU machine (15 minutes in all, a bare image) runs, in one command.
#
#   scripts/gpu_check.sh [--out DIR] [--work DIR] [--device cuda|cpu] [--dry-run] [--wheels DIR]
#                        [--budget SECONDS] [--methods m1,m2,...] [--jobs N]
#
# Writes into DIR ($OUT, else ./gpu_check): versions.json and nvidia-smi.txt; runs/METHOD-fp32 and
# runs/METHOD-bf16 (one tiny `bench run` of every method, the second under bf16 autocast), each with its
# result.json, history.json, args.yaml (and an amt run's pool.json); the bulky files (shards, checkpoints,
# adapters) stay in the work folder (--work, default a new temporary folder), so that what comes back is small; engines.json (PlainEngine and DeepSpeed ZeRO 0-3 in one process);
# perf_loader.json and perf_paper_step.json (`bench perf` at the paper's batch of 128 on a GPU); logs/ (one
# per step); steps.jsonl (one line per step: rc, seconds, timed out); summary.json (every step's outcome, the
# figures and the targets of docs/perf.md). Every step has its own timeout, all of them fit in --budget
# (default 480 s), and a step that fails is recorded and never stops the others. Exit status 0 when every
# step passed, 1 otherwise (the summary says which).
#
# The image has python3 with torch, torchvision, timm, peft, pandas, scipy, pyyaml, tqdm and scikit-learn.
# What `bench run` and `bench perf` need beyond that comes from the wheel folder (--wheels, default .wheels,
# made by scripts/gpu_wheels.sh): webdataset, wids, braceexpand, pyautoattack (the embedded backbone's
# weights), DeepSpeed (a wheel built here from its source distribution) and its dependencies. Left out by
# design: Ray (its wheel alone is larger than the 64 MiB a device call carries), so no sweep and no
# `bench perf --only tune` run there; W&B (tracking is off: BENCH_WANDB=off); matplotlib, optuna (leaderboard
# plots, optuna search: not part of a trial).
#
# --dry-run (with --device cpu): the same steps at tiny budgets on the tiny_cnn backbone, every CUDA check
# skipped, paper_step skipped (ResNet-50 at 224 px takes minutes on a CPU; tests/test_perf.py covers it); the
# test suite runs it this way (tests/test_gpu_check.py), so a change that breaks this script fails CI.
set -u

OUT_DIR="${OUT:-gpu_check}"
DEVICE=cuda
DRY_RUN=0
WORK=""
WHEELS=.wheels
BUDGET=480
METHODS=""
JOBS=""
PY="${PYTHON:-python3}"
while [ $# -gt 0 ]; do
  case "$1" in
    --out) OUT_DIR="$2"; shift 2 ;;
    --work) WORK="$2"; shift 2 ;;
    --device) DEVICE="$2"; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    --wheels) WHEELS="$2"; shift 2 ;;
    --budget) BUDGET="$2"; shift 2 ;;
    --methods) METHODS="$2"; shift 2 ;;
    --jobs) JOBS="$2"; shift 2 ;;
    -h|--help) sed -n '2,30p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: error: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
case "$DEVICE" in cuda|cpu) ;; *) echo "gpu_check.sh: error: --device must be cuda or cpu, got $DEVICE" >&2; exit 2 ;; esac
case "$BUDGET" in ''|*[!0-9]*) echo "gpu_check.sh: error: --budget must be whole seconds, got $BUDGET" >&2; exit 2 ;; esac

REPO="$(cd "$(dirname "$0")/.." && pwd)"
mkdir -p "$OUT_DIR/logs" "$OUT_DIR/runs" || exit 2
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
[ -z "$WORK" ] && WORK="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")"
mkdir -p "$WORK/runs" || exit 2
WORK="$(cd "$WORK" && pwd)"
cd "$REPO" || exit 2
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"  # the suite from this tree: nothing of ours is installed there
export BENCH_WANDB=off WANDB_MODE=disabled WANDB_SILENT=true RAY_USAGE_STATS_ENABLED=0
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$WORK/torch_extensions}"
export PIP_DISABLE_PIP_VERSION_CHECK=1
[ "$DEVICE" = cpu ] && export CUDA_VISIBLE_DEVICES=""  # torch sees no GPU: every CUDA check is skipped
HELPER=(scripts/gpu_check_steps.py)
STEPS="$OUT_DIR/steps.jsonl"
: > "$STEPS"
START=$(date +%s)
DEADLINE=$((START + BUDGET))
RESERVE=15  # kept for the summary

# step NAME TIMEOUT CMD...: CMD under `timeout`, clamped to the time left; its output in logs/NAME.log
step() {
  local name="$1" limit="$2"; shift 2
  local left=$((DEADLINE - RESERVE - $(date +%s)))
  [ "$limit" -gt "$left" ] && limit=$left
  if [ "$limit" -lt 5 ]; then
    printf '{"step": "%s", "rc": null, "seconds": 0, "timed_out": false, "skipped": "no time left in the budget"}\n' \
      "$name" >> "$STEPS"
    return 0
  fi
  local t0 rc ms
  t0=$(date +%s%N)
  timeout -k 10 "$limit" "$@" > "$OUT_DIR/logs/$name.log" 2>&1
  rc=$?
  ms=$((($(date +%s%N) - t0) / 1000000))
  printf '{"step": "%s", "rc": %d, "seconds": %d.%03d, "timeout_s": %d, "timed_out": %s}\n' "$name" "$rc" \
    $((ms / 1000)) $((ms % 1000)) "$limit" "$([ $rc = 124 ] || [ $rc = 137 ] && echo true || echo false)" \
    >> "$STEPS"
  return 0
}

skip() {  # skip NAME WHY
  printf '{"step": "%s", "rc": null, "seconds": 0, "timed_out": false, "skipped": "%s"}\n' "$1" "$2" >> "$STEPS"
}

# 1. the machine: nvidia-smi, versions (python, torch, CUDA, cuDNN, device)
if command -v nvidia-smi > /dev/null 2>&1; then
  step nvidia_smi 20 bash -c "nvidia-smi > '$OUT_DIR/nvidia-smi.txt' 2>&1; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >> '$OUT_DIR/nvidia-smi.txt'"
else
  echo "nvidia-smi: not found on this machine" > "$OUT_DIR/nvidia-smi.txt"
  skip nvidia_smi "nvidia-smi not found"
fi
step versions 60 "$PY" "${HELPER[@]}" versions "$OUT_DIR/versions.json"

# 2. what the image lacks, from the wheel folder (no network there)
step install 120 "$PY" "${HELPER[@]}" install "$WHEELS"

# 3. the embedded data set
step shards 120 "$PY" -m bench shards make digits --out "$WORK/shards"

# 4. speed, alone on the machine, first (the figures the targets need): the paper-scale steps (batch 128 on
#    a GPU; fp32 eager against bf16 autocast + channels_last + compile, model FLOPs, MFU), then the loader.
#    Two calls, so that one running out of time leaves the other's figures.
if [ "$DRY_RUN" = 1 ]; then
  skip perf_paper_step "dry-run: ResNet-50 at 224 px takes minutes on a CPU (tests/test_perf.py covers paper_step)"
else
  step perf_paper_step 210 "$PY" -m bench perf --only paper_step --quick --out "$OUT_DIR/perf_paper_step.json"
fi
LOADER_LIMIT=90; [ "$DRY_RUN" = 1 ] && LOADER_LIMIT=300  # a shared 2-core CPU: generous
step perf_loader "$LOADER_LIMIT" "$PY" -m bench perf --only loader --quick --out "$OUT_DIR/perf_loader.json"

# 5. one tiny run of every method, fp32 then bf16 autocast, in parallel (correctness, not timing); the
#    engines check beside them
if [ "$DRY_RUN" = 1 ]; then
  BACKBONE=tiny_cnn; JOBS="${JOBS:-2}"; RUN_LIMIT=300  # a shared CPU: generous
else
  BACKBONE=cifar_resnet18_aa; JOBS="${JOBS:-8}"; RUN_LIMIT=150
fi
THREADS_PER_RUN=$(( $(nproc) / JOBS )); [ "$THREADS_PER_RUN" -lt 1 ] && THREADS_PER_RUN=1  # no oversubscription
[ -z "$METHODS" ] && METHODS="$("$PY" -c 'from methods import list_methods; print(",".join(list_methods()))' 2>/dev/null)"
[ -z "$METHODS" ] && METHODS="amt,autolora,ft,pmf,protonet_lora,rft,twins"  # the registry did not import: runs say why
read -r -a SUPERVISED_TINY <<< "--set epochs=1 --set max_train_samples=64 --set batch_size=16 --set n_val=16 --set n_eval=32 --set eval_batch_size=32 --set train_attack_steps=1 --set eval_pgd_steps=1 --set val_pgd_steps=1 --set autoattack_version=off"
read -r -a EPISODIC_TINY <<< "--set epochs=1 --set warmup_epochs=0 --set episodes_per_epoch=2 --set episodes=2 --set val_episodes=1 --set ways=5 --set shots=1 --set queries=2 --set image_size=32 --set train_attack_steps=1 --set eval_pgd_steps=1 --set val_pgd_steps=1 --set autoattack_version=off"

run_method() {  # run_method METHOD DTYPE
  local m="$1" dtype="$2" extra=()
  case "$m" in
    amt) extra=("${EPISODIC_TINY[@]}" --set pool_size=2 --set test_time_ft_steps=1) ;;
    pmf) extra=("${EPISODIC_TINY[@]}" --set test_time_ft_steps=1) ;;
    protonet_lora) extra=("${EPISODIC_TINY[@]}") ;;
    *) extra=("${SUPERVISED_TINY[@]}") ;;
  esac
  [ "$dtype" = bf16 ] && extra+=(--set bf16_autocast=true)
  step "run_${m}_${dtype}" "$RUN_LIMIT" env OMP_NUM_THREADS="$THREADS_PER_RUN" "$PY" -m bench run --method "$m" --dataset digits --backbone "$BACKBONE" \
    --data-root "$WORK/shards" --out "$WORK/runs/$m-$dtype" --no-progress "${extra[@]}"
}

step engines "$((RUN_LIMIT + 150))" "$PY" "${HELPER[@]}" engines "$OUT_DIR/engines.json" --backbone "$BACKBONE" &
for dtype in fp32 bf16; do
  for m in ${METHODS//,/ }; do
    while [ "$(jobs -rp | wc -l)" -ge "$((JOBS + 1))" ]; do wait -n; done
    run_method "$m" "$dtype" &
  done
done
wait
for d in "$WORK"/runs/*/; do  # the runs' records come back; their checkpoints and adapters stay
  [ -d "$d" ] || continue
  name="$(basename "$d")"
  mkdir -p "$OUT_DIR/runs/$name"
  for f in result.json history.json args.yaml pool.json; do
    [ -f "$d/$f" ] && cp "$d/$f" "$OUT_DIR/runs/$name/"
  done
done

# 6. the summary (never skipped: RESERVE seconds were kept for it)
timeout -k 5 "$RESERVE" "$PY" "${HELPER[@]}" summary "$OUT_DIR" --device "$DEVICE" --dry-run "$DRY_RUN" \
  --budget "$BUDGET" --started "$START"
