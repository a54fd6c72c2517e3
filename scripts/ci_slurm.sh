#!/usr/bin/env bash
# A throw-away SLURM cluster on this machine, for tests/slurm (CI: Debian, root, no GPUs).
#   bash scripts/ci_slurm.sh up DIR [NODES]
#       start munged, slurmctld and NODES slurmd (1 or 2; default 1) with their key, slurm.conf,
#       state, logs and sockets under DIR (new or empty; every directory above it executable by
#       all, as /tmp is) and wait until the nodes are idle; clients then need
#       SLURM_CONF=DIR/slurm.conf. Missing slurm-wlm / munge / iproute2 are apt-get installed (as
#       root) only when TSP_SLURM_INSTALL=1 (.ci/run sets it).
#   bash scripts/ci_slurm.sh down DIR  cancel the jobs, stop the daemons, remove the namespaces and DIR.
# One node: this host with nproc CPUs, slurmd on 127.0.0.1. Two nodes: each slurmd runs in its own
# network and UTS namespace (`ip netns`; hostname tspn1 / tspn2; address 10.233.X.11 / .12 on
# the interface tsp0, a veth on a bridge that also carries slurmctld's 10.233.X.1), so each is a
# separate host to SLURM, to torchrun and to gloo (GLOO_SOCKET_IFNAME=tsp0): a master address or
# interface that only works on one host shows up. Where namespaces cannot be made (no
# CAP_NET_ADMIN), both slurmd run on 127.0.0.1 with a port each (Debian's slurmd supports
# several per host: `slurmd -N tspn1`, `-N tspn2`) and gloo uses lo; TSP_SLURM_NETNS=0 asks for that.
# No cgroups (proctrack/linuxproc, task/none), no accounting, its own ports (SLURMCTLD_PORT,
# SLURMD_PORT; default: free ones), so a system SLURM is left alone. DIR/nodes.env lists the
# nodes (NODE_<k>=name, NODE_<k>_NS=namespace, NODE_<k>_ADDR=address). `up` exits 77 with
# "SKIP: <reason>" on stderr when SLURM cannot run here: not installed (and no
# TSP_SLURM_INSTALL=1, root or apt-get), the install failed, or a daemon did not start (its log
# follows); it stops what it started first.
set -euo pipefail

skip() { echo "SKIP: $*" >&2; stop_daemons; remove_namespaces; exit 77; }
die() { echo "ci_slurm.sh: error: $*" >&2; exit 2; }

stop_daemons() {
  local f pid
  for f in "$dir"/run/slurmd*.pid "$dir/run/slurmctld.pid" "$dir/run/munged.pid"; do
    [[ -f $f ]] || continue
    pid=$(cat "$f")
    kill "$pid" 2>/dev/null || continue
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    kill -9 "$pid" 2>/dev/null || true
  done
}

# The two-node network: a bridge with slurmctld's address, one namespace per node on a veth.
# DIR/run/net lists what was made (removed by `down`, and by `up` when it gives up).
remove_namespaces() {
  [[ -f $dir/run/net ]] || return 0
  local kind name
  while read -r kind name; do
    case $kind in
      ns) ip netns pids "$name" 2>/dev/null | xargs -r kill -9 2>/dev/null || true
          ip netns del "$name" 2>/dev/null || true ;;
      link) ip link del "$name" 2>/dev/null || true ;;
    esac
  done < <(tac "$dir/run/net")
  rm -f "$dir/run/net"
}

make_network() {  # make_network ID SUBNET(10.233.X): bridge SUBNET.1, nodes SUBNET.11, .12; 1 (and why in DIR/log/net.log) if it cannot
  local id=$1 net=$2 k ns br=tspbr$1
  command -v ip >/dev/null || { echo "no iproute2 'ip' command" >"$dir/log/net.log"; return 1; }
  ip link add "$br" type bridge 2>"$dir/log/net.log" || return 1
  echo "link $br" >>"$dir/run/net"
  ip addr add "$net.1/24" dev "$br" 2>"$dir/log/net.log" && ip link set "$br" up || return 1
  for k in 1 2; do
    ns=tspn$k-$id
    ip netns add "$ns" 2>"$dir/log/net.log" || return 1
    echo "ns $ns" >>"$dir/run/net"
    ip link add "tspv$id$k" type veth peer name tsp0 netns "$ns" 2>"$dir/log/net.log" || return 1
    echo "link tspv$id$k" >>"$dir/run/net"
    { ip link set "tspv$id$k" master "$br" up && ip -n "$ns" addr add "$net.1$k/24" dev tsp0 \
        && ip -n "$ns" link set tsp0 up && ip -n "$ns" link set lo up; } 2>"$dir/log/net.log" || return 1
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
    || skip "SLURM is not installed (no ${missing[*]}); TSP_SLURM_INSTALL=1 lets this script apt-get install slurm-wlm munge iproute2"
  [[ $EUID -eq 0 ]] || skip "SLURM is not installed (no ${missing[*]}) and installing it needs root"
  command -v apt-get >/dev/null || skip "SLURM is not installed (no ${missing[*]}) and there is no apt-get"
  echo "ci_slurm.sh: apt-get install slurm-wlm munge iproute2 (missing: ${missing[*]})"
  export DEBIAN_FRONTEND=noninteractive
  if ! { timeout 300 apt-get update -q && timeout 600 apt-get install -y -q --no-install-recommends slurm-wlm munge iproute2; } \
        >"$dir/apt.log" 2>&1; then
    skip "apt-get install slurm-wlm munge iproute2 failed: $(tail -n 3 "$dir/apt.log" | tr '\n' ' ')"
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

  local host ctld_port slurmd_port ctld_addr nodes_conf names k id net=""
  host=$(hostname -s)
  # the node's name is the jobs' MASTER_ADDR: use localhost where this host's name does not resolve
  getent hosts "$host" >/dev/null || host=localhost
  ctld_port=${SLURMCTLD_PORT:-$(free_port)}
  slurmd_port=${SLURMD_PORT:-$(free_port)}
  if [[ $nodes == 1 ]]; then
    ctld_addr=127.0.0.1 names=$host
    nodes_conf="NodeName=$host NodeAddr=127.0.0.1 CPUs=$(nproc) State=UNKNOWN"
    echo "NODE_1=$host NODE_1_NS= NODE_1_ADDR=127.0.0.1" >"$dir/nodes.env"
  else
    # a short id for the interface names (15 characters at most) and a free 10.233.X.0/24
    id=$(printf '%04x' $(( $(cksum <<<"$dir" | cut -d' ' -f1) % 65536 )))
    for X in $(shuf -i 1-254); do ip -o addr 2>/dev/null | grep -q " 10\.233\.$X\." || { net=10.233.$X; break; }; done
    names=tspn[1-2] nodes_conf=""
    : >"$dir/nodes.env"
    echo "TSP_SLURM_NETNS=0" >"$dir/log/net.log"
    if [[ -n $net && ${TSP_SLURM_NETNS:-1} == 1 ]] && make_network "$id" "$net"; then
      ctld_addr=$net.1
      for k in 1 2; do
        nodes_conf+="NodeName=tspn$k NodeHostname=tspn$k NodeAddr=$net.1$k CPUs=$(nproc) State=UNKNOWN"$'\n'
        echo "NODE_$k=tspn$k NODE_${k}_NS=tspn$k-$id NODE_${k}_ADDR=$net.1$k" >>"$dir/nodes.env"
      done
    else
      # No network namespaces here (no CAP_NET_ADMIN, no iproute2): both slurmd on this host's
      # loopback, each on its own port (the multiple-slurmd support of Debian's build).
      echo "ci_slurm.sh: no network namespaces ($(tr '\n' ' ' <"$dir/log/net.log")): both nodes on 127.0.0.1, one slurmd port each"
      remove_namespaces
      id="" ctld_addr=127.0.0.1
      for k in 1 2; do
        nodes_conf+="NodeName=tspn$k NodeHostname=$host NodeAddr=127.0.0.1 Port=$(free_port) CPUs=$(nproc) State=UNKNOWN"$'\n'
        echo "NODE_$k=tspn$k NODE_${k}_NS= NODE_${k}_ADDR=127.0.0.1" >>"$dir/nodes.env"
      done
    fi
  fi
  cat >"$dir/slurm.conf" <<EOF
# written by megatron-tsp scripts/ci_slurm.sh
ClusterName=tspci
SlurmctldHost=$host($ctld_addr)
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# cred_expire (default 120 s) is also how long a requeued job waits before it may start again: the
# wait keeps a relaunch of the same job id clear of its revoked credential (slurm.conf(5)); 30 s keeps
# the requeue test short without racing that revocation
AuthInfo=socket=$dir/run/munge.sock,cred_expire=30
CredType=cred/munge
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool/slurmd-%n
SlurmctldPidFile=$dir/run/slurmctld.pid
SlurmdPidFile=$dir/run/slurmd-%n.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd-%n.log
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
# a job's processes get SIGTERM, then SIGKILL this many seconds later (time to save a checkpoint)
KillWait=30
$nodes_conf
PartitionName=ci Nodes=$names Default=YES MaxTime=INFINITE State=UP
EOF
  export SLURM_CONF=$dir/slurm.conf
  slurmctld -f "$SLURM_CONF" || skip "slurmctld did not start: $(log_tail "$dir/log/slurmctld.log")"
  if [[ $nodes == 1 ]]; then
    slurmd -f "$SLURM_CONF" -N "$host" || skip "slurmd did not start: $(log_tail "$dir"/log/slurmd-*.log)"
  elif [[ -z $id ]]; then
    for k in 1 2; do
      mkdir -p "$dir/spool/slurmd-tspn$k"
      slurmd -f "$SLURM_CONF" -N "tspn$k" || skip "slurmd of node tspn$k did not start: $(log_tail "$dir/log/slurmd-tspn$k.log")"
    done
  else
    for k in 1 2; do
      # its own network and hostname (unshare --uts); the filesystem is shared. Not `ip netns exec`:
      # it mounts a fresh /sys, without the cgroup filesystem slurmd needs.
      mkdir -p "$dir/spool/slurmd-tspn$k"
      nsenter --net="/run/netns/tspn$k-$id" unshare --uts sh -c "hostname tspn$k && exec slurmd -f '$SLURM_CONF' -N tspn$k" \
        || skip "slurmd of node tspn$k did not start: $(log_tail "$dir/log/slurmd-tspn$k.log")"
    done
  fi
  local state="" want
  want=$(printf 'idle%.0s\n' $(seq "$nodes"))
  for _ in $(seq 60); do
    state=$(sinfo -h -N -o %T 2>/dev/null || true)
    [[ $state == "$want" ]] && break
    sleep 0.5
  done
  [[ $state == "$want" ]] || skip "the nodes did not become idle (state '${state//$'\n'/ }'): $(log_tail "$dir/log/slurmctld.log" "$dir"/log/slurmd-*.log)"
  echo "ci_slurm.sh: $nodes node(s) idle ($names, $(nproc) CPUs each; slurmctld $ctld_addr:$ctld_port); SLURM_CONF=$SLURM_CONF"
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
  remove_namespaces
  rm -rf "$dir"
}

[[ ($# -eq 2 || ($# -eq 3 && $1 == up)) && ($1 == up || $1 == down) ]] \
  || die "usage: bash scripts/ci_slurm.sh up DIR [NODES] | down DIR"
dir=$(realpath -m "$2")
nodes=${3:-1}
[[ $nodes == 1 || $nodes == 2 ]] || die "NODES=$nodes: 1 or 2"
"$1"
