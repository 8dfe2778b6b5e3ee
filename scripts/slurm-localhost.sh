#!/usr/bin/env bash
# A one-node Slurm cluster on this machine, for testing `llamatron launch` against the real scheduler.
#
#   scripts/slurm-localhost.sh install        apt-get install Debian's slurm-wlm and munge (root)
#   scripts/slurm-localhost.sh start DIR      configure and start munged, slurmctld and slurmd in DIR
#   scripts/slurm-localhost.sh stop DIR       stop them
#
# Everything lives in DIR (config, keys, sockets, state, logs) on free ports, so nothing in /etc is
# touched and two clusters can run side by side. `start` prints `export SLURM_CONF=DIR/slurm.conf`:
# sbatch, squeue and scontrol need it in their environment. No cgroups: processes are tracked through
# /proc (proctrack/linuxproc) and tasks are not bound (task/none), which is what a container allows.
set -euo pipefail

die() { echo "slurm-localhost: $*" >&2; exit 1; }

install() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
        && command -v munged >/dev/null; then
        return 0
    fi
    [ "$(id -u)" = 0 ] || die "slurm is not installed and installing it needs root"
    command -v apt-get >/dev/null || die "slurm is not installed and there is no apt-get to install it"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >/dev/null || die "apt-get update failed"
    apt-get install -y -q --no-install-recommends slurm-wlm munge >/dev/null || die "apt-get install slurm-wlm munge failed"
}

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

start() {
    local dir
    dir=$(mkdir -p "$1" && cd "$1" && pwd)
    [ "$(id -u)" = 0 ] || die "slurmd must run as root (it starts jobs as their users)"
    for tool in munged slurmctld slurmd sbatch scontrol; do
        command -v "$tool" >/dev/null || die "$tool not found (run: $0 install)"
    done
    chmod 700 "$dir"
    mkdir -p "$dir/state" "$dir/spool" "$dir/munge"
    chmod 700 "$dir/munge"

    # munge authenticates every Slurm message; a private key and socket keep this cluster to itself.
    if [ ! -f "$dir/munge/munge.key" ]; then
        dd if=/dev/urandom of="$dir/munge/munge.key" bs=1024 count=1 status=none
        chmod 400 "$dir/munge/munge.key"
    fi
    munged --force --socket="$dir/munge/munge.sock" --key-file="$dir/munge/munge.key" \
        --pid-file="$dir/munge/munged.pid" --log-file="$dir/munge/munged.log" \
        --seed-file="$dir/munge/munged.seed" || die "munged did not start (see $dir/munge/munged.log)"

    local ctld_port slurmd_port
    ctld_port=$(free_port)
    slurmd_port=$(free_port)
    cat > "$dir/slurm.conf" <<EOF
ClusterName=localhost
SlurmctldHost=$(hostname -s)(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
AuthType=auth/munge
CredType=cred/munge
# cred_expire: a requeued job waits this long before it may start again (default 120 s).
AuthInfo=socket=$dir/munge/munge.sock,cred_expire=10
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
JobRequeue=1
# Quick turnaround for tests: a killed job is gone (and a requeued one restarts) within seconds.
KillWait=5
MinJobAge=300
SchedulerParameters=sched_interval=2
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$(nproc) State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF
    export SLURM_CONF="$dir/slurm.conf"
    slurmctld -f "$SLURM_CONF" || die "slurmctld did not start (see $dir/slurmctld.log)"
    slurmd -f "$SLURM_CONF" -N localhost || die "slurmd did not start (see $dir/slurmd.log)"
    # Up when the node reports idle.
    local i
    for i in $(seq 60); do
        if sinfo -h -N -o '%T' 2>/dev/null | grep -q idle; then
            echo "export SLURM_CONF=$SLURM_CONF"
            return 0
        fi
        sleep 0.5
    done
    die "the node did not come up in 30 s (see $dir/slurmctld.log and $dir/slurmd.log)"
}

stop() {
    local dir=$1 pidfile
    for pidfile in "$dir/slurmd.pid" "$dir/slurmctld.pid" "$dir/munge/munged.pid"; do
        if [ -f "$pidfile" ]; then
            kill "$(cat "$pidfile")" 2>/dev/null || true
        fi
    done
}

case "${1:-}" in
    install) install ;;
    start) [ $# = 2 ] || die "usage: $0 start DIR"; start "$2" ;;
    stop) [ $# = 2 ] || die "usage: $0 stop DIR"; stop "$2" ;;
    *) die "usage: $0 install | start DIR | stop DIR" ;;
esac
