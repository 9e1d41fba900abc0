#!/usr/bin/env bash
# One SLURM array task per cell of a study; a dependent job writes the report.
#
#   n=$(rnndrop study long-range --config experiments/long_range/full.yaml --list-cells | wc -l)
#   jid=$(sbatch --parsable --array=0-$((n - 1))%50 experiments/long_range/slurm.sh)
#   sbatch --dependency=afterany:$jid --export=ALL,REPORT=1 experiments/long_range/slurm.sh
#
# Cells are independent and resumable: a task that is preempted or fails reruns with the same
# command (finished cells are skipped by their config hash), and --report-only can be run at
# any time to aggregate what has finished. All tasks must see the same out_dir (a shared
# filesystem). Set STUDY_CONFIG / STUDY_OUT to use another study or output folder.
#
# The same script trains one `rnndrop fit` run that survives preemption: FIT_ARGS holds its
# arguments, FIT_ROOT (default runs/fit-$SLURM_JOB_ID) its fixed output folder.
#
#   sbatch --export=ALL,FIT_ARGS="--config experiments/synthetic/base.yaml \
#       --config experiments/synthetic/copy.yaml --checkpoint.every_n_train_steps 500",\
#       FIT_ROOT=runs/copy experiments/long_range/slurm.sh
#
# Preemption and the time limit: SLURM sends SIGTERM to this script 120 s before it kills
# the job (--signal=B:TERM@120). The script passes it on; `rnndrop fit` saves last.ckpt at the
# next step boundary and exits with 143 (128 + SIGTERM), a study cell exits with 143 too, and
# the script then requeues the job (--requeue). The requeued job runs the same command: the
# study skips finished cells, and the fit resumes from FIT_ROOT's last.ckpt (what may change on
# resume: README, "Preemption, kills and resuming").
#SBATCH --job-name=rnndrop-study
#SBATCH --cpus-per-task=1
#SBATCH --mem=4G
#SBATCH --time=00:30:00
#SBATCH --output=slurm-%A_%a.out
#SBATCH --signal=B:TERM@120
#SBATCH --requeue
set -euo pipefail
config=${STUDY_CONFIG:-experiments/long_range/full.yaml}
out=(${STUDY_OUT:+--out-dir "$STUDY_OUT"})
export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1}

# run "$@" in the background (bash runs a trap only between commands), pass SIGTERM on to it,
# and requeue the job when it stopped for SIGTERM
requeue_on_sigterm() {
    child='' term=''
    # set before the command starts: a SIGTERM that comes first is passed on once it has
    trap 'term=1; [ -z "$child" ] || kill -TERM "$child" 2>/dev/null || true' TERM
    "$@" &
    child=$!
    [ -z "$term" ] || kill -TERM "$child" 2>/dev/null || true
    status=0
    wait "$child" || status=$?
    if [ "$status" -gt 128 ] && kill -0 "$child" 2>/dev/null; then
        status=0  # the trap ended the first wait: wait for the command's own exit status
        wait "$child" || status=$?
    fi
    if [ "$status" -eq 143 ] && [ -n "${SLURM_JOB_ID:-}" ]; then
        echo "rnndrop: stopped by SIGTERM; requeueing job $SLURM_JOB_ID" >&2
        scontrol requeue "$SLURM_JOB_ID"
    fi
    return "$status"
}

if [ -n "${REPORT:-}" ]; then
    exec rnndrop study long-range --config "$config" "${out[@]}" --report-only
fi
if [ -n "${FIT_ARGS:-}" ]; then
    root=${FIT_ROOT:-runs/fit-${SLURM_JOB_ID:-local}}
    # a fixed checkpoint folder: the requeued job finds last.ckpt where this one left it
    resume=()
    if [ -f "$root/checkpoints/last.ckpt" ]; then
        resume=(--ckpt_path "$root/checkpoints/last.ckpt")
    fi
    # shellcheck disable=SC2086  # FIT_ARGS is a list of arguments
    requeue_on_sigterm rnndrop fit $FIT_ARGS --trainer.default_root_dir "$root" \
        --checkpoint.dirpath checkpoints "${resume[@]}"
    exit
fi
: "${SLURM_ARRAY_TASK_ID:?run this as an array job (sbatch --array=0-N), or set REPORT=1 or FIT_ARGS}"
requeue_on_sigterm rnndrop study long-range --config "$config" "${out[@]}" \
    --cell "$SLURM_ARRAY_TASK_ID" --workers 1 --no-progress
