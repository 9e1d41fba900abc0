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
#SBATCH --job-name=rnndrop-study
#SBATCH --cpus-per-task=1
#SBATCH --mem=4G
#SBATCH --time=00:30:00
#SBATCH --output=slurm-%A_%a.out
set -euo pipefail
config=${STUDY_CONFIG:-experiments/long_range/full.yaml}
out=(${STUDY_OUT:+--out-dir "$STUDY_OUT"})
if [ -n "${REPORT:-}" ]; then
    exec rnndrop study long-range --config "$config" "${out[@]}" --report-only
fi
: "${SLURM_ARRAY_TASK_ID:?run this as an array job (sbatch --array=0-N), or set REPORT=1}"
export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1}
exec rnndrop study long-range --config "$config" "${out[@]}" --cell "$SLURM_ARRAY_TASK_ID" \
    --workers 1 --no-progress
