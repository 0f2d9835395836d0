#!/usr/bin/env bash
# Cross-sequence evidence (docs/pretraining.md): two lanes, one process each, one thread each.
#   lane brats:    per fold k of 3: pretrain cross_sequence + MAE, data-efficiency (1 and 2
#                  labeled subjects x 4 arms x seed 0), channel-dropout robustness
#   lane phantoms: pretrain cross_sequence + MAE, data-efficiency (1 and 2 x 4 arms x 3 seeds)
# Prepare the stores first with benchmarks/cross_sequence_evidence.py (brats, phantoms).
set -u
export OMP_NUM_THREADS=1 PYTHONPATH=${PYTHONPATH:-src}
UMIT=${UMIT:-umit}
R=${R:-runs/xseq}
XS=src/umit/configs/pretrain/cross_sequence_vit3d_tiny_p8_mri.yaml
PRE_STEPS=${PRE_STEPS:-150}
FT_STEPS=${FT_STEPS:-100}
ENC=${ENC:-vit3d_test_p8}

pretrain() {  # data out method val_cases synthesis_split
  [ -f "$2/encoder.pt" ] && return 0
  local extra=()
  if [ "$3" = mae ]; then
    extra=(method=mae "mae={mask_ratio: 0.75, decoder_dim: 96, decoder_depth: 1, decoder_heads: 4}")
  else
    extra=(cross_sequence.synthesis_split=$5)
  fi
  $UMIT pretrain --config $XS data=$1 out=$2 model=$ENC val_cases=$4 \
    train.batch_size=2 train.warmup_steps=15 \
    train.total_steps=$PRE_STEPS train.eval_every=$PRE_STEPS train.ckpt_every=$PRE_STEPS "${extra[@]}"
}

efficiency() {  # data out pretrain_dir seeds [only_arms]
  cat > $2.yaml <<YAML
data: $1
out: $2
counts: [1, 2]
seeds: $4
n_boot: 200
n_boot_paired: 1000
steps_per_budget: {n1: $FT_STEPS, n2: $FT_STEPS}
comparisons:
- {a: unetr_xseq, b: unetr_scratch}
- {a: unetr_xseq, b: unetr_mae}
- {a: unetr_xseq, b: resunet}
finetune:
  task: segmentation
  crop_size: [32, 32, 32]
  samples_per_case: 8
  val_fraction: 0.0
  select: last
  sw_batch_size: 4
  foreground_prob: 0.5
  ce_weight: 0.3
  train: {total_steps: $FT_STEPS, batch_size: 2, lr: 2.0e-3, warmup_steps: 15,
          eval_every: 100000, ckpt_every: 100000, log_every: 50, progress: false}
arms:
  unetr_xseq: {model: unetr, model_args: {encoder: $ENC, feature_size: 8}, pretrained: $3/xseq/encoder.pt}
  unetr_mae: {model: unetr, model_args: {encoder: $ENC, feature_size: 8}, pretrained: $3/mae/encoder.pt}
  unetr_scratch: {model: unetr, model_args: {encoder: $ENC, feature_size: 8}}
  resunet: {model: resunet3d, model_args: {features: [8, 16, 32]}}
YAML
  $UMIT data-efficiency --config $2.yaml ${5:+"only_arms=$5"}
}

dropout() {  # data out: the unetr_xseq cell with 2 labeled subjects (seed 0) again with
  # channel_dropout=0.5, then both evaluated with every sequence, without FLAIR, without T1c
  local cell=$2/eff/cells/unetr_xseq/n2_s0/run o=$2/cd0.5
  [ -f $o/best.pt ] || $UMIT finetune --config $cell/config.yaml out=$o channel_dropout=0.5 \
    train.resume=null
  for m in $cell $o; do
    for d in none FLAIR T1c; do
      local drop="[]"; [ $d = none ] || drop="[$d]"
      [ -f $m/eval_$d/summary.json ] || $UMIT evaluate --model $m/best.pt --data $1 \
        out=$m/eval_$d "drop_channels=$drop" case_figures=false n_boot=200
    done
  done
}

lane_brats() {
  for k in 0 1 2; do
    local d=$R/brats/fold$k o=$R/brats/runs/fold$k
    mkdir -p $o
    pretrain $d $o/xseq cross_sequence 1 test
    pretrain $d $o/mae mae 1 test
    efficiency $d $o/eff $o "[0]"
    dropout $d $o
  done
}

lane_brats_long() {  # the longer budget with 3 fine-tuning seeds per fold, cross-sequence
  # pretraining against scratch only (R=runs/xseq_long PRE_STEPS=2000 FT_STEPS=300; the fold
  # stores of the short run, DATA_R=runs/xseq)
  for k in 0 1 2; do
    local d=${DATA_R:-$R}/brats/fold$k o=$R/brats/runs/fold$k
    mkdir -p $o
    pretrain $d $o/xseq cross_sequence 1 test
    efficiency $d $o/eff $o "[0, 1, 2]" "[unetr_xseq,unetr_scratch]"
  done
}

lane_brats_seeds() {  # seeds 1 and 2 for every arm and fold (the encoders and seed-0 cells of
  # lane_brats are reused: data-efficiency resumes per cell)
  for k in 0 1 2; do
    efficiency $R/brats/fold$k $R/brats/runs/fold$k/eff $R/brats/runs/fold$k "[0, 1, 2]"
  done
}

lane_dropout() {  # the channel-dropout step alone, every fold
  for k in 0 1 2; do dropout $R/brats/fold$k $R/brats/runs/fold$k; done
}

lane_phantoms() {
  local d=$R/phantoms/prep o=$R/phantoms/runs
  mkdir -p $o
  pretrain $d $o/xseq cross_sequence 2 test
  pretrain $d $o/mae mae 2 test
  efficiency $d $o/eff $o "${PH_SEEDS:-[0]}"
}

"$@"
