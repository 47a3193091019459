#!/usr/bin/env bash
# Multi-node GPU training under SLURM: one process per node, each driving all of
# its GPUs; process 0's node is the JAX coordinator.
#
#   sbatch --nodes=4 --gpus-per-node=8 launch/slurm_multi_node.sh --config configs/style.py \
#       --workdir /shared/runs/style
#   launch/slurm_multi_node.sh --dry_run --nodes 4 ...   # print what would run
set -euo pipefail

usage() {
  cat <<'USAGE'
Usage: sbatch --nodes=N --gpus-per-node=G launch/slurm_multi_node.sh [options]
       launch/slurm_multi_node.sh --dry_run [--nodes N] [options]

  --config FILE[:VARIANT]  ti_jax config (default: configs/style.py)
  --workdir DIR            run directory on a filesystem all nodes share (or gs://)
  --port PORT              coordinator port on the first node (default: 12355)
  --set KEY=VALUE          extra --config.KEY=VALUE override (repeatable)
  --nodes N                with --dry_run: the node count to show (default: 2)
  --dry_run                print the srun command and environment, run nothing
  -h, --help               this help
USAGE
}

config="configs/style.py"; workdir=""; port=12355; dry_run=0; nodes=2; overrides=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --config) config="$2"; shift 2 ;;
    --workdir) workdir="$2"; shift 2 ;;
    --port) port="$2"; shift 2 ;;
    --set) overrides+=("--config.$2"); shift 2 ;;
    --nodes) nodes="$2"; shift 2 ;;
    --dry_run) dry_run=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "error: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
[[ -n "$workdir" ]] || { echo "error: --workdir is required (a path every node sees)" >&2; exit 2; }

# sbatch runs a copy of this script from its spool folder: find the repository
# through the submit directory instead.
repo="${SLURM_SUBMIT_DIR:-$(cd "$(dirname "$0")/.." && pwd)}"
# shellcheck source=launch/common.sh
source "$repo/launch/common.sh"

if (( dry_run )); then
  first_node="node-0"
else
  : "${SLURM_JOB_NODELIST:?run this under sbatch/salloc, or pass --dry_run}"
  first_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
  nodes="${SLURM_JOB_NUM_NODES:-$nodes}"
fi

export TI_JAX_COORDINATOR_ADDRESS="$first_node:$port"
export TI_JAX_NUM_PROCESSES="$nodes"
train=(python3 -m ti_jax.train --config "$config" --workdir "$workdir"
       "${overrides[@]+"${overrides[@]}"}")
# Each task learns its rank from SLURM_PROCID inside srun, so the variable must
# reach bash -c unexpanded.
# shellcheck disable=SC2016
cmd=(srun --nodes="$nodes" --ntasks="$nodes" --ntasks-per-node=1 --kill-on-bad-exit=1
     bash -c 'TI_JAX_PROCESS_ID=$SLURM_PROCID exec "$@"' _ "${train[@]}")

echo "+ export TI_JAX_COORDINATOR_ADDRESS=$TI_JAX_COORDINATOR_ADDRESS TI_JAX_NUM_PROCESSES=$TI_JAX_NUM_PROCESSES"
show "${cmd[@]}"
if (( ! dry_run )); then
  cd "$repo"
  "${cmd[@]}"
fi
