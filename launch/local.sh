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
set -euo pipefail

if [[ $# -lt 1 || $1 == -h || $1 == --help ]]; then
  sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'
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
exec "${cmd[@]}" "$stage" "$@"
