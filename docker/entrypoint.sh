#!/usr/bin/env bash
# The image's entry point; it runs the same from a checkout, in a venv.
#
#   IMAGE [key=value | --config FILE ...]   train: accelerate launch launch/train.py with these arguments
#   IMAGE shard|generate|attributes|make-synthetic ARGS...   the other tools (launch/*.py)
#
# How `accelerate launch` is set up, from the environment (every variable is optional):
#   GPUS_PER_MACHINE   ranks on this machine (default: its GPU count; CPU_RANKS_PER_MACHINE without a GPU)
#   CPU_RANKS_PER_MACHINE  gloo ranks on a machine without a GPU (default 2)
#   CPU_THREADS_PER_RANK   torch threads per CPU rank (default: the trainer's train.cpu_threads_per_rank)
#   NUM_MACHINES       machines in the job (default: $PET_NNODES from Kubeflow, else 1)
#   MACHINE_RANK       this machine's index, 0 on the head (default: $PET_NODE_RANK, $NODE_RANK, then
#                      $RANK, which Training Operators before v1.7 set to the pod's index; else 0)
#   MAIN_PROCESS_IP    the head machine's address (default: $PET_MASTER_ADDR, $MASTER_ADDR)
#   MAIN_PROCESS_PORT  its rendezvous port (default: $PET_MASTER_PORT, $MASTER_PORT, else 29500)
#   RDZV_BACKEND       static (default: MACHINE_RANK decides the ranks) or c10d (the store does)
#   MIXED_PRECISION    bf16 (default), fp16 or no
#   ACCELERATE_CONFIG  a config file of your own instead (configs/accelerate/*.yaml are chosen otherwise)
#   PREEMPTED_EXIT_CODE  the exit code of a job stopped by a signal or by a lost machine, which resumes when
#                      restarted (default: 0 for a signal, 4 for a lost machine). Set 143 on Kubernetes.
#   DRY_RUN=1          print the command and exit
#
# Training runs under dcgan_dist.dist.supervise: SIGTERM/SIGINT go straight to the ranks, which checkpoint
# and exit; torchrun never sees them (it would SIGKILL the ranks 30 s later and exit 1). This script
# exec()s, so in a container that process is PID 1 and gets `docker stop`'s signal itself.
set -euo pipefail
cd "$(dirname "$(readlink -f "$0")")/.."

case "${1:-}" in
  shard|generate|attributes|make-synthetic)
    tool="launch/${1//-/_}.py"
    shift
    exec python "$tool" "$@" ;;
  train)
    shift ;;
esac

gpus="${GPUS_PER_MACHINE:-$(python -c 'import torch; print(torch.cuda.device_count())')}"
machines="${NUM_MACHINES:-${PET_NNODES:-1}}"
machines="${machines##*:}"              # Kubeflow's elastic form "MIN:MAX"
machine_rank="${MACHINE_RANK:-${PET_NODE_RANK:-${NODE_RANK:-${RANK:-0}}}}"
main_ip="${MAIN_PROCESS_IP:-${PET_MASTER_ADDR:-${MASTER_ADDR:-}}}"
port="${MAIN_PROCESS_PORT:-${PET_MASTER_PORT:-${MASTER_PORT:-29500}}}"

if [[ "$gpus" == 0 ]]; then
  config=configs/accelerate/cpu_2proc.yaml
  per_machine="${CPU_RANKS_PER_MACHINE:-2}"
elif [[ "$machines" -gt 1 && "${RDZV_BACKEND:-static}" == c10d ]]; then
  config=configs/accelerate/multi_node_c10d.yaml
  per_machine="$gpus"
elif [[ "$machines" -gt 1 ]]; then
  config=configs/accelerate/multi_node.yaml
  per_machine="$gpus"
elif [[ "$gpus" == 1 ]]; then
  config=configs/accelerate/single_gpu.yaml
  per_machine=1
else
  config=configs/accelerate/multi_gpu.yaml
  per_machine="$gpus"
fi
config="${ACCELERATE_CONFIG:-$config}"

cmd=(accelerate launch --config_file "$config" --num_processes "$((per_machine * machines))"
     --mixed_precision "${MIXED_PRECISION:-bf16}")
if [[ "$machines" -gt 1 ]]; then
  if [[ -z "$main_ip" ]]; then
    echo "error: NUM_MACHINES=$machines but no MAIN_PROCESS_IP: set it to the head machine's address" >&2
    exit 2
  fi
  cmd+=(--num_machines "$machines" --machine_rank "$machine_rank" --main_process_ip "$main_ip"
        --main_process_port "$port" --rdzv_backend "${RDZV_BACKEND:-static}")
  if [[ "${RDZV_BACKEND:-static}" == c10d ]]; then
    # Machine 0 hosts the c10d store. Left to guess, torchrun hosts it on any machine that finds the
    # head's name among its own, and on one host (containers, a test cluster) that is every machine.
    cmd+=(--rdzv_conf "is_host=$([[ "$machine_rank" == 0 ]] && echo 1 || echo 0)")
  fi
fi
cmd+=(launch/train.py "$@")
if [[ "$gpus" == 0 && -n "${CPU_THREADS_PER_RANK:-}" && " $* " != *" train.cpu_threads_per_rank="* ]]; then
  cmd+=("train.cpu_threads_per_rank=$CPU_THREADS_PER_RANK")
fi

printf -v shown '%q ' "${cmd[@]}"
echo "dcgan-dist: ${shown% }" >&2
if [[ -n "${DRY_RUN:-}" ]]; then
  exit 0
fi
exec python -m dcgan_dist.dist.supervise -- "${cmd[@]}"
