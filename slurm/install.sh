#!/usr/bin/env bash
# Run once on a login node (compute nodes have no internet).
set -euo pipefail
cd "$(dirname "$0")/.."
module load StdEnv/2023 python/3.11 cuda/12.2 2>/dev/null || true
python -m venv .venv
.venv/bin/pip install --upgrade pip
.venv/bin/pip install torch  # the cluster's CUDA build of torch
.venv/bin/pip install -e ".[train]"
DS_BUILD_OPS=0 .venv/bin/pip install --no-build-isolation "deepspeed>=0.14"
.venv/bin/pip install --no-build-isolation flash-attn || echo "flash-attn not installed: SDPA will be used"
