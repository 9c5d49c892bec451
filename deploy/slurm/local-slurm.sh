#!/usr/bin/env bash
# A real one-node SLURM on this machine, to rehearse the SLURM scripts before a real cluster (the test suite runs
# it: tests/test_slurm.py). Needs Debian's `slurm-wlm` and `munge` (apt-get install slurm-wlm munge).
#
#   eval "$(deploy/slurm/local-slurm.sh start DIR)"   # munged, slurmctld, slurmd; prints `export SLURM_CONF=...`
#   deploy/slurm/local-slurm.sh stop DIR              # cancels every job of this cluster, stops the three daemons
#
# Everything lives in DIR (config, state, logs, munge key and socket); nothing in /etc is touched, so it cannot
# clash with a SLURM already installed there. The node is declared larger than the machine (CNTK_SLURM_CPUS CPUs,
# default 32, and CNTK_SLURM_GPUS GPUs, default 4, backed by plain files; SlurmdParameters=config_overrides) so the
# unchanged `#SBATCH` lines of GPU jobs schedule; run CPU workers in them (CNTK_WORKER_KIND=cpu). Two partitions
# share the node: `local` (the default) and `gpu` (the partition deploy/jobqueue.yaml names).
set -euo pipefail
action=${1:?usage: deploy/slurm/local-slurm.sh start DIR | stop DIR}
dir=${2:?usage: deploy/slurm/local-slurm.sh start DIR | stop DIR}
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
conf=$dir/slurm.conf
START_WAIT=${CNTK_SLURM_START_WAIT:-60}  # seconds for the node to come up: a failure detector, not a pace

fail() { echo "local-slurm: $*" >&2; exit 1; }

# First free TCP port on loopback from $1 upwards.
free_port() {
  local port=$1
  while (echo > "/dev/tcp/127.0.0.1/$port") 2> /dev/null; do port=$(( port + 1 )); done
  echo "$port"
}

# Kill the daemon whose pid file is $1 and wait until it is gone.
stop_daemon() {
  local pid
  [[ -s $1 ]] || return 0
  pid=$(cat "$1")
  kill "$pid" 2> /dev/null || { rm -f "$1"; return 0; }
  for (( i = 0; i < 300; i++ )); do kill -0 "$pid" 2> /dev/null || break; sleep 0.1; done
  kill -9 "$pid" 2> /dev/null || true
  rm -f "$1"
}

write_config() {
  local host user ctld_port slurmd_port cpus=${CNTK_SLURM_CPUS:-32} gpus=${CNTK_SLURM_GPUS:-4}
  host=$(hostname -s)
  user=$(id -un)
  ctld_port=$(free_port "${CNTK_SLURM_PORT:-6817}")
  slurmd_port=$(free_port $(( ctld_port + 1 )))
  mkdir -p "$dir/state" "$dir/spool" "$dir/gpu" "$dir/munge"
  chmod 700 "$dir/munge"
  for (( g = 0; g < gpus; g++ )); do : > "$dir/gpu/gpu$g"; done
  cat > "$conf" <<EOF
# written by deploy/slurm/local-slurm.sh
ClusterName=cntklocal
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
SlurmUser=$user
SlurmdUser=$user
AuthType=auth/munge
AuthInfo=socket=$dir/munge/munge.socket
CredType=cred/munge
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ReturnToService=2
MinJobAge=3600
DefMemPerCPU=1024
KillWait=10
GresTypes=gpu
SlurmdParameters=config_overrides
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus Boards=1 SocketsPerBoard=1 CoresPerSocket=$cpus ThreadsPerCore=1 RealMemory=262144 Gres=gpu:$gpus State=UNKNOWN
PartitionName=local Nodes=$host Default=YES MaxTime=INFINITE State=UP
PartitionName=gpu Nodes=$host MaxTime=INFINITE State=UP
EOF
  cat > "$dir/gres.conf" <<EOF
AutoDetect=off
NodeName=$host Name=gpu File=$dir/gpu/gpu[0-$(( gpus - 1 ))]
EOF
}

start() {
  local cmd
  for cmd in munged mungekey slurmctld slurmd sinfo; do
    command -v "$cmd" > /dev/null || fail "$cmd not found: install Debian's slurm-wlm and munge (apt-get install slurm-wlm munge)"
  done
  [[ -s $dir/slurmctld.pid ]] && fail "$dir already runs a SLURM: stop it first (deploy/slurm/local-slurm.sh stop $dir)"
  (( ${#dir} <= 80 )) || fail "$dir is too long for munge's socket path (a Unix socket path has at most 107 bytes): use a shorter DIR"
  write_config
  export SLURM_CONF=$conf
  [[ -s $dir/munge/munge.key ]] || mungekey --create --keyfile="$dir/munge/munge.key" 2> /dev/null \
    || fail "mungekey could not create $dir/munge/munge.key"
  chmod 600 "$dir/munge/munge.key"
  munged --force --socket="$dir/munge/munge.socket" --key-file="$dir/munge/munge.key" \
    --pid-file="$dir/munge/munged.pid" --log-file="$dir/munge/munged.log" --seed-file="$dir/munge/munged.seed" \
    || fail "munged did not start; see $dir/munge/munged.log"
  # -c: a fresh cluster, no state of an earlier start; -i: ignore stale job state if there were any
  slurmctld -c -i -f "$conf" || fail "slurmctld did not start; see $dir/slurmctld.log"
  slurmd -f "$conf" || fail "slurmd did not start; see $dir/slurmd.log"
  for (( waited = 0; waited < START_WAIT * 10; waited++ )); do
    state=$(sinfo --noheader --format %T 2> /dev/null || true)
    [[ $state == idle* ]] && break
    sleep 0.1
  done
  [[ ${state:-} == idle* ]] || fail "the node is not idle after ${START_WAIT}s (state '${state:-none}'); see $dir/slurmctld.log and $dir/slurmd.log"
  echo "local SLURM up: $(sinfo --noheader --format '%N %c CPUs %G %T'); use it with SLURM_CONF=$conf" >&2
  echo "export SLURM_CONF=$conf"
}

stop() {
  export SLURM_CONF=$conf
  if [[ -s $dir/slurmctld.pid ]] && kill -0 "$(cat "$dir/slurmctld.pid")" 2> /dev/null; then
    scancel --user "$(id -un)" 2> /dev/null || true
    # jobs get SIGTERM, then SIGKILL after KillWait; wait for their processes to leave before slurmd goes
    for (( i = 0; i < 600; i++ )); do
      [[ -z $(squeue --noheader --format %i 2> /dev/null) ]] && break
      sleep 0.1
    done
  fi
  stop_daemon "$dir/slurmd.pid"
  stop_daemon "$dir/slurmctld.pid"
  stop_daemon "$dir/munge/munged.pid"
}

case $action in
  start) start ;;
  stop) stop ;;
  *) fail "unknown action '$action': use start or stop" ;;
esac
