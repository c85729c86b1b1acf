#!/usr/bin/env bash
# Run an sfbd_jax job on GPUs: one process over all GPUs of this node, or --nodes N nodes
# through SLURM (sbatch; one process per GPU, joined by jax.distributed from the SLURM
# environment; WORKDIR must be on a file system every node sees).
#
# Usage: launch/gpu.sh [--dry-run] [--nodes N] [--gpus-per-node G] [--partition P]
#                      [--account A] [--time HH:MM:SS] [--venv DIR] CONFIG WORKDIR
#                      [--config.key=value ...]
#   --dry-run   print the exact commands (and the sbatch script), run nothing (anywhere).
#   --nodes 0   (default) run here on this node's GPUs, no SLURM.
set -euo pipefail

usage() {
  sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
}

dry_run=0 nodes=0 gpus_per_node=8 partition="" account="" time_limit=24:00:00 venv=""
# --dry-run counts wherever it stands (before CONFIG, between, or among the overrides).
args=()
for a in "$@"; do
  if [[ $a == --dry-run ]]; then dry_run=1; else args+=("$a"); fi
done
set -- ${args[@]+"${args[@]}"}
while [[ $# -gt 0 ]]; do
  case $1 in
    --dry-run) dry_run=1; shift ;;
    --nodes) nodes=${2:?}; shift 2 ;;
    --gpus-per-node) gpus_per_node=${2:?}; shift 2 ;;
    --partition) partition=${2:?}; shift 2 ;;
    --account) account=${2:?}; shift 2 ;;
    --time) time_limit=${2:?}; shift 2 ;;
    --venv) venv=${2:?}; shift 2 ;;
    -h|--help) usage ;;
    --) shift; break ;;
    -*) echo "unknown option: $1" >&2; usage ;;
    *) break ;;
  esac
done
[[ $# -ge 2 ]] || usage
[[ $nodes =~ ^[0-9]+$ ]] || { echo "--nodes must be a non-negative integer" >&2; exit 2; }
[[ $gpus_per_node =~ ^[1-9][0-9]*$ ]] || { echo "--gpus-per-node must be positive" >&2; exit 2; }
config=$1 workdir=$2
shift 2
repo=$(cd "$(dirname "$0")/.." && pwd)

# XLA may take 75% of GPU memory up front (the default); tf.data never touches the GPUs.
main=(python -m sfbd_jax.main --config "$config" --workdir "$workdir")

if [[ $nodes == 0 ]]; then
  cmd=(env XLA_PYTHON_CLIENT_MEM_FRACTION=.90 "${main[@]}" "$@")
  if [[ $dry_run == 1 ]]; then
    [[ -z $venv ]] || printf '. %q\n' "$venv/bin/activate"
    printf 'cd %q\n' "$repo"
    printf '%q ' "${cmd[@]}"; echo
    exit 0
  fi
  # shellcheck disable=SC1091
  [[ -z $venv ]] || . "$venv/bin/activate"
  cd "$repo"
  exec "${cmd[@]}"
fi

# Multi-node: every process sees all GPUs of its node and takes the one of its SLURM local
# rank (jax.distributed's SLURM detection: coordinator = first node, ids from SLURM_PROCID).
run_line=$(printf '%q ' "${main[@]}" --distributed "$@")
script=$(cat <<SBATCH
#!/usr/bin/env bash
#SBATCH --job-name=sfbd_jax
#SBATCH --nodes=$nodes
#SBATCH --ntasks-per-node=$gpus_per_node
#SBATCH --gpus-per-node=$gpus_per_node
#SBATCH --time=$time_limit
#SBATCH --output=$workdir/logs/slurm-%j.out
${partition:+#SBATCH --partition=$partition}
${account:+#SBATCH --account=$account}
set -euo pipefail
${venv:+. $(printf '%q' "$venv/bin/activate")}
cd $(printf '%q' "$repo")
export XLA_PYTHON_CLIENT_MEM_FRACTION=.90
srun --kill-on-bad-exit=1 $run_line
SBATCH
)
if [[ $dry_run == 1 ]]; then
  printf 'mkdir -p %q\n' "$workdir/logs"
  echo "sbatch <<'EOF'"
  echo "$script"
  echo "EOF"
  exit 0
fi
mkdir -p "$workdir/logs"
sbatch <<< "$script"
