#!/usr/bin/env bash
# The alignment ablation at demo scale: the demo recipe (tiny model, Bach chorales, 8 x 512 ids,
# packed) on a 2,000-step schedule, the same seed and data order in every arm, one alignment
# design per arm; each arm's checkpoint at EVAL_STEP (default 1000: the arms of the recorded run
# were stopped there, at equal compute) evaluated by mmm.evaluate on the test split (likelihood,
# the fill under four prompts, the listening benchmark; no control requests: num_requests=0). A re-run skips what is done; arms train
# two at a time, one thread each.
#   bash experiments/alignment/run.sh [OUT] [train|evaluate|all]
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-runs/alignment}
PHASE=${2:-all}
EVAL_STEP=${EVAL_STEP:-1000}
PY=$(pwd)/.venv/bin/python
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
mkdir -p "$OUT"
source experiments/alignment/arms.sh
ORDER=(A_baseline B_bar_flag C_onset_flag D_onset_flag_all_tracks E_onset_flag_program F_onset_flag_program_all_tracks G_onset_flag_program_all_tracks_target_last)
checkpoint() { printf '%s/%s/checkpoints/step%07d.ckpt' "$OUT" "$1" "$EVAL_STEP"; }

train() {  # name
  local name=$1
  [ -f "$(checkpoint "$name")" ] && return 0
  # shellcheck disable=SC2086
  nice -n 10 "$PY" -m mmm.train +experiment=demo experiment_name="$name" "paths.runs_dir=$OUT" \
    trainer.max_steps=2000 callbacks.model_checkpoint.every_n_train_steps=250 \
    callbacks.model_checkpoint.save_top_k=-1 ${ARMS[$name]} > "$OUT/$name.log" 2>&1
}

evaluate() {  # name
  local name=$1 out="$OUT/eval/$1"
  [ -f "$out/metrics.json" ] || nice -n 10 "$PY" -m mmm.evaluate ckpt="$(checkpoint "$name")" out_dir="$out" num_requests=0 \
    > "$OUT/eval_$name.log" 2>&1
}

if [ "$PHASE" != evaluate ]; then
  for ((i = 0; i < ${#ORDER[@]}; i += 2)); do  # two arms at a time: the machine has two cores
    train "${ORDER[i]}" &
    if ((i + 1 < ${#ORDER[@]})); then train "${ORDER[i + 1]}" & fi
    wait
  done
fi
if [ "$PHASE" != train ]; then
  for name in "${ORDER[@]}"; do evaluate "$name"; done
  "$PY" experiments/alignment/table.py "$OUT/eval" > "$OUT/table.md"
  cat "$OUT/table.md"
fi
