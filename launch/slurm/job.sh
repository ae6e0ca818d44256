#!/usr/bin/env bash
# The body of every lmforge SLURM job: pretrain.sbatch and finetune.sbatch set their defaults
# and exec this in the batch step. Not meant to be submitted itself.
#
# Design: srun starts one task per process on every node of the allocation (no deepspeed
# launcher, no hostfile, no ssh). SLURM owns every process, so signals, time limits and
# cancellations reach each rank, and a dead task ends the whole step (--kill-on-bad-exit).
# lmforge.distributed reads SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID as rank / world size /
# local rank; this script only adds the rendezvous: MASTER_ADDR = first node of the job,
# MASTER_PORT = derived from the job id (the same after a requeue, different for jobs that
# share a node).
#
# Preemption: the batch shell gets USR1 (#SBATCH --signal=B:USR1@SECS: before the time limit,
# or `scancel --batch --signal=USR1 JOBID` by hand) and forwards it to srun, which forwards it to
# every task. The stages checkpoint at the next step boundary and exit 0. Then, unless the run
# already reached train.steps, the job requeues itself (scontrol requeue) and the next start
# passes --resume=auto, so it continues from run_dir/latest. A SIGTERM (scancel, preemption by
# another job) is forwarded too (the ranks checkpoint and stop the same way; the job exits 0
# after their clean save) but never requeues: SLURM decides that itself. A signal that comes
# before srun has started is forwarded as soon as it has.
#
# Environment (all optional except STAGE, which the sbatch scripts set):
#   STAGE           stage script, e.g. pretrain/train.py or finetune/sft.py
#   CONFIG          YAML run config passed as --config (empty: the stage's defaults)
#   OVERRIDES       whitespace-separated --section.key=value overrides (no spaces in a value);
#                   arguments after the sbatch script name are appended after them
#   NPROC_PER_NODE  processes per node (default: the allocation's --ntasks-per-node)
#   PYTHON          interpreter (default: .venv/bin/python when present, else python3)
#   MASTER_ADDR     rendezvous host (default: first node of the job)
#   MASTER_PORT     rendezvous port (default: 20000 + job id mod 20000)
set -euo pipefail

preempted=0
terminated=0
srun_pid=
# shellcheck disable=SC2317  # run by the trap
on_usr1() {
  preempted=1
  echo "lmforge job $SLURM_JOB_ID: USR1, asking every rank to checkpoint and stop"
  [[ -n $srun_pid ]] && kill -USR1 "$srun_pid" 2>/dev/null
  return 0
}
# shellcheck disable=SC2317  # run by the trap
on_term() {
  terminated=1
  [[ -n $srun_pid ]] && kill -TERM "$srun_pid" 2>/dev/null
  return 0
}
trap on_usr1 USR1 # first thing: a warning that comes early is not lost
trap on_term TERM

: "${STAGE:?set STAGE to a stage script, e.g. pretrain/train.py}"
if [[ -z ${PYTHON:-} ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi

args=()
[[ -n ${CONFIG:-} ]] && args+=(--config "$CONFIG")
read -r -a overrides <<<"${OVERRIDES:-}"
args+=("${overrides[@]}" "$@")
restarts=${SLURM_RESTART_COUNT:-0}
if ((restarts > 0)); then
  args+=(--resume=auto) # last override wins: continue from run_dir/latest
fi

# Rank variables inherited from the submitting shell would win over SLURM's: drop them.
unset RANK WORLD_SIZE LOCAL_RANK LOCAL_WORLD_SIZE
first_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export MASTER_ADDR=${MASTER_ADDR:-$first_node}
export MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}

step=(srun --kill-on-bad-exit=1 "--cpus-per-task=${SLURM_CPUS_PER_TASK:-1}")
if [[ -n ${NPROC_PER_NODE:-} ]]; then
  step+=("--ntasks-per-node=$NPROC_PER_NODE" "--ntasks=$((SLURM_JOB_NUM_NODES * NPROC_PER_NODE))")
fi

echo "lmforge job $SLURM_JOB_ID (restart $restarts): $STAGE on $SLURM_JOB_NUM_NODES node(s)," \
  "rendezvous $MASTER_ADDR:$MASTER_PORT"

"${step[@]}" "$PYTHON" "$STAGE" "${args[@]}" &
srun_pid=$!
if ((preempted)); then # the warning came before srun started
  kill -USR1 "$srun_pid"
fi
if ((terminated)); then
  kill -TERM "$srun_pid"
fi
# A trapped signal interrupts `wait`; keep waiting until srun itself has exited, then once more
# for its exit status (bash keeps it), which a trap's interruption would have replaced.
while kill -0 "$srun_pid" 2>/dev/null; do
  wait "$srun_pid" || true
done
status=0
wait "$srun_pid" || status=$?

# Has the run reached train.steps? Reads the resolved config (--dry-run) and run_dir/latest.
run_finished() {
  local resolved
  resolved=$("$PYTHON" "$STAGE" "${args[@]}" --dry-run) || return 1
  LMFORGE_RESOLVED=$resolved "$PYTHON" - <<'EOF'
import os
import sys
from pathlib import Path

import yaml

from lmforge.checkpoint import read_json, resolve_checkpoint

cfg = yaml.safe_load(os.environ["LMFORGE_RESOLVED"])
run_dir, steps = Path(cfg["run_dir"]), int(cfg["train"]["steps"])
step = 0
if (run_dir / "latest").exists():
    step = int(read_json(resolve_checkpoint(run_dir) / "lmforge.json").get("step", 0))
print(f"lmforge: {run_dir} is at step {step} of {steps}")
sys.exit(0 if step >= steps else 1)
EOF
}

if ((preempted)); then
  if run_finished; then
    echo "lmforge job $SLURM_JOB_ID: the run is complete; not requeueing"
    exit 0
  fi
  echo "lmforge job $SLURM_JOB_ID: stage exited with $status; requeueing to resume"
  scontrol requeue "$SLURM_JOB_ID"
  exit 0
fi
exit "$status"
