#!/bin/bash
# A throwaway single-node Slurm for the keepgpu Slurm tests (root only; Debian/Ubuntu).
#
#   tests/slurm/cluster.sh up [--nodes N]
#                                  install slurm-wlm/munge if missing, write configs, make fake
#                                  GPUs, install keepgpu + contrib/slurm, start munged, slurmctld
#                                  and slurmd, wait until the node is idle (bounded)
#                                  --nodes N (or KEEPGPU_SLURM_NODES=N): also N simulated nodes
#                                  n1..nN with 2 fake GPUs each, in partition "multi"
#   tests/slurm/cluster.sh down    cancel every job (epilogs run), stop the daemons it started
#   tests/slurm/cluster.sh status  daemons, node and queue
#
# Idempotent: `up` on a running cluster refreshes keepgpu and the scripts and returns; `down` on
# a stopped one does nothing. Everything lives in $KEEPGPU_SLURM_STATE (default
# /tmp/keepgpu-slurm-ci); the daemons run in the background, their pids in $STATE/run/*.pid.
# Clients need SLURM_CONF=$STATE/slurm.conf (`cluster.sh env` prints it).
#
# keepgpu for the job users: /root is often not traversable, so keepgpu is built into a wheel with
# $KEEPGPU_SLURM_BUILD_PYTHON (default: python3 on PATH; needs pip + setuptools) and installed
# into a venv of the system python3 ($STATE/venv, system site-packages for pyzmq, psutil, click
# from Debian) that every user can run.
#
# Multi-node mode: Debian's slurmd is built with multiple-slurmd support, so each simulated node is
# one more `slurmd -N nX` with its own port, spool, pid and log file (%n in slurm.conf). Each runs
# in its own mount and pid namespace (unshare -m -p -f --mount-proc) with a private folder bound
# over /tmp ($STATE itself bound back in at its path), so node-local state -- the users' runtime
# dirs, the Epilog's /proc scan -- is per node as on a real cluster. The namespace's pid 1 is a
# small bash (node_init) that reaps orphans and stops its slurmd on SIGTERM; when it ends, the
# kernel kills whatever is left in the node.
set -euo pipefail

STATE=${KEEPGPU_SLURM_STATE:-/tmp/keepgpu-slurm-ci}
REPO=$(cd -- "$(dirname -- "$(readlink -f -- "$0")")/../.." && pwd)
BUILD_PY=${KEEPGPU_SLURM_BUILD_PYTHON:-python3}
NGPUS=8
NCPUS=8
NODES=${KEEPGPU_SLURM_NODES:-0} # simulated nodes n1..nN (multi-node mode), 0: none
NODE_GPUS=2
NODE_PORT0=6900                 # node nX's slurmd listens on NODE_PORT0 + X
TEST_USERS=(kgtest kgtest2)
NODE=$(hostname -s)
SCRIPTS=$STATE/slurm-scripts
export SLURM_CONF=$STATE/slurm.conf
PACKAGES=(slurmd slurmctld slurm-client munge python3 python3-venv python3-zmq python3-psutil
    python3-click)

log() { printf 'cluster.sh: %s\n' "$*" >&2; }
die() {
    log "error: $*"
    exit 1
}

alive() {
    # alive NAME: the daemon whose pid we recorded still runs.
    local pid
    pid=$(cat "$STATE/run/$1.pid" 2>/dev/null) || return 1
    [[ $pid =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null
}

install_packages() {
    command -v apt-get >/dev/null ||
        die "apt-get not found: install Slurm (slurmd slurmctld slurm-client munge) and python3 with venv, pyzmq, psutil, click yourself"
    local missing=() p
    for p in "${PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" ||
            missing+=("$p")
    done
    ((${#missing[@]} == 0)) && return 0
    log "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

make_users() {
    local u
    for u in "${TEST_USERS[@]}"; do
        id -u "$u" >/dev/null 2>&1 || useradd -m -s /bin/bash "$u"
    done
}

make_dirs() {
    install -d -m 0755 "$STATE" "$STATE/ctld" "$STATE/spool" "$STATE/log" "$STATE/run" \
        "$STATE/dev"
    install -d -m 1777 "$STATE/jobs"
    local n
    for ((n = 1; n <= NODES; n++)); do
        install -d -m 0755 "$STATE/nodes" "$STATE/nodes/n$n"
        install -d -m 1777 "$STATE/nodes/n$n/tmp"
    done
    local i dev
    for ((i = 0; i < NGPUS; i++)); do
        dev=$STATE/dev/fakegpu$i
        # Slurm rejects plain files as GPU device files; character devices 195:i are /dev/nvidiaI.
        [[ -c $dev ]] || { rm -f "$dev"; mknod -m 666 "$dev" c 195 "$i"; }
    done
}

source_digest() {
    (cd "$REPO" && find keepgpu pyproject.toml -type f ! -name '*.pyc' -print0 | sort -z |
        xargs -0 sha256sum | sha256sum | cut -d' ' -f1)
}

install_keepgpu() {
    if [[ ! -x $STATE/venv/bin/python ]]; then
        /usr/bin/python3 -m venv --system-site-packages "$STATE/venv"
    fi
    local digest
    digest=$(source_digest)
    # Reinstall only when the source changed: keepers of running jobs use this venv.
    if [[ $(cat "$STATE/venv/.keepgpu-source" 2>/dev/null) != "$digest" ]]; then
        build_and_install_wheel
        echo "$digest" >"$STATE/venv/.keepgpu-source"
    fi
    install_scripts
}

build_and_install_wheel() {
    rm -rf "$STATE/wheel"
    "$BUILD_PY" -m pip wheel --no-deps --no-build-isolation --no-index -q -w "$STATE/wheel" \
        "$REPO" 2>"$STATE/log/wheel.log" || { cat "$STATE/log/wheel.log" >&2; return 1; }
    "$STATE/venv/bin/python" -m pip install --no-deps --no-index --force-reinstall -q \
        "$STATE/wheel"/keepgpu-*.whl >"$STATE/log/pip.log" 2>&1 ||
        { cat "$STATE/log/pip.log" >&2; return 1; }
    chmod -R a+rX "$STATE/venv"
}

install_scripts() {
    # The same steps as docs/slurm.md; the test settings go into keepgpu-slurm.local.conf.
    "$REPO/contrib/slurm/install.sh" --prefix "$SCRIPTS" --bin "$STATE/venv/bin" --force-conf \
        >"$STATE/log/install.log"
    # Site overrides live next to the main file, written atomically (jobs may be running).
    local conf=$SCRIPTS/keepgpu-slurm.local.conf
    cat >"$conf.new" <<EOF
# tests/slurm/cluster.sh: fake GPUs, Prolog keeper on request, a log the tests read.
KEEPGPU_SUPERVISE_ARGS="--engine fake --vram 64MiB"
KEEPGPU_PROLOG_KEEP=comment
KEEPGPU_SLURM_LOG=$STATE/log/keepgpu-slurm.log
EOF
    chmod 0644 "$conf.new"
    mv -f "$conf.new" "$conf"
}

write_configs() {
    local mem
    mem=$(($(awk '/MemTotal/ {print $2}' /proc/meminfo) / 2048))
    local last=$((NGPUS - 1))
    cat >"$STATE/slurm.conf.new" <<EOF
# Written by tests/slurm/cluster.sh
ClusterName=keepgpu-ci
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool/%n
SlurmctldPidFile=$STATE/run/slurmctld.daemon.pid
SlurmdPidFile=$STATE/run/slurmd.%n.daemon.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.%n.log
SlurmctldDebug=info
SlurmdDebug=info
# No systemd, no cgroups: processes are tracked by their parentage only.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
SlurmdParameters=config_overrides
MinJobAge=600
KillWait=5
InactiveLimit=0
GresTypes=gpu
Prolog=$SCRIPTS/keepgpu-prolog
PrologFlags=Alloc
Epilog=$SCRIPTS/keepgpu-epilog
TaskProlog=$SCRIPTS/keepgpu-task-prolog
TaskEpilog=$SCRIPTS/keepgpu-task-epilog
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$NCPUS RealMemory=$mem Gres=gpu:$NGPUS State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
    echo "NodeName=$NODE Name=gpu File=$STATE/dev/fakegpu[0-$last]" >"$STATE/gres.conf.new"
    if ((NODES > 0)); then
        local i
        for ((i = 1; i <= NODES; i++)); do
            echo "NodeName=n$i NodeHostname=$NODE NodeAddr=127.0.0.1 Port=$((NODE_PORT0 + i))" \
                "CPUs=4 RealMemory=1024 Gres=gpu:$NODE_GPUS State=UNKNOWN"
        done >>"$STATE/slurm.conf.new"
        echo "PartitionName=multi Nodes=n[1-$NODES] Default=NO MaxTime=INFINITE State=UP" \
            >>"$STATE/slurm.conf.new"
        # Every node has its own GPUs 0 and 1 (/dev/nvidia0-1 on a real node).
        echo "NodeName=n[1-$NODES] Name=gpu File=$STATE/dev/fakegpu[0-$((NODE_GPUS - 1))]" \
            >>"$STATE/gres.conf.new"
    fi
    local f changed=0
    for f in slurm.conf gres.conf; do
        if ! cmp -s "$STATE/$f.new" "$STATE/$f"; then
            mv -f "$STATE/$f.new" "$STATE/$f"
            changed=1
        else
            rm -f "$STATE/$f.new"
        fi
    done
    chmod 0644 "$STATE/slurm.conf" "$STATE/gres.conf"
    return $((1 - changed))
}

start_bg() {
    # start_bg NAME CMD...: run a foreground daemon in its own session, record its pid.
    local name=$1
    shift
    setsid "$@" </dev/null >>"$STATE/log/$name.out" 2>&1 &
    echo $! >"$STATE/run/$name.pid"
}

start_munge() {
    if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
        return 0
    fi
    alive munged && die "munged (pid $(cat "$STATE/run/munged.pid")) runs but does not answer"
    install -d -m 0755 -o munge -g munge /run/munge
    install -d -m 0700 -o munge -g munge /var/lib/munge /var/log/munge /etc/munge
    if [[ ! -s /etc/munge/munge.key ]]; then
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    fi
    chown munge:munge /etc/munge/munge.key
    chmod 0400 /etc/munge/munge.key
    start_bg munged setpriv --reuid=munge --regid=munge --init-groups /usr/sbin/munged --foreground
    wait_for 10 "munged to answer" bash -c 'munge -n 2>/dev/null | unmunge >/dev/null 2>&1'
}

wait_for() {
    # wait_for SECONDS WHAT CMD...: poll CMD every 0.2 s until it succeeds, at most SECONDS.
    local limit=$1 what=$2
    shift 2
    local deadline=$((SECONDS + limit))
    until "$@"; do
        ((SECONDS < deadline)) || die "timed out after ${limit}s waiting for $what"
        sleep 0.2
    done
}

quiet() {
    "$@" >/dev/null 2>&1
}

node_state() {
    # node_state [NODE]
    sinfo -h -n "${1:-$NODE}" -o '%t' 2>/dev/null | head -n1
}

node_idle() {
    # node_idle [NODE]
    local s node=${1:-$NODE}
    s=$(node_state "$node")
    case $s in
    idle | mix | alloc) return 0 ;;
    drain* | drng | down*)
        scontrol update NodeName="$node" State=RESUME >/dev/null 2>&1 || true
        return 1
        ;;
    *) return 1 ;;
    esac
}

all_nodes_idle() {
    local n
    node_idle "$NODE" || return 1
    for ((n = 1; n <= NODES; n++)); do node_idle "n$n" || return 1; done
}

node_init() {
    # node_init NODE: pid 1 of a simulated node's pid namespace (own mount namespace too):
    # a private /tmp with $STATE bound back at its path, then slurmd as a child, so that this
    # bash reaps the node's orphans (daemonized keepers) and forwards SIGTERM to slurmd.
    local node=$1 priv=$STATE/nodes/$1/tmp
    mount --make-rprivate /
    if [[ $STATE == /tmp/* ]]; then
        mkdir -p -- "$priv/${STATE#/tmp/}"
        mount --bind "$STATE" "$priv/${STATE#/tmp/}"
    fi
    mount --rbind "$priv" /tmp
    slurmd -D -N "$node" -f "$SLURM_CONF" &
    local child=$!
    trap 'kill -TERM "$child" 2>/dev/null' TERM INT
    while kill -0 "$child" 2>/dev/null; do wait "$child" || true; done
}

start_nodes() {
    local n
    for ((n = 1; n <= NODES; n++)); do
        alive "node-n$n" && continue
        start_bg "node-n$n" unshare -m -p -f --mount-proc "$REPO/tests/slurm/cluster.sh" \
            _node_init "n$n"
    done
}

stop_nodes() {
    local f name pid child
    for f in "$STATE"/run/node-*.pid; do
        [[ -e $f ]] || continue
        name=${f##*/}
        name=${name%.pid}
        # The namespace's pid 1 is unshare's child: SIGTERM there stops slurmd; its exit ends
        # everything left in the node.
        pid=$(cat "$f")
        child=$(cat "/proc/$pid/task/$pid/children" 2>/dev/null) || child=""
        # shellcheck disable=SC2086 # a list of pids
        [[ -n $child ]] && kill -TERM $child 2>/dev/null
        stop_pid "$name"
    done
}

cmd_up() {
    ((EUID == 0)) || die "must run as root"
    install_packages
    make_users
    make_dirs
    install_keepgpu
    local changed=0
    write_configs && changed=1
    start_munge
    if ((changed)) || ! alive slurmctld || ! alive slurmd; then
        # New nodes or ports need fresh daemons (scontrol reconfigure does not add nodes).
        stop_nodes
        stop_pid slurmd
        stop_pid slurmctld
        start_bg slurmctld slurmctld -D -c -i -f "$SLURM_CONF"
        wait_for 30 "slurmctld to answer" quiet scontrol ping
        start_bg slurmd slurmd -D -N "$NODE" -f "$SLURM_CONF"
    fi
    start_nodes
    echo "$NODES" >"$STATE/run/nodes"
    wait_for 60 "the nodes to be idle (see $STATE/log/slurmd.*.log)" all_nodes_idle
    log "up: node $NODE $(node_state), $NGPUS fake GPUs; $NODES simulated node(s) with" \
        "$NODE_GPUS GPUs each; SLURM_CONF=$SLURM_CONF"
}

stop_pid() {
    # stop_pid NAME: SIGTERM the recorded daemon, SIGKILL it after 10 s.
    local pid
    alive "$1" || { rm -f "$STATE/run/$1.pid"; return 0; }
    pid=$(cat "$STATE/run/$1.pid")
    kill -TERM "$pid" 2>/dev/null || true
    local i
    for ((i = 0; i < 100; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
    rm -f "$STATE/run/$1.pid"
}

cmd_down_daemons() {
    stop_nodes
    stop_pid slurmd
    stop_pid slurmctld
    stop_pid munged
    rm -f "$STATE/run/nodes"
}

cmd_down() {
    ((EUID == 0)) || die "must run as root"
    if alive slurmctld && scontrol ping >/dev/null 2>&1; then
        local jobs
        jobs=$(squeue -h -o %A 2>/dev/null | tr '\n' ' ')
        if [[ -n ${jobs// /} ]]; then
            log "cancelling jobs $jobs"
            # shellcheck disable=SC2086
            scancel $jobs || true
            # Let the epilogs run before slurmd goes.
            local deadline=$((SECONDS + 30))
            while [[ -n $(squeue -h -o %A 2>/dev/null) ]] && ((SECONDS < deadline)); do
                sleep 0.2
            done
        fi
    fi
    cmd_down_daemons
    log "down"
}

cmd_status() {
    local d
    local f
    local -a names=(munged slurmctld slurmd)
    for f in "$STATE"/run/node-*.pid; do
        [[ -e $f ]] || continue
        f=${f##*/}
        names+=("${f%.pid}")
    done
    for d in "${names[@]}"; do
        if alive "$d"; then echo "$d: running (pid $(cat "$STATE/run/$d.pid"))"; else echo "$d: not running (by this script)"; fi
    done
    sinfo 2>/dev/null || true
    squeue 2>/dev/null || true
}

cmd=${1:-}
shift || true
if [[ $cmd == up && ${1:-} == --nodes ]]; then
    [[ ${2:-} =~ ^[0-9]+$ ]] || die "--nodes needs a number"
    NODES=$2
elif [[ $cmd == up && -z ${KEEPGPU_SLURM_NODES:-} ]]; then
    # A plain `up` on a running cluster keeps its simulated nodes.
    NODES=$(cat "$STATE/run/nodes" 2>/dev/null) || NODES=0
    [[ $NODES =~ ^[0-9]+$ ]] || NODES=0
fi
case $cmd in
up) cmd_up ;;
_node_init) node_init "$1" ;;
down) cmd_down ;;
status) cmd_status ;;
env) echo "export SLURM_CONF=$SLURM_CONF" ;;
*)
    echo "usage: $0 up|down|status|env" >&2
    exit 2
    ;;
esac
