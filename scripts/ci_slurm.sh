#!/usr/bin/env bash
# A throw-away one-node SLURM cluster on this machine, for tests/slurm (CI: Debian, root, no GPUs).
#   bash scripts/ci_slurm.sh up DIR    start munged, slurmctld and slurmd with their key, slurm.conf,
#                                      state, logs and sockets under DIR (new or empty; every
#                                      directory above it executable by all, as /tmp is) and wait
#                                      until the node is idle; clients then need SLURM_CONF=DIR/slurm.conf.
#                                      Missing slurm-wlm / munge are apt-get installed (as root)
#                                      only when TSP_SLURM_INSTALL=1 (.ci/run sets it).
#   bash scripts/ci_slurm.sh down DIR  cancel the jobs, stop those three daemons, remove DIR.
# The node is this host with nproc CPUs; no cgroups (proctrack/linuxproc, task/none), no
# accounting, its own ports (SLURMCTLD_PORT, SLURMD_PORT; default: free ones), so a system SLURM
# is left alone. `up` exits 77 with "SKIP: <reason>" on stderr when SLURM cannot run here: not
# installed (and no TSP_SLURM_INSTALL=1, root or apt-get), the install failed, or a daemon did not
# start (its log follows); it stops what it started first.
set -euo pipefail

skip() { echo "SKIP: $*" >&2; stop_daemons; exit 77; }
die() { echo "ci_slurm.sh: error: $*" >&2; exit 2; }

stop_daemons() {
  local name pid
  for name in slurmd slurmctld munged; do
    [[ -f $dir/run/$name.pid ]] || continue
    pid=$(cat "$dir/run/$name.pid")
    kill "$pid" 2>/dev/null || continue
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    kill -9 "$pid" 2>/dev/null || true
  done
}

log_tail() { for f in "$@"; do [[ -f $f ]] && { echo "--- $f"; tail -n 15 "$f"; }; done; true; }

free_port() { "${PYTHON:-python3}" -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])'; }

install_slurm() {
  local missing=() cmd
  for cmd in munged munge slurmctld slurmd sbatch squeue scontrol; do
    command -v "$cmd" >/dev/null || missing+=("$cmd")
  done
  [[ ${#missing[@]} -eq 0 ]] && return 0
  [[ ${TSP_SLURM_INSTALL:-0} == 1 ]] \
    || skip "SLURM is not installed (no ${missing[*]}); TSP_SLURM_INSTALL=1 lets this script apt-get install slurm-wlm munge"
  [[ $EUID -eq 0 ]] || skip "SLURM is not installed (no ${missing[*]}) and installing it needs root"
  command -v apt-get >/dev/null || skip "SLURM is not installed (no ${missing[*]}) and there is no apt-get"
  echo "ci_slurm.sh: apt-get install slurm-wlm munge (missing: ${missing[*]})"
  export DEBIAN_FRONTEND=noninteractive
  if ! { timeout 300 apt-get update -q && timeout 600 apt-get install -y -q --no-install-recommends slurm-wlm munge; } \
        >"$dir/apt.log" 2>&1; then
    skip "apt-get install slurm-wlm munge failed: $(tail -n 3 "$dir/apt.log" | tr '\n' ' ')"
  fi
}

up() {
  [[ ! -e $dir || -z $(ls -A "$dir") ]] || die "$dir is not empty: give a new or empty directory"
  mkdir -p "$dir"/{key,run,log,state,spool}
  chmod 755 "$dir" "$dir/run"   # munged wants every directory above its socket executable by all
  chmod 700 "$dir/key"
  install_slurm
  [[ $EUID -eq 0 ]] || skip "slurmd runs jobs as their user and must run as root (this is uid $EUID)"

  dd if=/dev/urandom of="$dir/key/munge.key" bs=1024 count=1 status=none
  chmod 400 "$dir/key/munge.key"
  munged --key-file="$dir/key/munge.key" --socket="$dir/run/munge.sock" --pid-file="$dir/run/munged.pid" \
         --log-file="$dir/log/munged.log" --seed-file="$dir/key/munged.seed" \
    || skip "munged did not start: $(log_tail "$dir/log/munged.log")"
  munge -n -S "$dir/run/munge.sock" | unmunge -S "$dir/run/munge.sock" >/dev/null \
    || skip "munge does not round-trip a credential: $(log_tail "$dir/log/munged.log")"

  local host ctld_port slurmd_port
  host=$(hostname -s)
  # the node's name is the jobs' MASTER_ADDR: use localhost where this host's name does not resolve
  getent hosts "$host" >/dev/null || host=localhost
  ctld_port=${SLURMCTLD_PORT:-$(free_port)}
  slurmd_port=${SLURMD_PORT:-$(free_port)}
  cat >"$dir/slurm.conf" <<EOF
# written by megatron-tsp scripts/ci_slurm.sh
ClusterName=tspci
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$dir/run/munge.sock
CredType=cred/munge
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool/slurmd-%n
SlurmctldPidFile=$dir/run/slurmctld.pid
SlurmdPidFile=$dir/run/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
MailProg=/bin/true
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
MinJobAge=600
NodeName=$host NodeAddr=127.0.0.1 CPUs=$(nproc) State=UNKNOWN
PartitionName=ci Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
  export SLURM_CONF=$dir/slurm.conf
  slurmctld -f "$SLURM_CONF" || skip "slurmctld did not start: $(log_tail "$dir/log/slurmctld.log")"
  slurmd -f "$SLURM_CONF" -N "$host" || skip "slurmd did not start: $(log_tail "$dir/log/slurmd.log")"
  local state=""
  for _ in $(seq 60); do
    state=$(sinfo -h -o %T 2>/dev/null || true)
    [[ $state == idle ]] && break
    sleep 0.5
  done
  [[ $state == idle ]] || skip "the node did not become idle (state '${state}'): $(log_tail "$dir/log/slurmctld.log" "$dir/log/slurmd.log")"
  echo "ci_slurm.sh: node $host idle ($(nproc) CPUs, slurmctld port $ctld_port); SLURM_CONF=$SLURM_CONF"
}

down() {
  [[ -d $dir ]] || return 0
  grep -q 'written by megatron-tsp scripts/ci_slurm.sh' "$dir/slurm.conf" 2>/dev/null \
    || [[ ! -f $dir/slurm.conf ]] || die "$dir/slurm.conf was not written by this script; not removing $dir"
  if [[ -f $dir/slurm.conf && -f $dir/run/slurmctld.pid ]] && kill -0 "$(cat "$dir/run/slurmctld.pid")" 2>/dev/null; then
    export SLURM_CONF=$dir/slurm.conf
    local jobs
    jobs=$(squeue -h -o %i 2>/dev/null || true)
    if [[ -n $jobs ]]; then
      # shellcheck disable=SC2086
      scancel $jobs || true
      for _ in $(seq 60); do [[ -z $(squeue -h -o %i 2>/dev/null) ]] && break; sleep 0.5; done
    fi
  fi
  stop_daemons
  rm -rf "$dir"
}

[[ $# -eq 2 && ($1 == up || $1 == down) ]] || die "usage: bash scripts/ci_slurm.sh up|down DIR"
dir=$(realpath -m "$2")
"$1"
