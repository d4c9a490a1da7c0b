#!/usr/bin/env bash
# A real single-node SLURM cluster (munge + slurmctld + slurmd) for tests and local trials.
#
#   launch/testing/slurm_local.sh start DIR   install the Debian packages if missing (root), write
#                                            DIR/slurm.conf, start the daemons, wait for the node
#   launch/testing/slurm_local.sh stop DIR    stop the daemons started by `start DIR`
#
# Clients reach the cluster with `export SLURM_CONF=DIR/slurm.conf`. State, spool, logs and pid
# files all live under DIR. The daemons run as root without systemd; munged is shared with any
# instance already running. Exit status 3 means SLURM cannot run here (not root, no packages and
# no apt-get), which tests report as a skip.
set -euo pipefail

cmd="${1:-}" dir="${2:-}"
[[ ( "$cmd" == start || "$cmd" == stop ) && -n "$dir" ]] || { echo "usage: $0 start|stop DIR" >&2; exit 2; }
mkdir -p "$dir"
dir="$(cd "$dir" && pwd)"

stop() {
  for name in slurmd slurmctld; do
    if [[ -f "$dir/$name.pid" ]]; then
      pid="$(cat "$dir/$name.pid")"
      kill -TERM "$pid" 2>/dev/null || true
      for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      kill -KILL "$pid" 2>/dev/null || true
      rm -f "$dir/$name.pid"
    fi
  done
}
if [[ "$cmd" == stop ]]; then stop; exit 0; fi

unavailable() { echo "slurm_local: SLURM cannot run here: $*" >&2; exit 3; }
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null || ! command -v sbatch >/dev/null; then
  ((EUID == 0)) || unavailable "the slurmctld, slurmd, slurm-client and munge packages are missing and installing them needs root"
  command -v apt-get >/dev/null || unavailable "the SLURM packages are missing and there is no apt-get to install them"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends slurmctld slurmd slurm-client munge >"$dir/install.log" 2>&1 \
    || { apt-get update -q >>"$dir/install.log" 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends slurmctld slurmd slurm-client munge >>"$dir/install.log" 2>&1; } \
    || unavailable "apt-get install failed (see $dir/install.log)"
fi
((EUID == 0)) || unavailable "the daemons run as root here (SlurmUser=root), and this is uid $EUID"

# munge: the runtime socket directory is missing without systemd.
if ! pgrep -x munged >/dev/null; then
  install -d -o munge -g munge -m 0755 /run/munge
  [[ -s /etc/munge/munge.key ]] || { command -v mungekey >/dev/null && mungekey --create --force; chown munge:munge /etc/munge/munge.key; }
  munged --force
fi

host="$(hostname -s)"
cpus="$(nproc)"
memory_mib="$(awk '/MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)"
mkdir -p "$dir/state" "$dir/spool"
cat >"$dir/slurm.conf" <<CONF
ClusterName=wrentest
SlurmctldHost=$host
SlurmctldPort=${WREN_SLURMCTLD_PORT:-6817}
SlurmdPort=${WREN_SLURMD_PORT:-6818}
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SlurmUser=root
SlurmdUser=root
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
ReturnToService=2
# A job requeued with a later StartTime is started by the backfill pass: run it every second, not every 30.
SchedulerParameters=bf_interval=1
MinJobAge=600
KillWait=30
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.daemon.pid
SlurmdPidFile=$dir/slurmd.daemon.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.log
NodeName=$host CPUs=$cpus RealMemory=$memory_mib State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
CONF

stop
export SLURM_CONF="$dir/slurm.conf"
slurmctld -D -i -f "$SLURM_CONF" >>"$dir/slurmctld.out" 2>&1 &
echo $! >"$dir/slurmctld.pid"
slurmd -D -f "$SLURM_CONF" -N "$host" >>"$dir/slurmd.out" 2>&1 &
echo $! >"$dir/slurmd.pid"

for _ in $(seq 150); do
  state="$(sinfo -h -n "$host" -o %t 2>/dev/null || true)"
  if [[ "$state" == idle* || "$state" == mix* || "$state" == alloc* ]]; then
    echo "slurm_local: node $host is $state; export SLURM_CONF=$SLURM_CONF"
    exit 0
  fi
  sleep 0.2
done
stop
unavailable "the node did not come up within 30 s (see $dir/slurmctld.log and $dir/slurmd.log)"
