#!/usr/bin/env bash
# A one-node Slurm cluster on this machine, to try slurm/*.sbatch and the Slurm sweep launcher
# before a real cluster (tests/test_slurm.py runs against it too):
#
#   cluster=$(mktemp -d)   # any short folder every user can reach
#   sudo bash slurm/local_cluster.sh start "$cluster"
#   export SLURM_CONF="$cluster/slurm.conf"      # sbatch, srun, squeue, scancel... read it
#   sudo bash slurm/local_cluster.sh status "$cluster"
#   sudo bash slurm/local_cluster.sh stop "$cluster"
#
# Needs root (slurmd starts jobs as their users) and Slurm and munge (Debian/Ubuntu: sudo apt-get
# install slurm-wlm munge); it installs nothing. Everything it writes (slurm.conf, a munge key and
# socket, state, spool, pid and log files) goes under the folder, with its own munged socket and
# ports, so a system Slurm or munge is left alone; stop cancels the jobs, then ends exactly the
# daemons whose pid files are in the folder.
#   MMM_SLURM_PORT  slurmctld's port (default 6817); slurmd takes the next one
#   MMM_SLURM_CPUS  the CPUs the node offers (default: nproc); more than the machine has lets jobs share cores
set -euo pipefail
PATH=$PATH:/usr/sbin:/sbin  # where Debian puts the daemons

fail() { echo "local_cluster: $*" >&2; exit 1; }
[ $# -eq 2 ] || fail "usage: $0 start|stop|status FOLDER   (FOLDER holds the cluster's config, state and logs)"
action=$1
[ "$action" = start ] && mkdir -p "$2"
[ -d "$2" ] || fail "no folder $2: no cluster was started there"
dir=$(cd "$2" && pwd)
conf=$dir/slurm.conf
port=${MMM_SLURM_PORT:-6817}
cpus=${MMM_SLURM_CPUS:-$(nproc)}
[[ $port =~ ^[0-9]+$ ]] && [ "$port" -ge 1024 ] && [ "$port" -le 65534 ] \
  || fail "MMM_SLURM_PORT=$port is not a port number between 1024 and 65534"
[[ $cpus =~ ^[1-9][0-9]*$ ]] || fail "MMM_SLURM_CPUS=$cpus is not a positive number of CPUs"

# The pid of a daemon this folder started, if it still runs (a pid file can outlive its process
# and the pid be reused: the process must also be that daemon).
running_pid() {
  local pid
  pid=$(cat "$dir/$1.pid" 2>/dev/null) || return 1
  [ -n "$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$1" ] && echo "$pid"
}

stop() {
  local d pid jobs
  # Jobs outlive slurmd (each runs under its own slurmstepd): cancel them first.
  if running_pid slurmctld >/dev/null && jobs=$(SLURM_CONF=$conf squeue -h -o %A 2>/dev/null) && [ -n "$jobs" ]; then
    # shellcheck disable=SC2086  # one job id per word
    SLURM_CONF=$conf scancel $jobs || true
    for _ in $(seq 90); do [ -z "$(SLURM_CONF=$conf squeue -h -o %A 2>/dev/null)" ] && break; sleep 0.5; done
    echo "cancelled jobs ${jobs//$'\n'/ }"
  fi
  for d in slurmd slurmctld munged; do  # slurmd still talks to slurmctld, and both to munged, on the way out
    if pid=$(running_pid "$d"); then
      kill "$pid"
      for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
      if kill -0 "$pid" 2>/dev/null; then kill -9 "$pid"; fi
      echo "stopped $d (pid $pid)"
    fi
    rm -f "$dir/$d.pid"
  done
}

abort() {
  for f in "$dir"/log/*.log; do [ -f "$f" ] && { echo "--- $f"; tail -n 15 "$f"; }; done >&2
  stop >/dev/null
  fail "$@"
}

check_prerequisites() {
  local missing=() cmd p
  for cmd in munged slurmctld slurmd sbatch srun squeue sinfo scontrol scancel; do
    command -v "$cmd" >/dev/null 2>&1 || missing+=("$cmd")
  done
  [ ${#missing[@]} -eq 0 ] || fail "${missing[*]} not found: install Slurm and munge (Debian/Ubuntu: sudo apt-get install slurm-wlm munge)"
  [ "$(uname -s)" = Linux ] || fail "this script sets up Slurm on Linux only"
  [ "$(id -u)" -eq 0 ] || fail "slurmd must run as root to start jobs: run this script with sudo"
  # munged's socket goes in the folder: a Unix socket path has at most 107 bytes, and munged
  # wants every folder above it open to all (o+x), as sbatch of any user must reach it.
  [ ${#dir} -le 85 ] || fail "the folder path $dir is too long for munge's socket: use a shorter one (e.g. one made by mktemp -d)"
  local up=$dir
  while up=$(dirname "$up") && [ "$up" != / ]; do
    [ $(( 0$(stat -c %a "$up") & 1 )) -eq 1 ] \
      || fail "$up is not searchable by all users (o+x), which munged needs above its socket: use a folder elsewhere (e.g. one made by mktemp -d)"
  done
  for p in "$port" $((port + 1)); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
      fail "port $p is in use (another Slurm?): stop it, or set MMM_SLURM_PORT to the first of two free ports"
    fi
  done
}

write_config() {
  local host mem_mb
  host=$(hostname -s)
  mem_mb=$(( $(awk '/^MemTotal:/ {print $2}' /proc/meminfo) * 9 / 10 / 1024 ))  # slurmd drains a node claiming more than it has
  mkdir -p "$dir"/{munge,state,spool,log}
  chmod 755 "$dir" "$dir/munge"  # users' sbatch reaches munged through the socket in there
  if [ ! -s "$dir/munge/munge.key" ]; then
    head -c 1024 /dev/urandom >"$dir/munge/munge.key"
    chmod 400 "$dir/munge/munge.key"
  fi
  # linuxproc/none plugins: no cgroups to set up. No accounting database: sacct answers
  # "accounting storage is disabled". ReturnToService=2: the node comes back up by itself.
  # A requeued job waits cred_expire seconds before it starts again (Slurm's default: 120), and
  # the scheduler looks at the queue every 2 s (default: 60): a short local turnaround.
  # config_overrides: the node offers the CPUs configured here, even more than it has.
  # Without accounting, `scontrol show job` is the only record of a finished job: keep it an hour.
  cat >"$conf" <<EOF
ClusterName=mmm-local
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$port
SlurmdPort=$((port + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$dir/munge/munge.socket,cred_expire=30
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
MpiDefault=none
SlurmdParameters=config_overrides
ReturnToService=2
MinJobAge=3600
MailProg=/bin/true
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=local Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
}

start() {
  local pid state=""
  if pid=$(running_pid slurmctld); then
    echo "already running in $dir (slurmctld pid $pid)"
  else
    stop >/dev/null  # what a half-started cluster left
    check_prerequisites
    write_config
    munged --key-file="$dir/munge/munge.key" --socket="$dir/munge/munge.socket" --pid-file="$dir/munged.pid" \
      --log-file="$dir/log/munged.log" --seed-file="$dir/munge/munged.seed" || abort "munged did not start"
    # -c: no state from an earlier start (stop cancelled its jobs; its node may be drained for
    # settings that changed since).
    slurmctld -c -f "$conf" || abort "slurmctld did not start"
    slurmd -f "$conf" -N "$(hostname -s)" || abort "slurmd did not start"
  fi
  for _ in $(seq 60); do
    state=$(SLURM_CONF=$conf sinfo -h -N -o %T 2>/dev/null || true)
    case $state in idle|mixed|allocated) break ;; esac
    sleep 0.5
  done
  case $state in
    idle|mixed|allocated) ;;
    *) abort "the node did not come up within 30 s (state: ${state:-none}); the daemons' logs are above" ;;
  esac
  echo "Slurm is up in $dir: node $(hostname -s), $(grep -o ' CPUs=[0-9]*' "$conf" | cut -d= -f2) CPUs, port $port. In your shell:"
  echo "  export SLURM_CONF=$conf"
}

status() {
  local d pid down=0
  for d in munged slurmctld slurmd; do
    if pid=$(running_pid "$d"); then echo "$d: running (pid $pid)"; else echo "$d: not running"; down=1; fi
  done
  if [ $down -eq 0 ]; then SLURM_CONF=$conf sinfo -N; SLURM_CONF=$conf squeue; fi
  return $down
}

case $action in
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) fail "unknown action $action: use start, stop or status" ;;
esac
