#!/usr/bin/env bash
# The GPU check: on a machine with a CUDA GPU, from the repository root, in under 8 minutes:
#   bash experiments/gpu_check/run.sh
# 1. the tests that need CUDA (tests/test_cuda.py: flash-attn vs SDPA, bf16 step, KV cache);
# 2. tokens/s and MFU of `base` in bf16 with flash-attn and with SDPA, and their logits compared;
# 3. `base` trained on the demo corpus with flash-attn, then with SDPA (trainer=gpu, 1 GPU);
# 4. trainer=deepspeed on 1 GPU, its DeepSpeed checkpoint exported and a 4-bar infill from it.
# Results go to experiments/gpu_check/README.md (the section between the RESULTS markers).
# Needs: CUDA torch, `pip install -e ".[train,gpu]"` (flash-attn) and DeepSpeed, as slurm/install.sh does.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}
HERE=experiments/gpu_check
WORK=${GPU_CHECK_DIR:-runs/gpu_check}       # runs and data of the check (MMM_RUNS_DIR/MMM_DATA_DIR)
LOG=$WORK/log.txt
mkdir -p "$WORK"
export MMM_RUNS_DIR=$WORK/runs MMM_DATA_DIR=$WORK/data
: >"$LOG"
step() { echo "== $* ($(date +%T))" | tee -a "$LOG"; }
t0=$(date +%s)

step "1/4 CUDA tests"
$PY -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU visible'; print(torch.cuda.get_device_name(0), 'torch', torch.__version__, 'CUDA', torch.version.cuda)" | tee -a "$LOG"
$PY -m pytest -q -rs tests/test_cuda.py 2>&1 | tee -a "$LOG" | tail -5   # pipefail: a failed test stops the check

step "2/4 tokens/s, MFU, flash-attn vs SDPA logits (synthetic batches)"
$PY $HERE/bench.py --out "$WORK/bench.json" 2>&1 | tee -a "$LOG"

# The demo corpus (music21's Bach chorales) with the `base` model: a short real training run.
COMMON=(+experiment=demo model=base data.max_seq_len=1024 data.loader.num_workers=4 data.loader.batch_size=16
        trainer.max_steps=150 trainer.val_check_interval=150 callbacks.model_checkpoint.every_n_train_steps=150 logger=none)
step "3/4 train base: flash-attn, then SDPA"
$PY -m mmm.train "${COMMON[@]}" trainer=gpu trainer.devices=1 experiment_name=flash +model.overrides.attention=flash 2>&1 | tail -3 | tee -a "$LOG"
$PY -m mmm.train "${COMMON[@]}" trainer=gpu trainer.devices=1 experiment_name=sdpa +model.overrides.attention=sdpa 2>&1 | tail -3 | tee -a "$LOG"

step "4/4 trainer=deepspeed on 1 GPU, export, 4-bar infill"
$PY -m mmm.train "${COMMON[@]}" trainer=deepspeed trainer.devices=1 experiment_name=deepspeed trainer.max_steps=50 2>&1 | tail -3 | tee -a "$LOG"
$PY -m mmm.checkpoint "$WORK/runs/deepspeed/checkpoints/last.ckpt" "$WORK/runs/deepspeed/exported" | tee -a "$LOG"
$PY -m mmm.sample ckpt="$WORK/runs/deepspeed/exported" input="$WORK/data/music21_midi/bach/bwv1.6.mid" task=infill \
    track=1 'bars=[4,8]' out_dir="$WORK/runs/deepspeed/samples" 2>&1 | tail -2 | tee -a "$LOG"

$PY $HERE/report.py --work "$WORK" --seconds $(( $(date +%s) - t0 )) --readme $HERE/README.md
step "done in $(( $(date +%s) - t0 )) s; results in $HERE/README.md"
