#!/usr/bin/env bash
# Shared launcher of the SLURM jobs scripts/slurm/tsp.sbatch (LAYOUT=tsp) and
# scripts/slurm/tp_sp.sbatch (LAYOUT=tp_sp, Megatron's TP + sequence parallelism). It runs in the
# batch step: it takes the master address from the allocation, then `srun` starts one torchrun
# per node (--nnodes $SLURM_NNODES --node-rank $SLURM_NODEID), and torchrun starts NPROC_PER_NODE
# processes there. The TSP (or TP) group of D ranks lies inside one node; data parallelism spans
# the nodes. Arguments given to the job script are appended to the program's arguments.
#
# Environment (every one has a default):
#   LAYOUT          tsp | tp_sp                                   (set by the job script)
#   TSP_ENTRY       the program each process runs                 (default megatron-lm)
#     megatron-lm:  python -m megatron_tsp.cli run $MEGATRON_LM/pretrain_gpt.py --tsp-size D
#                   (tp_sp: --tsp-size 1 --tensor-model-parallel-size D --sequence-parallel)
#                   [--tsp-recipe $RECIPE] --save $CKPT_DIR --save-interval $SAVE_INTERVAL
#                   [--load $CKPT_DIR] $EXTRA_ARGS "$@"
#     driver:       python -m megatron_tsp.cli train [$RECIPE] parallel.layout=$LAYOUT parallel.size=D
#                   train.save_dir=$CKPT_DIR train.save_interval=$SAVE_INTERVAL [train.resume_if_present=true]
#                   $EXTRA_ARGS "$@"
#   MEGATRON_LM     Megatron-LM checkout holding pretrain_gpt.py  (default $HOME/Megatron-LM)
#   RECIPE          recipe file, relative paths taken from TSP_REPO; empty for none. megatron-lm:
#                   a Megatron-flags recipe for --tsp-recipe (default: none, give the flags in
#                   EXTRA_ARGS); driver: a configs/*.yaml recipe (default configs/7b_16k.yaml)
#   EXTRA_ARGS      more program arguments, split on spaces (Megatron flags, or section.key=value
#                   recipe overrides for the driver)                      (default empty)
#   NPROC_PER_NODE  processes per node, one per GPU               (default $SLURM_GPUS_ON_NODE)
#   TSP_SIZE        D, the TSP (tp_sp: TP) degree; must divide NPROC_PER_NODE
#                                                                  (default NPROC_PER_NODE)
#   CPUS_PER_NODE   CPUs given to each node's torchrun            (default $SLURM_CPUS_ON_NODE)
#   MASTER_ADDR     rendezvous host  (default: the address SLURM has for the allocation's first node,
#                   its NodeAddr from `scontrol show node`, which is the node's name unless set)
#   MASTER_PORT     rendezvous port                               (default 20000 + job id % 10000)
#   LOG_DIR         the job's log is $LOG_DIR/<job name>-<job id>.out  (default $SLURM_SUBMIT_DIR/logs)
#   CKPT_DIR        checkpoints              (default $SLURM_SUBMIT_DIR/checkpoints/<job name>)
#   SAVE_INTERVAL   save every N steps (and at the end)           (default 1000)
#   RESUME          1: continue from the latest checkpoint in CKPT_DIR if there is one (requeue-safe);
#                   0: start fresh                                (default 1)
#   PYTHON          interpreter (with torch, megatron-core, megatron_tsp)   (default python3)
#   TSP_SETUP       a file sourced first (modules, venv); srun hands its environment to every node
#                                                                  (default none)
#   TSP_REPO        this checkout, put on PYTHONPATH (default: the submit directory, in the job script)
#   REQUEUE         1: on SIGUSR1 (the job scripts' --signal=B:USR1@300, 5 minutes before the time
#                   limit) the workers save and stop, then the job requeues itself and resumes from
#                   that checkpoint in its next allocation; 0: save, stop and end  (default 1)
#   GLOO_SOCKET_IFNAME, NCCL_SOCKET_IFNAME  the network interface between nodes, passed on (set them
#                   where the node's hostname resolves to an address the other nodes cannot reach)
#   DRY_RUN         1: print the srun command line and exit       (default 0)
#   NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 (NVLink multicast off),
#   CUDA_DEVICE_MAX_CONNECTIONS=1, NCCL_DEBUG=WARN, OMP_NUM_THREADS=1 are exported unless already set;
#   other NCCL_* variables (NCCL_SOCKET_IFNAME, NCCL_IB_HCA, ...) pass through to every process.
set -euo pipefail

die() { echo "launch.sh: error: $*" >&2; exit 2; }

: "${SLURM_JOB_ID:?launch.sh runs inside a SLURM job: submit scripts/slurm/tsp.sbatch or tp_sp.sbatch with sbatch}"
: "${SLURM_JOB_NAME:=job}" "${SLURM_NNODES:=1}" "${SLURM_SUBMIT_DIR:=$PWD}"
TSP_REPO=${TSP_REPO:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}
LAYOUT=${LAYOUT:-tsp}
TSP_ENTRY=${TSP_ENTRY:-megatron-lm}
MEGATRON_LM=${MEGATRON_LM:-${HOME:-}/Megatron-LM}
EXTRA_ARGS=${EXTRA_ARGS:-}
NPROC_PER_NODE=${NPROC_PER_NODE:-${SLURM_GPUS_ON_NODE:-}}
TSP_SIZE=${TSP_SIZE:-$NPROC_PER_NODE}
CPUS_PER_NODE=${CPUS_PER_NODE:-${SLURM_CPUS_ON_NODE:-1}}
MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 10000))}
LOG_DIR=${LOG_DIR:-$SLURM_SUBMIT_DIR/logs}
CKPT_DIR=${CKPT_DIR:-$SLURM_SUBMIT_DIR/checkpoints/$SLURM_JOB_NAME}
SAVE_INTERVAL=${SAVE_INTERVAL:-1000}
RESUME=${RESUME:-1}
PYTHON=${PYTHON:-python3}
DRY_RUN=${DRY_RUN:-0}
REQUEUE=${REQUEUE:-1}

if [[ -n ${TSP_SETUP:-} ]]; then
  # shellcheck disable=SC1090
  source "$TSP_SETUP"
fi

[[ $LAYOUT == tsp || $LAYOUT == tp_sp ]] || die "LAYOUT=$LAYOUT: expected tsp or tp_sp"
[[ -n $NPROC_PER_NODE ]] \
  || die "no GPUs in this allocation (SLURM_GPUS_ON_NODE is unset): request them (--gpus-per-node) or set NPROC_PER_NODE"
[[ $NPROC_PER_NODE =~ ^[1-9][0-9]*$ ]] || die "NPROC_PER_NODE=$NPROC_PER_NODE: expected a positive integer"
[[ $TSP_SIZE =~ ^[1-9][0-9]*$ ]] || die "TSP_SIZE=$TSP_SIZE: expected a positive integer"
(( NPROC_PER_NODE % TSP_SIZE == 0 )) \
  || die "TSP_SIZE=$TSP_SIZE must divide the $NPROC_PER_NODE processes (GPUs) per node: the $LAYOUT group stays inside a node"
[[ $SAVE_INTERVAL =~ ^[1-9][0-9]*$ ]] || die "SAVE_INTERVAL=$SAVE_INTERVAL: expected a positive integer"
[[ $RESUME == 0 || $RESUME == 1 ]] || die "RESUME=$RESUME: expected 0 or 1"
[[ $REQUEUE == 0 || $REQUEUE == 1 ]] || die "REQUEUE=$REQUEUE: expected 0 or 1"
case $TSP_ENTRY in
  megatron-lm) RECIPE=${RECIPE-} ;;
  driver) RECIPE=${RECIPE-configs/7b_16k.yaml} ;;
  *) die "TSP_ENTRY=$TSP_ENTRY: expected megatron-lm or driver" ;;
esac
if [[ -n $RECIPE ]]; then
  [[ $RECIPE == /* ]] || RECIPE=$TSP_REPO/$RECIPE
  [[ -f $RECIPE ]] || die "RECIPE=$RECIPE: no such file"
fi

read -r -a extra <<<"$EXTRA_ARGS"   # split on spaces, no globbing
extra+=("$@")
case $TSP_ENTRY in
  megatron-lm)
    [[ -f $MEGATRON_LM/pretrain_gpt.py ]] \
      || die "MEGATRON_LM=$MEGATRON_LM has no pretrain_gpt.py: point MEGATRON_LM at a Megatron-LM checkout"
    if [[ $LAYOUT == tsp ]]; then layout_args=(--tsp-size "$TSP_SIZE")
    else layout_args=(--tsp-size 1 --tensor-model-parallel-size "$TSP_SIZE" --sequence-parallel); fi
    program=(-m megatron_tsp.cli run "$MEGATRON_LM/pretrain_gpt.py" "${layout_args[@]}")
    [[ -z $RECIPE ]] || program+=(--tsp-recipe "$RECIPE")
    program+=(--save "$CKPT_DIR" --save-interval "$SAVE_INTERVAL")
    [[ $RESUME == 0 ]] || program+=(--load "$CKPT_DIR")
    ;;
  driver)
    program=(-m megatron_tsp.cli train)
    [[ -z $RECIPE ]] || program+=("$RECIPE")
    program+=("parallel.layout=$LAYOUT" "parallel.size=$TSP_SIZE" "train.save_dir=$CKPT_DIR"
              "train.save_interval=$SAVE_INTERVAL")
    [[ $RESUME == 0 ]] || program+=(train.resume_if_present=true)  # requeue-safe: the first allocation starts at step 1
    ;;
esac
program+=("${extra[@]}")

if [[ -z ${MASTER_ADDR:-} ]]; then
  # The first node's address as SLURM reaches it (NodeAddr; the same as its name unless set).
  # (sed -n 1p, not head: head's early exit can fail the pipe with SIGPIPE under pipefail)
  first_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)
  MASTER_ADDR=$(scontrol show node "$first_node" 2>/dev/null | sed -n 's/.* NodeAddr=\([^ ]*\).*/\1/p' | sed -n 1p) || true
  MASTER_ADDR=${MASTER_ADDR:-$first_node}
fi
export MASTER_ADDR MASTER_PORT
export PYTHONPATH="$TSP_REPO${PYTHONPATH:+:$PYTHONPATH}"
export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0} TORCH_SYMM_MEM_DISABLE_MULTICAST=${TORCH_SYMM_MEM_DISABLE_MULTICAST:-1}
export NVSHMEM_DISABLE_NVLS=${NVSHMEM_DISABLE_NVLS:-1} CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
export NCCL_DEBUG=${NCCL_DEBUG:-WARN} OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

# One task per node; each runs torchrun with its own node rank ($SLURM_NODEID is per task).
# torchrun ignores SIGUSR1 (by default it would end it), should `--signal=USR1` (without B:)
# send it to every process of the step: the signal is for the workers (training/signals.py). --kill-on-bad-exit: a worker that fails on
# one node (its peer died, or a collective timed out) ends the tasks on every node.
# shellcheck disable=SC2016  # $1, $SLURM_NODEID and $@ expand in each task's shell
srun_cmd=(srun --nodes "$SLURM_NNODES" --ntasks "$SLURM_NNODES" --ntasks-per-node 1
          --cpus-per-task "$CPUS_PER_NODE" --kill-on-bad-exit=1 --label
          bash -c 'trap "" USR1; exec "$1" -m torch.distributed.run --node-rank "$SLURM_NODEID" "${@:2}"' torchrun "$PYTHON"
          --nnodes "$SLURM_NNODES" --nproc-per-node "$NPROC_PER_NODE"
          --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT"
          "${program[@]}")
if [[ $DRY_RUN == 1 ]]; then
  printf '%q ' "${srun_cmd[@]}"; echo
  exit 0
fi

mkdir -p "$LOG_DIR" "$CKPT_DIR"
log=$LOG_DIR/$SLURM_JOB_NAME-$SLURM_JOB_ID.out
echo "launch.sh: log $log"
exec >>"$log" 2>&1
echo "job $SLURM_JOB_ID ($SLURM_JOB_NAME) on $SLURM_NNODES node(s): $SLURM_JOB_NODELIST, $(date -Is)"
echo "layout $LAYOUT, size $TSP_SIZE, $NPROC_PER_NODE processes per node, entry $TSP_ENTRY, master $MASTER_ADDR:$MASTER_PORT"
echo "checkpoints $CKPT_DIR"
printf '%q ' "${srun_cmd[@]}"; echo

# The time limit is near (sbatch --signal=B:USR1@SECONDS, sent to this batch shell only): pass
# SIGUSR1 on to the workers, and to them only: an overlapping step on every node signals the
# children of this job's torchrun on that node (its workers). Not `scancel --signal`: that signals every
# process of the step, the workers' own helpers too (the checkpoint writer's multiprocessing
# manager), which SIGUSR1 ends. The workers finish their step, save a checkpoint and exit 0;
# then the job requeues itself and resumes from it. A signal that reaches the workers before they
# install their handler (the first seconds of python's start) is ignored; the time limit's
# SIGTERM then still saves (train.save_on_signal).
# shellcheck disable=SC2016  # expanded on each node
signal_workers=(srun --overlap --nodes "$SLURM_NNODES" --ntasks "$SLURM_NNODES" --ntasks-per-node 1 --label
                bash -c 'for tr in $(pgrep -f "[t]orch.distributed.run --node-rank"); do
                           [[ $(cat "/proc/$tr/comm" 2>/dev/null) != srun ]] \
                             && grep -qzx "SLURM_JOB_ID=$SLURM_JOB_ID" "/proc/$tr/environ" 2>/dev/null \
                             && grep -qzx "SLURM_NODEID=$SLURM_NODEID" "/proc/$tr/environ" 2>/dev/null \
                             && pkill -USR1 -P "$tr" && echo "SIGUSR1 to the workers of torchrun $tr on $(hostname)"
                         done; true')
stop_requested=0
on_usr1() {
  stop_requested=1
  local then=""
  ((REQUEUE)) && then=", then job $SLURM_JOB_ID requeues itself"
  echo "launch.sh: SIGUSR1 at $(date -Is): the time limit is near; the workers save and stop$then"
  "${signal_workers[@]}" || echo "launch.sh: passing SIGUSR1 on to the workers failed"
}
trap on_usr1 USR1
"${srun_cmd[@]}" &
srun_pid=$!
while true; do
  rc=0
  wait "$srun_pid" || rc=$?
  kill -0 "$srun_pid" 2>/dev/null || break   # else wait was cut short by the signal
done
trap - USR1
if (( rc != 0 )); then
  echo "launch.sh: srun exited $rc at $(date -Is): a worker failed or was killed (torchrun's report above names" \
       "its rank and host); resubmit to resume from the latest checkpoint in $CKPT_DIR"
  exit "$rc"
fi
if (( stop_requested && REQUEUE )); then
  echo "launch.sh: requeueing job $SLURM_JOB_ID at $(date -Is) (restart $((${SLURM_RESTART_COUNT:-0} + 1)))"
  scontrol requeue "$SLURM_JOB_ID"
fi
