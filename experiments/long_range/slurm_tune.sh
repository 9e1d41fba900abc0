#!/usr/bin/env bash
# `rnndrop tune` on a cluster: N array tasks share one Optuna storage, then one job evaluates.
#
#   export TUNE_STORAGE=postgresql://user:pass@dbhost/rnndrop   # or sqlite:////shared/tune.db
#   jid=$(sbatch --parsable --array=0-15 experiments/long_range/slurm_tune.sh)
#   sbatch --dependency=afterany:$jid --export=ALL,EVALUATE=1 --cpus-per-task=8 \
#       experiments/long_range/slurm_tune.sh
#
# Every array task walks the schemes in order and runs trials of each until that scheme has
# the config's `trials` complete trials in the storage (counted over all tasks), so the tasks
# share each scheme's search and every scheme gets the same budget. --worker offsets each
# task's TPE seed (tasks seeded alike would draw the same random rates). A preempted task
# leaves its trial unfinished (not counted); rerun the array to top the searches up. SQLite
# suits a few tasks on a shared filesystem; for many, use a database server. All tasks must
# see the same out_dir (the trials' cells are cached there). Set TUNE_CONFIG / TUNE_OUT to use
# another config or output folder.
#SBATCH --job-name=rnndrop-tune
#SBATCH --cpus-per-task=1
#SBATCH --mem=4G
#SBATCH --time=04:00:00
#SBATCH --output=slurm-%A_%a.out
set -euo pipefail
config=${TUNE_CONFIG:-experiments/long_range/tune_selective_copy.yaml}
out=(${TUNE_OUT:+--out-dir "$TUNE_OUT"})
storage=(${TUNE_STORAGE:+--storage "$TUNE_STORAGE"})
export OMP_NUM_THREADS=1
if [ -n "${EVALUATE:-}" ]; then
    exec rnndrop tune --config "$config" "${out[@]}" "${storage[@]}" --phase evaluate \
        --workers "${SLURM_CPUS_PER_TASK:-1}" --no-progress
fi
: "${SLURM_ARRAY_TASK_ID:?run this as an array job (sbatch --array=0-N), or set EVALUATE=1}"
exec rnndrop tune --config "$config" "${out[@]}" "${storage[@]}" --phase search \
    --worker "$SLURM_ARRAY_TASK_ID" --no-progress
