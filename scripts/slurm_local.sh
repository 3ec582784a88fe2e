#!/usr/bin/env bash
# A real Slurm cluster on this machine, for tests and trying slurm/ out: one controller and two emulated
# nodes (node1, node2; Debian's slurmd is built with MULTIPLE_SLURMD), munge authentication, no systemd.
#   bash scripts/slurm_local.sh up      install (apt-get, needs root) if missing, configure, start; waits for idle nodes
#   bash scripts/slurm_local.sh down    stop the daemons started by `up`
#   bash scripts/slurm_local.sh status  sinfo
# State and logs live in $SLURM_LOCAL_DIR (default /tmp/slurm). Exit status 3: Slurm cannot be installed here.
# `up` writes /etc/slurm/slurm.conf and adds node1/node2 to /etc/hosts, and `down` leaves both (and munged) in
# place: for a machine without a Slurm of its own (CI, a workstation), never on a real cluster's node.
set -euo pipefail
dir=${SLURM_LOCAL_DIR:-/tmp/slurm}
conf=/etc/slurm/slurm.conf
cpus=${SLURM_LOCAL_CPUS:-$(nproc)}

install_packages() {
  command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
    && command -v munged >/dev/null && return 0
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    echo "slurm_local: Slurm is not installed and cannot be (needs root and apt-get)" >&2
    exit 3
  fi
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      slurmctld slurmd slurm-client munge; } >"$dir/apt.log" 2>&1 \
    || { tail -n 20 "$dir/apt.log" >&2; echo "slurm_local: apt-get install failed" >&2; exit 3; }
}

configure() {
  local host mem
  host=$(hostname -s)
  mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 / 2 ))
  mkdir -p /etc/slurm "$dir/state" "$dir/log" "$dir/spool"
  cat >"$conf" <<CONF
ClusterName=local
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=cred_expire=10
MailProg=/bin/true
SlurmdParameters=config_overrides
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
ReturnToService=2
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool/%n
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd-%n.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd-%n.log
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
InactiveLimit=0
MinJobAge=300
KillWait=30
Waittime=0
NodeName=node[1-2] NodeHostname=$host NodeAddr=127.0.0.1 Port=[17001-17002] CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
CONF
  # the node names must resolve (Lightning's master address is the first node of the job)
  for n in node1 node2; do
    getent hosts "$n" >/dev/null || { echo "127.0.0.1 $n" >>/etc/hosts; } 2>/dev/null \
      || echo "slurm_local: cannot add $n to /etc/hosts: export MASTER_ADDR=127.0.0.1 for jobs" >&2
  done
}

alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

up() {
  mkdir -p "$dir"
  install_packages
  configure
  install -d -o munge -g munge -m 0755 /run/munge
  pgrep -u munge -x munged >/dev/null || runuser -u munge -- /usr/sbin/munged
  alive "$dir/slurmctld.pid" || slurmctld
  for n in node1 node2; do alive "$dir/slurmd-$n.pid" || slurmd -N "$n"; done
  for _ in $(seq 60); do
    if [ "$(sinfo -h -o '%t' 2>/dev/null | sort -u | tr -d '\n')" = "idle" ]; then
      sinfo
      return 0
    fi
    sleep 0.5
  done
  echo "slurm_local: nodes not idle after 30 s" >&2
  sinfo >&2 || true
  exit 1
}

down() {
  for f in "$dir"/slurmd-*.pid "$dir/slurmctld.pid"; do
    alive "$f" && kill "$(cat "$f")" || true
  done
}

case "${1:-up}" in
  up) up ;;
  down) down ;;
  status) sinfo ;;
  *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
