#!/usr/bin/env bash
# The ViT-Tiny/4 arms of docs/evidence.md (AdrenalMNIST3D) on one GPU, in under 8 minutes on an
# H200: MAE and SimCLR pretraining of vit3d_tiny_p4 on the train+val images, then every ViT cell
# (scratch / MAE / SimCLR x 4 label budgets x 5 seeds) in parallel processes, one per arm and
# seed, then the table with the paired bootstrap comparisons. The CNN arms and the floors are the
# CPU run of configs/experiments/adrenalmnist3d_evidence.yaml.
#
#   bash benchmarks/gpu_evidence.sh                 # on the GPU machine, from the repo root
#   SMOKE=1 DEVICE=cpu PRECISION=fp32 bash benchmarks/gpu_evidence.sh   # a tiny CPU dry run
#
# Writes $OUT (default runs/adrenal_gpu): pretraining runs, cells, table.md, results.json,
# gpu.txt (nvidia-smi), timings.txt. Nothing is downloaded: the data is a local .npz.
set -euo pipefail
cd "$(dirname "$0")/.."

UMIT=${UMIT:-.venv/bin/umit}
NPZ=${NPZ:-../shared/data/medmnist3d/adrenalmnist3d.npz}
OUT=${OUT:-runs/adrenal_gpu}
DEVICE=${DEVICE:-cuda}
PRECISION=${PRECISION:-bf16}
ENCODER=${ENCODER:-vit3d_tiny_p4}
SEEDS=${SEEDS:-"0 1 2 3 4"}
PRETRAIN_STEPS=${PRETRAIN_STEPS:-2000}
PRETRAIN_BATCH=${PRETRAIN_BATCH:-128}
COUNTS=${COUNTS:-"[24,48,96,100000]"}
# The CPU table's schedule. With all labels ViT-Tiny/8 under-fits at 600 steps and learns at
# 2400 (docs/evidence.md): STEPS="{n24: 300, n48: 300, n96: 300, all: 2400}" for that schedule.
STEPS=${STEPS:-"{n24: 300, n48: 300, n96: 300, all: 600}"}
if [[ -n "${SMOKE:-}" ]]; then  # a dry run of every step at toy size
  ENCODER=vit3d_test_p16 SEEDS="0" PRETRAIN_STEPS=4 PRETRAIN_BATCH=4 COUNTS="[24]"
  STEPS="{n24: 4}"
fi
EXP=configs/experiments/adrenalmnist3d_evidence.yaml
mkdir -p "$OUT"
t0=$(date +%s)
stamp() { echo "$1 $(($(date +%s) - t0)) s" | tee -a "$OUT/timings.txt"; }
(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no GPU") \
  >"$OUT/gpu.txt"

if [[ ! -f "$OUT/prep/plan.json" ]]; then
  "$UMIT" ingest "$NPZ" --out "$OUT/raw" >"$OUT/ingest.log"
  "$UMIT" preprocess "$OUT/raw" --out "$OUT/prep" crop_foreground=false scheme=ct_window \
    'ct_window=[0,255]' workers=4 >"$OUT/preprocess.log"
fi
stamp prepared

common=(--data "$OUT/prep" "model=$ENCODER" "train.total_steps=$PRETRAIN_STEPS"
  "train.batch_size=$PRETRAIN_BATCH" "train.device=$DEVICE" "train.precision=$PRECISION"
  "train.warmup_steps=$((PRETRAIN_STEPS / 20 + 1))" "train.eval_every=$((PRETRAIN_STEPS / 4 + 1))")
"$UMIT" pretrain --config configs/pretrain/mae_vit3d_tiny_p8_adrenalmnist3d.yaml \
  --out "$OUT/mae_vit" "${common[@]}" >"$OUT/mae_vit.log" 2>&1 &
mae=$!
"$UMIT" pretrain --config configs/pretrain/simclr_vit3d_tiny_p8_adrenalmnist3d.yaml \
  --out "$OUT/simclr_vit" "${common[@]}" >"$OUT/simclr_vit.log" 2>&1 &
simclr=$!
wait $mae || { tail -20 "$OUT/mae_vit.log"; exit 1; }
wait $simclr || { tail -20 "$OUT/simclr_vit.log"; exit 1; }
stamp pretrained

vit_args="{encoder: $ENCODER, pool: mean}"
overrides=("out=$OUT/evidence" "data=$OUT/prep" "counts=$COUNTS" "steps_per_budget=$STEPS"
  "finetune.train.device=$DEVICE" "finetune.train.precision=$PRECISION"
  "arms.vit_scratch.model_args=$vit_args" "arms.vit_mae.model_args=$vit_args"
  "arms.vit_mae.pretrained=$OUT/mae_vit/encoder.pt"
  "arms.vit_simclr={model: classifier, model_args: $vit_args, pretrained: $OUT/simclr_vit/encoder.pt, finetune: {train: {lr: 5.0e-4, weight_decay: 0.05}}}"
  "arms.vit_scratch.seeds=null" "arms.vit_mae.seeds=null"
  'comparisons=[{a: vit_mae, b: vit_scratch}, {a: vit_mae, b: vit_scratch, b_budget_factor: 2}, {a: vit_simclr, b: vit_scratch}, {a: vit_simclr, b: vit_scratch, b_budget_factor: 2}]'
  floors=false)
pids=()
for arm in vit_scratch vit_mae vit_simclr; do
  for s in $SEEDS; do
    "$UMIT" data-efficiency --config "$EXP" "${overrides[@]}" "only_arms=[$arm]" "seeds=[$s]" \
      >"$OUT/cells_${arm}_s$s.log" 2>&1 &
    pids+=($!)
  done
done
fail=0
for p in "${pids[@]}"; do wait "$p" || fail=1; done
stamp fine-tuned
seeds_list="[$(echo $SEEDS | tr ' ' ',')]"
"$UMIT" data-efficiency --config "$EXP" "${overrides[@]}" "seeds=$seeds_list" \
  'only_arms=[vit_scratch, vit_mae, vit_simclr]' >"$OUT/table.log" 2>&1
cp "$OUT/evidence/table.md" "$OUT/table.md"
stamp tabulated
cat "$OUT/gpu.txt" "$OUT/table.md"
exit $fail
