#!/usr/bin/env bash
# Start a one-node SLURM cluster on 127.0.0.1 for tests: munged (as the munge user), slurmctld and
# slurmd (as root), their files under DIR (munged's in a /tmp dir linked as DIR/munge); installs
# Debian's slurm-wlm and munge when missing.
#
#   tests/slurm/start_slurm.sh DIR      then   export SLURM_CONF=DIR/slurm.conf; srun hostname
#   tests/slurm/stop_slurm.sh DIR       cancels the jobs and stops the three daemons (by pid)
#
# Nothing global changes beyond the apt install: a private munge key and socket (slurm.conf's
# AuthInfo points at it), private ports, state, spool, logs and pid files. Settings measured
# on a container without systemd: SlurmUser=root, proctrack/linuxproc, task/none and no cgroup.conf
# (22.05's slurmd refuses CgroupPlugin=disabled), the node's RealMemory below the machine's.
# Exit status 2: this machine cannot run it (not root, no apt); 1: a daemon did not come up (log tail).
set -euo pipefail

DIR=${1:?usage: start_slurm.sh DIR}
mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd)
SCRIPT_DIR=$(cd "$(dirname "$0")" && pwd)
CPUS=${SLURM_TEST_CPUS:-2}
MEM_MB=${SLURM_TEST_MEM_MB:-4096}

cannot() { echo "cannot run SLURM here: $*" >&2; exit 2; }

if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null; then
  [ "$(id -u)" = 0 ] || cannot "slurm-wlm and munge are not installed and installing them needs root"
  command -v apt-get >/dev/null || cannot "slurm-wlm and munge are not installed and there is no apt-get"
  echo "installing Debian packages slurm-wlm munge" >&2
  export DEBIAN_FRONTEND=noninteractive
  (apt-get install -y -qq slurm-wlm munge >/dev/null 2>&1 ||
    (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq slurm-wlm munge >/dev/null 2>&1)) ||
    cannot "apt-get install slurm-wlm munge failed (no Debian mirror reachable?)"
fi
[ "$(id -u)" = 0 ] || cannot "slurmd must run as root (SlurmdUser=root) and munged as the munge user"
id munge >/dev/null 2>&1 || cannot "the munge user does not exist (the munge package creates it)"

# Never two clusters in one DIR: a pid file of a live daemon means it is running already.
for pidfile in "$DIR/munge/munged.pid" "$DIR/slurmctld.pid" "$DIR/slurmd.pid"; do
  if [ -s "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
    echo "already running in $DIR ($pidfile)" >&2; exit 1
  fi
done

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
CTLD_PORT=$(free_port)
SLURMD_PORT=$(free_port)
while [ "$SLURMD_PORT" = "$CTLD_PORT" ]; do SLURMD_PORT=$(free_port); done
NODE=retformer-node
# slurmctld only starts on the host slurm.conf names as the controller.
HOST=$(hostname -s)
MACHINE_MB=$(awk '/MemTotal/ {print int($2 / 1024)}' /proc/meminfo)
[ "$MEM_MB" -lt "$MACHINE_MB" ] || MEM_MB=$((MACHINE_MB / 2))

mkdir -p "$DIR/state" "$DIR/spool" "$DIR/log" "$DIR/jobs"
# munged runs as the munge user, who may not reach into DIR (pytest's tmp dirs are 0700 root): its
# key, socket and logs live in a /tmp dir of their own, linked as DIR/munge (stop_slurm.sh removes it).
# munged checks that dir belongs to its user and is not writable by others.
if [ ! -L "$DIR/munge" ]; then
  ln -s "$(mktemp -d /tmp/retformer-munge.XXXXXX)" "$DIR/munge"
fi
MUNGE_DIR=$(readlink -f "$DIR/munge")
chown munge:munge "$MUNGE_DIR"
chmod 0755 "$MUNGE_DIR"
if [ ! -s "$MUNGE_DIR/munge.key" ]; then
  dd if=/dev/urandom bs=1 count=1024 of="$MUNGE_DIR/munge.key" status=none
fi
chown munge:munge "$MUNGE_DIR/munge.key"
chmod 0400 "$MUNGE_DIR/munge.key"

cat > "$DIR/slurm.conf" <<EOF
ClusterName=retformer-test
SlurmctldHost=$HOST(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$MUNGE_DIR/munge.socket
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1024
SchedulerType=sched/backfill
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
ReturnToService=2
SlurmdTimeout=60
InactiveLimit=0
KillWait=5
NodeName=$NODE NodeAddr=127.0.0.1 NodeHostname=$NODE CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
export SLURM_CONF="$DIR/slurm.conf"

tail_logs() {
  for f in "$DIR/munge/munged.log" "$DIR/log/slurmctld.log" "$DIR/log/slurmd.log"; do
    [ -f "$f" ] && { echo "--- $f" >&2; tail -n 15 "$f" >&2; }
  done
  return 0
}
# A failure from here on leaves nothing running: the logs' tails, then stop what did start.
trap 'rc=$?; if [ $rc -ne 0 ]; then tail_logs; "$SCRIPT_DIR/stop_slurm.sh" "$DIR" >&2; fi' EXIT
wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
  local limit=$1 what=$2; shift 2
  for _ in $(seq $((limit * 5))); do "$@" >/dev/null 2>&1 && return 0; sleep 0.2; done
  echo "$what did not come up within ${limit}s" >&2
  exit 1
}

runuser -u munge -- munged \
  --key-file="$MUNGE_DIR/munge.key" --socket="$MUNGE_DIR/munge.socket" \
  --pid-file="$MUNGE_DIR/munged.pid" --log-file="$MUNGE_DIR/munged.log" --seed-file="$MUNGE_DIR/munged.seed"
wait_for 10 munged test -S "$MUNGE_DIR/munge.socket"

slurmctld -f "$SLURM_CONF" -i
wait_for 30 slurmctld scontrol ping
# -N: the node's name in slurm.conf, whatever this machine's hostname is.
slurmd -f "$SLURM_CONF" -N "$NODE"
node_idle() { sinfo -h -N -n "$NODE" -o %t | grep -qE '^(idle|mix|alloc)'; }
wait_for 60 "node $NODE (idle)" node_idle
echo "SLURM up: SLURM_CONF=$SLURM_CONF node=$NODE cpus=$CPUS mem=${MEM_MB}MB ctld_port=$CTLD_PORT"
