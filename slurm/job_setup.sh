# shellcheck shell=bash
# Sourced by slurm/*.sbatch once they are in the checkout they were submitted from: loads the
# cluster's modules and activates the virtual environment. Cluster-specific values come from
# the environment, so the scripts run unchanged on any cluster:
#   MMM_MODULES  environment modules to load; default: the Alliance's (StdEnv/2023 python/3.11
#                cuda/12.2), loaded only where a `module` command exists; MMM_MODULES= loads none
#   MMM_VENV     the virtual environment to activate (default: .venv of the checkout)
# (the account and partition are sbatch's own SBATCH_ACCOUNT and SBATCH_PARTITION).
modules=${MMM_MODULES-StdEnv/2023 python/3.11 cuda/12.2}
if [ -n "$modules" ] && command -v module >/dev/null 2>&1; then
  # shellcheck disable=SC2086  # one word per module
  module load $modules || { echo "error: 'module load $modules' failed: set MMM_MODULES to your cluster's modules (MMM_MODULES= for none)" >&2; exit 1; }
elif [ -n "${MMM_MODULES:-}" ]; then
  echo "warning: MMM_MODULES=$MMM_MODULES, but this node has no module command: nothing loaded" >&2
fi
venv=${MMM_VENV:-.venv}
if [ ! -f "$venv/bin/activate" ]; then
  echo "error: no virtual environment at $venv (in $PWD): run 'bash slurm/install.sh' on a login node, or set MMM_VENV to yours" >&2
  exit 1
fi
# shellcheck disable=SC1091
source "$venv/bin/activate"
if ! python -c "" 2>/dev/null; then  # e.g. a venv made from an interpreter this user or node cannot run
  echo "error: the virtual environment at $venv has no python that runs as $(id -un) on $(hostname -s):" \
    "make it from a python every node and user can run (bash slurm/install.sh), or set MMM_VENV" >&2
  exit 1
fi
