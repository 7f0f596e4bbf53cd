#!/usr/bin/env bash
# Multi-node dinoforge pretraining with torchrun and a c10d rendezvous.
#
# Run the same command on every node (or let slurm.sbatch do it):
#   infra/launch/torchrun.sh --nnodes 4 --nproc-per-node 8 --head node001 \
#       pretrain/recipes/vitl14.toml --out /shared/runs/vitl14 --set optim.base_lr=2e-3
#
# Launcher options (everything from the first non-option on goes to `python -m pretrain train` unchanged):
#   --nnodes N|MIN:MAX      nodes in the job (default $NNODES or 1)
#   --nproc-per-node P      processes per node: a number, "gpu" or "auto" (default $NPROC_PER_NODE or auto)
#   --head HOST[:PORT]      rendezvous host (node 0), port 29400 unless given; not needed with --nnodes 1
#   --rdzv-id ID            job id shared by all nodes (default $RDZV_ID or dinoforge)
#   --max-restarts R        torchrun restarts of the worker group after a failure (default 0)
#   --dry-run               print the exact torchrun command and exit (also DRY_RUN=1)
# Environment: TORCHRUN (default: torchrun), NNODES, NPROC_PER_NODE, HEAD_ADDR, RDZV_ID, DRY_RUN.
# A restarted job resumes from the latest valid checkpoint under RUN_DIR/checkpoints.
set -euo pipefail

usage() {
    sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
}
die() { echo "torchrun.sh: $*" >&2; exit 2; }

nnodes=${NNODES:-1}
nproc=${NPROC_PER_NODE:-auto}
head=${HEAD_ADDR:-}
rdzv_id=${RDZV_ID:-dinoforge}
max_restarts=0
dry_run=${DRY_RUN:-0}

while [[ $# -gt 0 ]]; do
    case "$1" in
        --nnodes) [[ $# -ge 2 ]] || die "--nnodes needs a value"; nnodes=$2; shift 2 ;;
        --nproc-per-node|--nproc_per_node) [[ $# -ge 2 ]] || die "$1 needs a value"; nproc=$2; shift 2 ;;
        --head) [[ $# -ge 2 ]] || die "--head needs a value"; head=$2; shift 2 ;;
        --rdzv-id) [[ $# -ge 2 ]] || die "--rdzv-id needs a value"; rdzv_id=$2; shift 2 ;;
        --max-restarts) [[ $# -ge 2 ]] || die "--max-restarts needs a value"; max_restarts=$2; shift 2 ;;
        --dry-run) dry_run=1; shift ;;
        -h|--help) usage ;;
        --) shift; break ;;
        -*) die "unknown launcher option $1 (trainer options go after the recipe)" ;;
        *) break ;;
    esac
done

[[ $# -ge 1 ]] || die "missing RECIPE: torchrun.sh [options] RECIPE --out RUN_DIR [--set key=value ...]"
[[ " $* " == *" --out "* ]] || die "missing --out RUN_DIR after the recipe (the run directory makes resume possible)"
[[ $nnodes =~ ^[0-9]+(:[0-9]+)?$ ]] || die "--nnodes must be N or MIN:MAX, got '$nnodes'"
[[ $nproc =~ ^([0-9]+|gpu|auto|cpu)$ ]] || die "--nproc-per-node must be a number, gpu, cpu or auto, got '$nproc'"
[[ $max_restarts =~ ^[0-9]+$ ]] || die "--max-restarts must be a number, got '$max_restarts'"

cmd=("${TORCHRUN:-torchrun}" "--nnodes=$nnodes" "--nproc_per_node=$nproc")
if [[ -n $head ]]; then
    [[ $head == *:* ]] || head="$head:29400"
    cmd+=("--rdzv_backend=c10d" "--rdzv_endpoint=$head" "--rdzv_id=$rdzv_id")
elif [[ $nnodes == 1 ]]; then
    cmd+=("--standalone")
else
    die "--head HOST is required with --nnodes $nnodes (the rendezvous runs on node 0)"
fi
cmd+=("--max_restarts=$max_restarts" "-m" "pretrain" "train" "$@")

if [[ $dry_run == 1 ]]; then
    printf '%q ' "${cmd[@]}" | sed 's/ $//'
    echo
    exit 0
fi
exec "${cmd[@]}"
