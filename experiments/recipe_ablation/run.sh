#!/usr/bin/env bash
# Recipe ablation at demo scale (a re-run skips what is done): the demo experiment (tiny model, 500 steps, Bach chorales)
# trained with the recipe before the fixes (the code at BASE_COMMIT, in a git worktree) and
# with the fixed recipe, one change at a time; each model evaluated by mmm.evaluate on the
# test split of its own store (same pieces: the split is by content).
#   bash experiments/recipe_ablation/run.sh [BASE_COMMIT] [OUT]
set -euo pipefail
cd "$(dirname "$0")/../.."
BASE_COMMIT=${1:-4a93a17}
OUT=${2:-runs/recipe_ablation}
PY=$(pwd)/.venv/bin/python
# One thread per run: the runs then share a busy machine gracefully (a 2-thread CPU job that
# loses one core to another process stalls at every synchronisation point).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)

# A: the recipe before the fixes, from its own code.
if [ ! -d "$OUT/base_code" ]; then git worktree add --detach "$OUT/base_code" "$BASE_COMMIT"; fi
mkdir -p "$OUT/base_code/data"
[ -e "$OUT/base_code/data/music21_midi" ] || ln -s "$(pwd)/data/music21_midi" "$OUT/base_code/data/music21_midi"
[ -f "$OUT/runs/A_before/model/config.json" ] || \
  (cd "$OUT/base_code" && "$PY" -m mmm.train +experiment=demo experiment_name=A_before "paths.runs_dir=$OUT/runs")
# Its store is rebuilt by today's preprocessing with its tokenizer settings (miditok's default
# time signatures then), so that the test split holds the same pieces for every row.
mkdir -p "$OUT/eval_data_A"
[ -e "$OUT/eval_data_A/music21_midi" ] || ln -s "$(pwd)/data/music21_midi" "$OUT/eval_data_A/music21_midi"
[ -f "$OUT/eval/A_before/metrics.json" ] || "$PY" -m mmm.evaluate ckpt="$OUT/runs/A_before/model" \
    "paths.data_dir=$OUT/eval_data_A" "~tokenizer.params.time_signature_range" out_dir="$OUT/eval/A_before"

# B..D: today's code; the fixed recipe is configs/data/common.yaml's default.
run() {  # name, overrides...
  local name=$1; shift
  [ -f "$OUT/runs/$name/model/config.json" ] || "$PY" -m mmm.train +experiment=demo experiment_name="$name" "paths.runs_dir=$OUT/runs" "$@"
  [ -f "$OUT/eval/$name/metrics.json" ] || "$PY" -m mmm.evaluate ckpt="$OUT/runs/$name/model" out_dir="$OUT/eval/$name"
}
run B_marker_only data.sequences.uncontrolled_ratio=0.0
run C_fixed
run D_fixed_generated_loss_only data.sequences.context_loss=false
# E: C with a bar's header encoded as a BPE word of its own (today's encoding, its own BPE):
# rows A-D were trained and evaluated by the code before that change.
run E_header_split "tokenizer.path=$OUT/tokenizers/header_split_bpe\${tokenizer.vocab_size}.json"
"$PY" experiments/recipe_ablation/table.py "$OUT/eval" > "$OUT/table.md"
cat "$OUT/table.md"
