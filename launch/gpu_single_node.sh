#!/usr/bin/env bash
# Trains on one machine with one or more NVIDIA GPUs; pmap uses every visible GPU.
set -euo pipefail

usage() {
  cat <<'USAGE'
Usage: launch/gpu_single_node.sh [options]

  --config FILE[:VARIANT]  ti_jax config (default: configs/style.py)
  --workdir DIR            run directory (default: runs/gpu)
  --gpus LIST              GPUs to use, e.g. 0,1 (default: all visible)
  --install                pip install -e '.[cuda]' first
  --set KEY=VALUE          extra --config.KEY=VALUE override (repeatable)
  --dry_run                print the commands without running them
  -h, --help               this help

Re-running the same command resumes from the newest checkpoint in --workdir.
USAGE
}

config="configs/style.py"; workdir="runs/gpu"; gpus=""; install=0; dry_run=0; overrides=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --config) config="$2"; shift 2 ;;
    --workdir) workdir="$2"; shift 2 ;;
    --gpus) gpus="$2"; shift 2 ;;
    --install) install=1; shift ;;
    --set) overrides+=("--config.$2"); shift 2 ;;
    --dry_run) dry_run=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "error: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done

# shellcheck source=launch/common.sh
source "$(dirname "$0")/common.sh"

cd "$(dirname "$0")/.."
(( install )) && run python3 -m pip install -q -e '.[cuda]'
envs=(env XLA_PYTHON_CLIENT_MEM_FRACTION=0.95)
[[ -n "$gpus" ]] && envs+=("CUDA_VISIBLE_DEVICES=$gpus")
run "${envs[@]}" python3 -m ti_jax.train --config "$config" --workdir "$workdir" \
  "${overrides[@]+"${overrides[@]}"}"
