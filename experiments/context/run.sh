#!/usr/bin/env bash
# Does the model listen to the other tracks? (a re-run skips what is done)
#  1. a checkpoint's fill NLL under four prompts and its listening benchmark, on the test chorales
#     of the embedded corpus: python -m mmm.evaluate without the control requests;
#  2. the synthetic probe: a corpus whose doubling track is the melody an octave lower, the demo
#     recipe trained on it with each alignment design for 600 steps, then each model's fill
#     bits/note of that track (and of the independent bass) under the same prompts.
#   bash experiments/context/run.sh [OUT] [CKPT ...]
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-runs/context}
shift || true
CKPTS=("${@:-models/mmm-music21-small}")
PY=$(pwd)/.venv/bin/python
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
mkdir -p "$OUT"

for ckpt in "${CKPTS[@]}"; do
  name=$(basename "$ckpt")
  [ "$name" = model ] && name=$(basename "$(dirname "$ckpt")")
  [ -f "$OUT/eval/$name/metrics.json" ] || "$PY" -m mmm.evaluate ckpt="$ckpt" data=embedded num_requests=0 \
    out_dir="$OUT/eval/$name" > "$OUT/eval_$name.log" 2>&1
done

[ -d "$OUT/probe_midi" ] || "$PY" experiments/context/probe_corpus.py "$OUT/probe_midi" --pieces 400
source experiments/alignment/arms.sh
for arm in A_baseline B_bar_flag C_onset_flag E_onset_flag_program D_onset_flag_all_tracks G_onset_flag_program_all_tracks_target_last; do
  run="$OUT/probe/$arm"
  # shellcheck disable=SC2086
  [ -f "$run/model/config.json" ] || "$PY" -m mmm.train +experiment=demo data=folder data.path="$OUT/probe_midi" \
    data.name=probe "paths.data_dir=$OUT/data" "paths.runs_dir=$OUT/probe" experiment_name="$arm" \
    trainer.max_steps=600 data.samples_per_epoch=2400 ${ARMS[$arm]} > "$OUT/probe_$arm.log" 2>&1
  [ -f "$OUT/probe_$arm.json" ] || "$PY" experiments/context/probe_nll.py "$run/model" "$OUT/data/probe/store" \
    > "$OUT/probe_$arm.json"
done
"$PY" experiments/context/table.py "$OUT" > "$OUT/table.md"
cat "$OUT/table.md"
