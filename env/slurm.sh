#!/usr/bin/env bash
# A single-node SLURM (munged + slurmctld + slurmd) for tests and for trying the workflow on one
# machine. Everything lives in one state directory; every daemon is started and stopped by the
# PID it wrote there, never by name (other SLURMs on the machine are left alone).
#
#   env/slurm.sh start    # prints `export SLURM_CONF=...`; sbatch/squeue/sacct need it
#   env/slurm.sh status
#   env/slurm.sh stop
#
# SCOREDA_SLURM_DIR (default /tmp/scoreda-slurm) holds slurm.conf, the munge key and socket,
# PID files, spool and logs. Settings this machine needs: proctrack/linuxproc (no cgroups),
# MpiDefault=pmi2, batch_sched_delay=0 (jobs start at once). A second partition, `short` (5 min
# limit), is there to try time-limit checks; SCOREDA_SLURM_CRED_EXPIRE (default 30 s) is also how
# long a requeued job waits before it may start again. env/slurm_epilog.sh, the node's Epilog and
# run at start and stop, removes the MPICH shared-memory segments of killed jobs (a later job with
# the same SLURM ids would attach to them and fail in MPI_Init).
set -euo pipefail

DIR="${SCOREDA_SLURM_DIR:-/tmp/scoreda-slurm}"
CONF="$DIR/slurm.conf"
HOST="$(hostname -s)"
CPUS="$(getconf _NPROCESSORS_ONLN)"  # not nproc: it follows OMP_NUM_THREADS
MEM_MB="$(awk '/MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)"
PORT_CTLD="${SCOREDA_SLURM_PORT:-6917}"
PORT_D="$((PORT_CTLD + 1))"
EPILOG="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/slurm_epilog.sh"

say() { echo "[slurm] $*" >&2; }

alive() {  # alive NAME: the daemon whose PID file is DIR/NAME.pid runs
    local f="$DIR/$1.pid"
    [[ -s "$f" ]] && kill -0 "$(cat "$f")" 2>/dev/null
}

write_conf() {
    mkdir -p "$DIR"/{spool,state,log}
    cat >"$CONF" <<EOF
ClusterName=scoreda
SlurmctldHost=$HOST
SlurmctldPort=$PORT_CTLD
SlurmdPort=$PORT_D
SlurmUser=root
AuthType=auth/munge
AuthInfo=socket=$DIR/munge.socket,cred_expire=${SCOREDA_SLURM_CRED_EXPIRE:-30}
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=pmi2
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
MinJobAge=3600
KillWait=5
InactiveLimit=0
Epilog=$EPILOG
NodeName=$HOST CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
PartitionName=short Nodes=$HOST MaxTime=00:05:00 State=UP
EOF
}

start() {
    if alive slurmctld && alive slurmd && alive munged; then
        say "already running in $DIR"
    else
        stop >/dev/null 2>&1 || true  # clears stale segments too
        write_conf
        [[ -s "$DIR/munge.key" ]] || head -c 1024 /dev/urandom >"$DIR/munge.key"
        chmod 400 "$DIR/munge.key"
        munged --force --socket="$DIR/munge.socket" --key-file="$DIR/munge.key" \
            --pid-file="$DIR/munged.pid" --log-file="$DIR/log/munged.log" \
            --seed-file="$DIR/munge.seed"
        slurmctld -f "$CONF"
        slurmd -f "$CONF"
        for _ in $(seq 60); do  # up when the node answers idle
            if SLURM_CONF="$CONF" sinfo -h -o %t 2>/dev/null | grep -qx idle; then break; fi
            sleep 0.5
        done
        if ! SLURM_CONF="$CONF" sinfo -h -o %t 2>/dev/null | grep -qx idle; then
            say "node did not come up; logs in $DIR/log"; exit 1
        fi
        say "up: $HOST ($CPUS CPUs), state in $DIR"
    fi
    echo "export SLURM_CONF=$CONF"
}

stop() {
    local name pid
    for name in slurmd slurmctld munged; do
        if alive "$name"; then
            pid="$(cat "$DIR/$name.pid")"
            kill "$pid" 2>/dev/null || true
            for _ in $(seq 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
            kill -9 "$pid" 2>/dev/null || true
        fi
        rm -f "$DIR/$name.pid"
    done
    "$EPILOG"
    say "stopped ($DIR)"
}

status() {
    local name
    for name in munged slurmctld slurmd; do
        if alive "$name"; then echo "$name: running (pid $(cat "$DIR/$name.pid"))"; else echo "$name: stopped"; fi
    done
    if alive slurmctld; then SLURM_CONF="$CONF" sinfo; fi
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) status ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
