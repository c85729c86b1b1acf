#!/usr/bin/env bash
# Run an sfbd_jax job on this machine (all CPU cores as host devices, or all local GPUs).
# Usage: launch/local.sh [--dry-run] CONFIG WORKDIR [--config.key=value ...]
set -euo pipefail
dry_run=0
if [[ "${1:-}" == "--dry-run" ]]; then dry_run=1; shift; fi
if [[ $# -lt 2 ]]; then
  echo "usage: $0 [--dry-run] CONFIG WORKDIR [--config.key=value ...]" >&2
  exit 2
fi
config=$1 workdir=$2
shift 2
cmd=(python -m sfbd_jax.main --config "$config" --workdir "$workdir" "$@")
if [[ $dry_run == 1 ]]; then
  printf '%q ' "${cmd[@]}"; echo
else
  exec "${cmd[@]}"
fi
