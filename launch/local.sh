#!/usr/bin/env bash
# Run an sfbd_jax job on this machine: one process over all local devices (every CPU core as a
# host device, or all GPUs), or --processes N processes on localhost joined by
# jax.distributed (a multi-host run in miniature: each process gets --devices-per-process CPU
# host devices; output in WORKDIR/logs/process_<i>.log).
#
# Usage: launch/local.sh [--dry-run] [--processes N] [--devices-per-process D] [--port P]
#                        CONFIG WORKDIR [--config.key=value ...]
#   --dry-run   print the exact commands, run nothing (anywhere on the line).
set -euo pipefail

usage() {
  sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
}

dry_run=0 processes=1 devices_per_process=0 port=12355
# --dry-run counts wherever it stands (before CONFIG, between, or among the overrides).
args=()
for a in "$@"; do
  if [[ $a == --dry-run ]]; then dry_run=1; else args+=("$a"); fi
done
set -- ${args[@]+"${args[@]}"}
while [[ $# -gt 0 ]]; do
  case $1 in
    --dry-run) dry_run=1; shift ;;
    --processes) processes=${2:?}; shift 2 ;;
    --devices-per-process) devices_per_process=${2:?}; shift 2 ;;
    --port) port=${2:?}; shift 2 ;;
    -h|--help) usage ;;
    --) shift; break ;;
    -*) echo "unknown option: $1" >&2; usage ;;
    *) break ;;
  esac
done
[[ $# -ge 2 ]] || usage
[[ $processes =~ ^[1-9][0-9]*$ ]] || { echo "--processes must be a positive integer" >&2; exit 2; }
config=$1 workdir=$2
shift 2
python=${PYTHON:-python}

base=("$python" -m sfbd_jax.main --config "$config" --workdir "$workdir")
if [[ $processes == 1 ]]; then
  cmd=("${base[@]}")
  [[ $devices_per_process == 0 ]] || cmd+=("--config.num_cpu_devices=$devices_per_process")
  cmd+=("$@")
  if [[ $dry_run == 1 ]]; then
    printf '%q ' "${cmd[@]}"; echo
    exit 0
  fi
  exec "${cmd[@]}"
fi

# Several processes: the CPU device count is per process (0 = cores / processes).
if [[ $devices_per_process == 0 ]]; then
  cores=$(nproc 2>/dev/null || echo 1)
  devices_per_process=$(( cores / processes > 0 ? cores / processes : 1 ))
fi
logs=$workdir/logs
pids=()
[[ $dry_run == 1 ]] || mkdir -p "$logs"
for (( i = 0; i < processes; i++ )); do
  cmd=("${base[@]}" "--config.num_cpu_devices=$devices_per_process" --distributed
       "--coordinator_address=localhost:$port" "--num_processes=$processes" "--process_id=$i"
       "$@")
  if [[ $dry_run == 1 ]]; then
    printf '%q ' "${cmd[@]}"; printf '> %q 2>&1 &\n' "$logs/process_$i.log"
  else
    "${cmd[@]}" > "$logs/process_$i.log" 2>&1 &
    pids+=($!)
  fi
done
[[ $dry_run == 1 ]] && { echo wait; exit 0; }
status=0
for i in "${!pids[@]}"; do
  if ! wait "${pids[$i]}"; then
    echo "process $i failed; see $logs/process_$i.log" >&2
    status=1
  fi
done
exit $status
