#!/usr/bin/env bash
# Run one lmforge stage on this machine with N processes.
#
#   launch/local.sh STAGE [--config FILE] [--section.key=value ...]
#
# STAGE is a stage script: pretrain/train.py, finetune/sft.py, finetune/reward.py,
# finetune/dpo.py, finetune/grpo.py or finetune/ppo.py. Every other argument goes to the stage
# unchanged. Run it from the repository root. This script only picks a launcher and its
# arguments; what a process does is decided by the stage and its config.
#
# Environment:
#   NPROC_PER_NODE  processes to start (default: every visible GPU, or 2 without CUDA)
#   LAUNCHER        deepspeed (default) or torchrun
#   MASTER_PORT     rendezvous port on 127.0.0.1 (default 29500; change it to run two at once)
#   PYTHON          interpreter (default: .venv/bin/python when present, else python3)
#
# Without CUDA it exports DS_ACCELERATOR=cpu and the stages train on CPU over gloo.
#
# Signals: SIGTERM and SIGUSR1 go to every rank itself (not to the launcher, which would tear
# the ranks down): they checkpoint at the next step boundary and exit, and so does this script,
# with 0 after a clean save. A first Ctrl-C (SIGINT) does the same; a second one interrupts the
# ranks at once, without a checkpoint. If this script is killed outright, the ranks notice and
# checkpoint and stop.
set -euo pipefail

if [[ $# -lt 1 || $1 == -h || $1 == --help ]]; then
  sed -n '2,24p' "$0" | sed 's/^# \{0,1\}//'
  exit 2
fi
stage=$1
shift
if [[ ! -f $stage ]]; then
  echo "error: stage script $stage not found (run from the repository root)" >&2
  exit 2
fi

if [[ -z ${PYTHON:-} ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
gpus=$("$PYTHON" -c 'import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)')
if [[ $gpus -eq 0 ]]; then
  export DS_ACCELERATOR=cpu
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
fi
nproc=${NPROC_PER_NODE:-$((gpus > 0 ? gpus : 2))}
port=${MASTER_PORT:-29500}

case ${LAUNCHER:-deepspeed} in
  deepspeed)
    cmd=("$PYTHON" -m deepspeed.launcher.runner "--num_gpus=$nproc" "--master_port=$port") ;;
  torchrun)
    cmd=("$PYTHON" -m torch.distributed.run --nnodes=1 "--nproc_per_node=$nproc" "--master_port=$port") ;;
  *)
    echo "error: LAUNCHER=${LAUNCHER} is not deepspeed or torchrun" >&2
    exit 2 ;;
esac
echo "launch: $nproc process(es) of $stage with ${LAUNCHER:-deepspeed}" \
  "($([[ $gpus -eq 0 ]] && echo CPU || echo "$gpus GPU(s)"))" >&2

# The launcher gives each rank its own RANK / LOCAL_RANK; stale ones would also hide which
# processes are ranks. The ranks watch this script's pid (lmforge.watchdog): if it dies, they
# checkpoint and stop instead of training on.
unset RANK WORLD_SIZE LOCAL_RANK LOCAL_WORLD_SIZE
export LMFORGE_LAUNCHER_PIDS="${LMFORGE_LAUNCHER_PIDS:+$LMFORGE_LAUNCHER_PIDS }$$"

launcher=
# Forward signal $1 to every rank. Before any rank exists (the launcher is still starting)
# there is nothing to save: the signal goes to the launcher's process group instead, and before
# the launcher exists, to this script itself, as if there were no trap.
# shellcheck disable=SC2317  # run by the traps
forward() {
  if [[ -z $launcher ]]; then
    trap - "$1"
    kill -s "$1" $$
  fi
  "$PYTHON" -m lmforge.watchdog forward "$1" "$launcher" ||
    kill -s "$1" -- "-$launcher" 2>/dev/null || true
}
interrupts=0
# shellcheck disable=SC2317  # run by the trap
on_int() {
  interrupts=$((interrupts + 1))
  if ((interrupts > 1)) || [[ -z $launcher ]]; then
    forward INT
  else
    echo "launch: interrupted; the ranks checkpoint at the next step boundary and stop" \
      "(Ctrl-C again to stop them at once)" >&2
    forward TERM
  fi
}
trap 'forward TERM' TERM
trap 'forward USR1' USR1
trap on_int INT

# Job control: the launcher gets a process group of its own, so a Ctrl-C or a signal to this
# script's group reaches this script only, which forwards it as above.
set -m
"${cmd[@]}" "$stage" "$@" &
launcher=$!
# A trapped signal interrupts `wait`: wait again until the launcher itself has exited, then
# once more for its exit status (bash keeps it).
status=0
while kill -0 "$launcher" 2>/dev/null; do
  wait "$launcher" || true
done
wait "$launcher" || status=$?
exit "$status"
