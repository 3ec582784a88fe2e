#!/bin/bash
# The body of slurm/*.sbatch (runs in the batch step): one `srun` of train.py with the job's overrides.
# The run dir is fixed by the job id, so a requeued job finds its hpc_ckpt_<n>.ckpt, its W&B run id and
# its data-stream position there, and resumes.
set -euo pipefail
cd "${LDM_ROOT:-$SLURM_SUBMIT_DIR}"
python=${LDM_PYTHON:-.venv/bin/python}
job=${SLURM_ARRAY_JOB_ID:-$SLURM_JOB_ID}${SLURM_ARRAY_TASK_ID:+_$SLURM_ARRAY_TASK_ID}
args=("$@")
case " $* " in
  *" hydra.run.dir="*) ;;
  *) args+=("hydra.run.dir=runs/\${name}/slurm-$job") ;;  # ${name}: Hydra resolves the run name
esac
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
echo "[$(date -Is)] job $job restart ${SLURM_RESTART_COUNT:-0}: $SLURM_NNODES node(s) ($SLURM_JOB_NODELIST)," \
  "${SLURM_NTASKS_PER_NODE:-?} task(s) per node: train.py ${args[*]}"
srun --kill-on-bad-exit=1 "$python" train.py "${args[@]}"
echo "[$(date -Is)] job $job restart ${SLURM_RESTART_COUNT:-0}: train.py exited"
