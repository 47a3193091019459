#!/usr/bin/env bash
# Runs ti_jax training on a Cloud TPU VM or pod slice: create, install, train,
# fetch results, delete. Every gcloud command is printed; --dry_run only prints.
set -euo pipefail

usage() {
  cat <<'USAGE'
Usage: launch/tpu_vm.sh [options] STEP...

Steps (run in the order given; "all" = create install train fetch delete):
  create    gcloud compute tpus tpu-vm create (add --spot for spot capacity)
  install   copy this repository to every worker and pip install ti_jax[tpu]
  train     start python -m ti_jax.train on all workers with the same config
  fetch     copy the run directory back (from worker 0, or gsutil for gs://)
  delete    delete the TPU VM

Options:
  --name NAME            TPU VM name (default: ti-jax)
  --zone ZONE            zone (default: us-west4-a)
  --accelerator TYPE     e.g. v5litepod-8 (one host), v4-32 (four hosts) (default: v5litepod-8)
  --version VERSION      TPU software version (default: v2-alpha-tpuv5-lite for v5e, else tpu-ubuntu2204-base)
  --project PROJECT      GCP project (default: gcloud's configured project)
  --spot                 request spot (preemptible) capacity (needs a gs:// --workdir);
                         after a preemption, create/install/train again and the run
                         resumes from its last checkpoint
  --config FILE[:VARIANT]  ti_jax config (default: configs/style.py)
  --workdir DIR          run directory (default: ~/ti_jax_runs/NAME on worker 0); must be
                         gs://... for multi-host slices and with --spot
  --data DIR             training images: a local folder (copied to every worker by
                         "install") or gs://... (read by every worker)
  --out DIR              local folder for "fetch" (default: ./runs/NAME)
  --set KEY=VALUE        extra --config.KEY=VALUE override (repeatable)
  --dry_run              print the commands without running them
  -h, --help             this help
USAGE
}

name="ti-jax"; zone="us-west4-a"; accelerator="v5litepod-8"; version=""; project=""
spot=0; config="configs/style.py"; workdir=""; data=""; out=""; dry_run=0
overrides=(); steps=()

while [[ $# -gt 0 ]]; do
  case "$1" in
    --name) name="$2"; shift 2 ;;
    --zone) zone="$2"; shift 2 ;;
    --accelerator) accelerator="$2"; shift 2 ;;
    --version) version="$2"; shift 2 ;;
    --project) project="$2"; shift 2 ;;
    --spot) spot=1; shift ;;
    --config) config="$2"; shift 2 ;;
    --workdir) workdir="$2"; shift 2 ;;
    --data) data="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    --set) overrides+=("--config.$2"); shift 2 ;;
    --dry_run) dry_run=1; shift ;;
    -h|--help) usage; exit 0 ;;
    create|install|train|fetch|delete) steps+=("$1"); shift ;;
    all) steps+=(create install train fetch delete); shift ;;
    *) echo "error: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
[[ ${#steps[@]} -gt 0 ]] || { echo "error: no step given (see --help)" >&2; exit 2; }

# Hosts in a slice: v4/v5p/v2/v3 names count TensorCores (2 per chip, 4 chips
# per host); v5e/v6e name chips, 8 on a one-host slice, else 4 per host.
hosts_of() {
  local kind="${1%-*}" count="${1##*-}"
  [[ "$count" =~ ^[0-9]+$ ]] || { echo "error: cannot read accelerator type '$1'" >&2; exit 2; }
  case "$kind" in
    v5litepod|v5e|v6e) if (( count <= 8 )); then echo 1; else echo $(( count / 4 )); fi ;;
    *) if (( count <= 8 )); then echo 1; else echo $(( count / 8 )); fi ;;
  esac
}
hosts=$(hosts_of "$accelerator")
if [[ -z "$version" ]]; then
  case "$accelerator" in
    v5litepod-*|v5e-*) version="v2-alpha-tpuv5-lite" ;;
    v6e-*) version="v2-alpha-tpuv6e" ;;
    v5p-*) version="v2-alpha-tpuv5" ;;
    *) version="tpu-ubuntu2204-base" ;;
  esac
fi
# On the VM, training runs in ~/ti_jax, which "install" replaces: the default run
# directory sits beside it so a re-install never deletes a run.
[[ -n "$workdir" ]] || workdir="../ti_jax_runs/$name"
[[ -n "$out" ]] || out="./runs/$name"
if (( hosts > 1 )) && [[ "$workdir" != gs://* ]]; then
  echo "error: $accelerator has $hosts hosts; --workdir must be a gs:// path all of them share" >&2
  exit 2
fi
if (( spot )) && [[ "$workdir" != gs://* ]]; then
  echo "error: a preempted spot VM loses its disk; use a gs:// --workdir with --spot to resume" >&2
  exit 2
fi
# A local image folder is copied to every worker (install step) and read from there.
local_data=""
if [[ -n "$data" && "$data" != gs://* ]]; then
  local_data="$data"
  data="../ti_jax_data"  # relative to ~/ti_jax, where training runs
fi

gcloud_tpu=(gcloud compute tpus tpu-vm)
common=(--zone "$zone")
[[ -n "$project" ]] && common+=(--project "$project")

# shellcheck source=launch/common.sh
source "$(dirname "$0")/common.sh"

# The training command for the workers' shell, every argument quoted for it.
remote_train_cmd() {
  local args=(python3 -m ti_jax.train --config "$config" --workdir "$workdir")
  [[ -n "$data" ]] && args+=("--config.train_data_dir=$data")
  args+=("${overrides[@]+"${overrides[@]}"}")
  local cmd="cd ~/ti_jax &&"
  # Several hosts: tell JAX how many processes to expect; it finds the rest itself.
  (( hosts > 1 )) && cmd+=" TI_JAX_NUM_PROCESSES=$hosts"
  local a
  for a in "${args[@]}"; do cmd+=" $(printf '%q' "$a")"; done
  echo "$cmd"
}

echo "# $accelerator: $hosts host(s); workdir $workdir" >&2
for step in "${steps[@]}"; do
  case "$step" in
    create)
      args=("$name" "${common[@]}" --accelerator-type "$accelerator" --version "$version")
      (( spot )) && args+=(--spot)
      run "${gcloud_tpu[@]}" create "${args[@]}" ;;
    install)
      # Start clean so a second install does not nest copies inside the first.
      run "${gcloud_tpu[@]}" ssh "$name" --worker=all "${common[@]}" \
        --command "rm -rf ~/ti_jax ~/ti_jax_data"
      run "${gcloud_tpu[@]}" scp --recurse --worker=all "${common[@]}" \
        "$(cd "$(dirname "$0")/.." && pwd)" "$name:~/ti_jax"
      run "${gcloud_tpu[@]}" ssh "$name" --worker=all "${common[@]}" \
        --command "cd ~/ti_jax && python3 -m pip install -q -e '.[tpu]'"
      if [[ -n "$local_data" ]]; then
        run "${gcloud_tpu[@]}" scp --recurse --worker=all "${common[@]}" "$local_data" "$name:~/ti_jax_data"
      fi ;;
    train)
      # The same command on every worker; JAX finds the other hosts itself.
      run "${gcloud_tpu[@]}" ssh "$name" --worker=all "${common[@]}" \
        --command "$(remote_train_cmd)" ;;
    fetch)
      if [[ "$workdir" == gs://* ]]; then
        run gsutil -m cp -r "$workdir" "$out"
      else
        # scp takes remote paths without a leading / as relative to the home folder.
        remote_dir="ti_jax/$workdir"
        [[ "$workdir" == /* ]] && remote_dir="$workdir"
        [[ "$workdir" == ../* ]] && remote_dir="${workdir#../}"
        run "${gcloud_tpu[@]}" scp --recurse --worker=0 "${common[@]}" "$name:$remote_dir" "$out"
      fi ;;
    delete)
      run "${gcloud_tpu[@]}" delete "$name" "${common[@]}" --quiet ;;
  esac
done
