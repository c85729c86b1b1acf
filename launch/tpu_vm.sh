#!/usr/bin/env bash
# Run an sfbd_jax job on a Cloud TPU VM or pod slice with gcloud: create it, copy this
# checkout to every worker, install, run the same command on all workers (joined by
# jax.distributed, which reads the TPU environment), copy the run directory to a GCS bucket.
#
# Usage: launch/tpu_vm.sh [--dry-run] --name NAME --zone ZONE --bucket gs://BUCKET
#          [--accelerator-type v5litepod-8] [--version v2-alpha-tpuv5-lite] [--project P]
#          [--spot] [--skip-create] [--skip-install] [--shared-dir DIR] [--delete]
#          CONFIG RUN_NAME [--config.key=value ...]
#   --dry-run     print the exact commands, run nothing (anywhere on the line).
#   --shared-dir  a directory mounted on every worker (Filestore/NFS): required for pod
#                 slices with more than one host, whose processes share one run directory.
#                 Without it the run directory is ~/sfbd_runs/RUN_NAME on the (single) worker.
#   --delete      delete the TPU VM after the results are copied.
set -euo pipefail

usage() {
  sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
}

dry_run=0 name="" zone="" bucket="" accelerator=v5litepod-8 version=v2-alpha-tpuv5-lite
project="" spot=0 create=1 install=1 shared_dir="" delete=0
# --dry-run counts wherever it stands (before CONFIG, between, or among the overrides).
args=()
for a in "$@"; do
  if [[ $a == --dry-run ]]; then dry_run=1; else args+=("$a"); fi
done
set -- ${args[@]+"${args[@]}"}
while [[ $# -gt 0 ]]; do
  case $1 in
    --dry-run) dry_run=1; shift ;;
    --name) name=${2:?}; shift 2 ;;
    --zone) zone=${2:?}; shift 2 ;;
    --bucket) bucket=${2:?}; shift 2 ;;
    --accelerator-type) accelerator=${2:?}; shift 2 ;;
    --version) version=${2:?}; shift 2 ;;
    --project) project=${2:?}; shift 2 ;;
    --spot) spot=1; shift ;;
    --skip-create) create=0; shift ;;
    --skip-install) install=0; shift ;;
    --shared-dir) shared_dir=${2:?}; shift 2 ;;
    --delete) delete=1; shift ;;
    -h|--help) usage ;;
    --) shift; break ;;
    -*) echo "unknown option: $1" >&2; usage ;;
    *) break ;;
  esac
done
[[ $# -ge 2 ]] || usage
[[ -n $name && -n $zone && -n $bucket ]] || { echo "--name, --zone and --bucket are required" >&2; usage; }
[[ $bucket =~ ^gs://[a-z0-9._/-]+$ ]] || { echo "--bucket must be a gs:// address, got $bucket" >&2; exit 2; }
config=$1 run_name=$2
shift 2
[[ $run_name =~ ^[A-Za-z0-9._-]+$ ]] || { echo "RUN_NAME may hold only letters, digits, . _ -" >&2; exit 2; }
repo=$(cd "$(dirname "$0")/.." && pwd)

quote() {  # a word as a shell reads it back: bare when safe, else single-quoted
  if [[ $1 =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then printf '%s' "$1"; else printf '%s' "${1@Q}"; fi
}

run() {  # print (--dry-run) or run one command
  if [[ $dry_run == 1 ]]; then
    local sep=""
    for word in "$@"; do printf '%s%s' "$sep" "$(quote "$word")"; sep=" "; done
    echo
  else
    "$@"
  fi
}

gcloud_tpu=(gcloud compute tpus tpu-vm)
where=(--zone "$zone")
[[ -z $project ]] || where+=(--project "$project")
# The run directory as the workers' shell reads it (~ expands there).
if [[ -n $shared_dir ]]; then
  [[ $shared_dir =~ ^/[A-Za-z0-9._/-]*$ ]] || { echo "--shared-dir must be an absolute path of letters, digits, . _ - /" >&2; exit 2; }
  workdir=$shared_dir/sfbd_runs/$run_name
else
  # shellcheck disable=SC2088  # the tilde is for the worker's shell to expand
  workdir="~/sfbd_runs/$run_name"
fi
# The jax pin of requirements.txt, with its TPU runtime.
jax_version=$(sed -n 's/^jax==//p' "$repo/requirements.txt")
tarball=/tmp/sfbd_jax_$run_name.tar.gz

# 1. The TPU VM (or pod slice).
if [[ $create == 1 ]]; then
  create_cmd=("${gcloud_tpu[@]}" create "$name" "${where[@]}" --accelerator-type "$accelerator"
              --version "$version")
  [[ $spot == 0 ]] || create_cmd+=(--spot)
  run "${create_cmd[@]}"
fi

# 2. This checkout (the committed tree) on every worker.
run git -C "$repo" archive --format=tar.gz --prefix=sfbd_jax/ -o "$tarball" HEAD
run "${gcloud_tpu[@]}" scp "$tarball" "$name:sfbd_jax.tar.gz" "${where[@]}" --worker=all
unpack="rm -rf sfbd_jax && tar xzf sfbd_jax.tar.gz"

# 3. Install: the pinned requirements with jax's TPU runtime.
if [[ $install == 1 ]]; then
  install_line="$unpack && python3 -m venv ~/sfbd_venv && . ~/sfbd_venv/bin/activate"
  install_line+=" && pip install -q -r sfbd_jax/requirements.txt -e ./sfbd_jax"
  install_line+=" $(printf '%q' "jax[tpu]==$jax_version")"
  run "${gcloud_tpu[@]}" ssh "$name" "${where[@]}" --worker=all --command "$install_line"
else
  run "${gcloud_tpu[@]}" ssh "$name" "${where[@]}" --worker=all --command "$unpack"
fi

# 4. The same command on all workers; process ids come from the TPU environment.
main_line="python -m sfbd_jax.main --distributed --config $(printf '%q' "$config")"
main_line+=" --workdir $workdir"
for override in "$@"; do main_line+=" $(printf '%q' "$override")"; done
run "${gcloud_tpu[@]}" ssh "$name" "${where[@]}" --worker=all \
  --command "cd ~/sfbd_jax && . ~/sfbd_venv/bin/activate && $main_line"

# 5. Results to the bucket (from worker 0, which holds every record of the run).
run "${gcloud_tpu[@]}" ssh "$name" "${where[@]}" --worker=0 \
  --command "gcloud storage rsync --recursive $workdir $bucket/sfbd_runs/$run_name"

# 6. Optionally give the TPU back.
[[ $delete == 0 ]] || run "${gcloud_tpu[@]}" delete "$name" "${where[@]}" --quiet
