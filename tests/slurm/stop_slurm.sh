#!/usr/bin/env bash
# Stop what tests/slurm/start_slurm.sh DIR started: cancel every job of that cluster, then stop
# slurmd, slurmctld and munged by the pids in their pid files (TERM, then KILL after 10 s).
set -uo pipefail

DIR=${1:?usage: stop_slurm.sh DIR}
export SLURM_CONF="$DIR/slurm.conf"

if [ -f "$SLURM_CONF" ] && [ -s "$DIR/slurmctld.pid" ] && kill -0 "$(cat "$DIR/slurmctld.pid")" 2>/dev/null; then
  squeue -h -o %i | xargs -r scancel 2>/dev/null || true
  for _ in $(seq 50); do [ -z "$(squeue -h -o %i 2>/dev/null)" ] && break; sleep 0.2; done
fi

stop_pid() {  # stop_pid PIDFILE NAME: only a live process whose command is NAME
  local pidfile=$1 name=$2 pid
  [ -s "$pidfile" ] || return 0
  pid=$(cat "$pidfile")
  if kill -0 "$pid" 2>/dev/null && [ "$(cat /proc/"$pid"/comm 2>/dev/null)" = "$name" ]; then
    kill -TERM "$pid"
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    kill -0 "$pid" 2>/dev/null && kill -KILL "$pid"
  fi
  rm -f "$pidfile"
}
stop_pid "$DIR/slurmd.pid" slurmd
stop_pid "$DIR/slurmctld.pid" slurmctld
stop_pid "$DIR/munge/munged.pid" munged
# munged's own dir (start_slurm.sh made it with mktemp and linked it as DIR/munge).
if [ -L "$DIR/munge" ]; then
  target=$(readlink -f "$DIR/munge")
  case "$target" in /tmp/retformer-munge.*) rm -rf "$target" ;; esac
  rm -f "$DIR/munge"
fi
echo "SLURM in $DIR stopped"
