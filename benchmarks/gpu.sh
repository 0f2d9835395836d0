#!/usr/bin/env bash
# The GPU rows of docs/benchmarks.md in one prepared run, under 8 minutes on one GPU:
#   1. the MONAI comparison cases at --size full on CUDA, both sides under bf16 autocast;
#   2. MAE pretraining throughput (ViT-B/16, 96^3, batch 32): samples/s and the fraction of the
#      card's bf16 peak, eager and with torch.compile;
#   3. the largest ViT that trains on the card with FSDP2 + activation checkpointing + bf16.
# Writes $OUT/gpu_rows.json (one JSON) and $OUT/gpu_rows.md (the table), and replaces the
# "GPU rows" section of docs/benchmarks.md with it (DOCS='' to skip).
#
#   bash benchmarks/gpu.sh                                   # on the GPU machine, repo root
#   DEVICE=cpu SIZE=tiny DOCS= bash benchmarks/gpu.sh         # the CPU check (tests run this)
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PY:-.venv/bin/python}
[[ -x "$PY" ]] || PY=python3
DEVICE=${DEVICE:-cuda}
SIZE=${SIZE:-full}
OUT=${OUT:-runs/gpu_rows}
DOCS=${DOCS-docs/benchmarks.md}
PARTS=${PARTS:-monai,mae,fsdp}
mkdir -p "$OUT"
(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no GPU") \
  >"$OUT/gpu.txt"
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}src"
t0=$(date +%s)
"$PY" benchmarks/gpu_rows.py --device "$DEVICE" --size "$SIZE" --out "$OUT" --docs "$DOCS" \
  --parts "$PARTS" "$@"
echo "gpu.sh: $(($(date +%s) - t0)) s" | tee "$OUT/timings.txt"
