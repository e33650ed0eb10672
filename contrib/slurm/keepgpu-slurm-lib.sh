# shellcheck shell=bash disable=SC2034 # the defaults below are read by the scripts
# Shared functions of the keepgpu Slurm scripts (sourced, never run). Bash >= 4.4.
#
# Nothing here forks per process: the Epilog scans the job user's processes after every job, so
# the scan is one find(1) and bash builtins.

# Defaults; keepgpu-slurm.conf overrides them (see docs/slurm.md for each).
KEEPGPU_BIN=""                              # folder holding keepgpu-supervise and keepgpu-ctl
KEEPGPU_SLURM_RUNTIME_DIR="/tmp/keepgpu-%u" # %u = the job user's uid; keepgpu's own fallback dir
KEEPGPU_SUPERVISE_ARGS=""                   # extra keepgpu-supervise options for every keeper
KEEPGPU_MAX_HOLD=""                         # site default --max-hold (90m, 8h); empty: none
KEEPGPU_PROLOG_KEEP=0                       # 0 off, 1 every GPU job, comment: --comment=keepgpu
KEEPGPU_START_TIMEOUT=60                    # s, Prolog's bound on starting a keeper
KEEPGPU_STOP_TIMEOUT=12                     # s, bound on one polite `keepgpu-ctl stop`
KEEPGPU_KILL_WAIT=5                         # s, wait for SIGKILLed keeper processes to vanish
KEEPGPU_EPILOG_DRAIN=1                      # 1: Epilog fails (Slurm drains the node) if one survives
KEEPGPU_EPILOG_KEEP_FILES=0                 # 1: keep the job's keeper log in the runtime dir
KEEPGPU_SLURM_LOG=""                        # file the root scripts append their log lines to

KG_SYS_PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
KG_SCRIPT=${0##*/}
KG_JOB=${SLURM_JOB_ID:-}
# The node the script runs on, in every log line: a multi-node job's scripts run on each node.
KG_HOST=${SLURMD_NODENAME:-${HOSTNAME%%.*}}

kg_log() {
    # kg_log LEVEL MESSAGE...: one line to stderr, the configured file and syslog (when present).
    local level=$1
    shift
    local line
    printf -v line '%(%Y-%m-%dT%H:%M:%S)T %s[%d] node=%s job=%s %s: %s' -1 "$KG_SCRIPT" "$$" \
        "${KG_HOST:--}" "${KG_JOB:--}" "$level" "$*"
    printf '%s\n' "$line" >&2
    if [[ -n $KEEPGPU_SLURM_LOG ]]; then
        printf '%s\n' "$line" 2>/dev/null >>"$KEEPGPU_SLURM_LOG" || true
    fi
    if [[ -S /dev/log ]] && command -v logger >/dev/null 2>&1; then
        logger -t keepgpu-slurm -- "${KG_SCRIPT}[$$] node=${KG_HOST:--} job=${KG_JOB:--} $level: $*" \
            2>/dev/null || true
    fi
}

kg_now_ms() {
    # Monotonic-enough milliseconds for durations (bash's EPOCHREALTIME, no fork).
    local t=${EPOCHREALTIME/[.,]/}
    printf '%s' "$((t / 1000))"
}

kg_conf_ok() {
    # kg_conf_ok FILE: readable, and as root: owned by root, not group/other writable.
    [[ -f $1 && -r $1 ]] || return 1
    ((EUID == 0)) || return 0
    local owner mode
    read -r owner mode < <(stat -Lc '%u %a' -- "$1")
    if [[ $owner != 0 ]] || (((8#$mode & 8#022) != 0)); then
        kg_log error "ignoring $1: it must be owned by root and not group/other writable"
        return 1
    fi
}

kg_load_conf() {
    # Source the first of $KEEPGPU_SLURM_CONF (not for root), <script dir>/keepgpu-slurm.conf,
    # /etc/keepgpu/slurm.conf; then its site overrides <name>.local.conf next to it, if present
    # (kept when install.sh --force-conf rewrites the main file).
    local here conf local_conf candidates=()
    here=$(dirname -- "$(readlink -f -- "${BASH_SOURCE[1]:-$0}")")
    if ((EUID != 0)) && [[ -n ${KEEPGPU_SLURM_CONF:-} ]]; then
        candidates+=("$KEEPGPU_SLURM_CONF")
    fi
    candidates+=("$here/keepgpu-slurm.conf" /etc/keepgpu/slurm.conf)
    KG_CONF=""
    for conf in "${candidates[@]}"; do
        kg_conf_ok "$conf" || continue
        # shellcheck source=/dev/null
        source "$conf"
        KG_CONF=$conf
        local_conf=${conf%.conf}.local.conf
        if kg_conf_ok "$local_conf"; then
            # shellcheck source=/dev/null
            source "$local_conf"
        fi
        return 0
    done
}

kg_tool() {
    # kg_tool NAME: absolute path of keepgpu-supervise / keepgpu-ctl, or fail.
    local name=$1 path
    if [[ -n $KEEPGPU_BIN ]]; then
        path=$KEEPGPU_BIN/$name
        [[ -x $path ]] && { printf '%s' "$path"; return 0; }
        kg_log error "$path is not executable (KEEPGPU_BIN=$KEEPGPU_BIN in ${KG_CONF:-no config})"
        return 1
    fi
    if path=$(command -v -- "$name"); then
        printf '%s' "$path"
        return 0
    fi
    kg_log error "$name not found: set KEEPGPU_BIN in keepgpu-slurm.conf"
    return 1
}

kg_runtime_dir() {
    # kg_runtime_dir UID: the keeper runtime dir of that user.
    printf '%s' "${KEEPGPU_SLURM_RUNTIME_DIR//%u/$1}"
}

kg_is_job_id() {
    [[ $1 =~ ^[0-9]+$ ]]
}

kg_step_suffix() {
    # ".<step>" inside a numbered job step (srun), "" in the batch script, salloc's interactive
    # step, the extern step or outside any step. Special steps are >= 0xfffffff0 in Slurm.
    local step=${SLURM_STEP_ID:-${SLURM_STEPID:-}}
    if [[ $step =~ ^[0-9]+$ ]] && ((step < 4294967280)); then
        printf '.%s' "$step"
    fi
}

kg_step_is_numbered() {
    [[ -n $(kg_step_suffix) ]]
}

kg_read_pidfile() {
    # kg_read_pidfile PATH: the pid in a keepgpu pid file (a regular file, not a symlink).
    local path=$1 pid=""
    [[ -f $path && ! -L $path ]] || return 1
    read -r pid 2>/dev/null <"$path" || true
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    printf '%s' "$pid"
}

kg_proc_uid() {
    # kg_proc_uid PID: sets KG_UID to the real uid of the process (no fork).
    local key real rest
    KG_UID=""
    while read -r key real rest; do
        if [[ $key == Uid: ]]; then
            KG_UID=$real
            return 0
        fi
    done 2>/dev/null <"/proc/$1/status"
    return 1
}

kg_proc_stat() {
    # kg_proc_stat PID: sets KG_STATE (one letter: R, S, D, Z...), KG_PPID and KG_PGRP (no fork).
    local stat
    KG_STATE="" KG_PPID="" KG_PGRP=""
    read -r stat 2>/dev/null <"/proc/$1/stat" || return 1
    # The command name is in parentheses and may hold spaces: split after the last ')'.
    stat=${stat##*) }
    read -r KG_STATE KG_PPID KG_PGRP _ <<<"$stat"
}

kg_is_keepgpu_proc() {
    # kg_is_keepgpu_proc PID: a keepgpu supervisor or worker (by its argv, never by comm name).
    local -a argv
    mapfile -d '' -t argv 2>/dev/null <"/proc/$1/cmdline" || return 1
    local a
    for a in "${argv[@]:0:6}"; do
        case $a in
        keepgpu.worker | keepgpu.cli.supervise | */keepgpu-supervise | keepgpu-supervise) return 0 ;;
        esac
    done
    return 1
}

kg_proc_in_job() {
    # kg_proc_in_job PID JOBID: the process's environment marks it as part of that job.
    local -a envs
    mapfile -d '' -t envs 2>/dev/null <"/proc/$1/environ" || return 1
    local kv
    for kv in "${envs[@]}"; do
        case $kv in
        "SLURM_JOB_ID=$2" | "KEEPGPU_SLURM_JOB_ID=$2") return 0 ;;
        esac
    done
    return 1
}

kg_job_keepers() {
    # kg_job_keepers JOBID UID [PID...]: pids of keepgpu processes of user UID that belong to the
    # job: marked in their environment, listed (the supervisors named after the job), or children
    # of a listed supervisor. Never a process of another user or another job.
    local job=$1 uid=$2
    shift 2
    local -A named=()
    local p
    for p in "$@"; do named[$p]=1; done
    local pid
    # One find(1) picks the user's processes (/proc/<pid> belongs to the process's effective
    # uid); bash then checks the real uid, argv and environment of those only.
    while read -r pid; do
        kg_proc_uid "$pid" || continue
        [[ $KG_UID == "$uid" ]] || continue
        kg_is_keepgpu_proc "$pid" || continue
        kg_proc_stat "$pid" || continue
        if [[ -n ${named[$pid]:-} || -n ${named[$KG_PPID]:-} ]] || kg_proc_in_job "$pid" "$job"
        then
            printf '%s\n' "$pid"
        fi
    done < <(find /proc -mindepth 1 -maxdepth 1 -regex '/proc/[0-9]+' -uid "$uid" -printf '%f\n' \
        2>/dev/null)
}

kg_keeper_family() {
    # kg_keeper_family PID: PID and its keepgpu children (a supervisor's workers).
    printf '%s\n' "$1"
    local dir pid
    for dir in /proc/[0-9]*; do
        pid=${dir#/proc/}
        kg_proc_stat "$pid" || continue
        [[ $KG_PPID == "$1" ]] || continue
        kg_is_keepgpu_proc "$pid" && printf '%s\n' "$pid"
    done
}

kg_alive() {
    # kg_alive PID: exists and is not a zombie (a zombie holds no memory and no device).
    kg_proc_stat "$1" || return 1
    [[ -n $KG_STATE && $KG_STATE != Z && $KG_STATE != X ]]
}

kg_kill_and_wait() {
    # kg_kill_and_wait SECONDS PID...: SIGKILL each pid (and the process group it leads: a
    # worker leads its own), wait up to SECONDS (integer) until all are gone; prints the
    # survivors as "pid:state".
    local wait_s=$1
    shift
    local pid
    local -a left
    for pid in "$@"; do
        if kg_proc_stat "$pid" && [[ $KG_PGRP == "$pid" ]]; then
            kill -KILL -- "-$pid" 2>/dev/null || true
        fi
        kill -KILL "$pid" 2>/dev/null || true
    done
    local deadline=$(($(kg_now_ms) + wait_s * 1000))
    while :; do
        left=()
        for pid in "$@"; do kg_alive "$pid" && left+=("$pid"); done
        ((${#left[@]} == 0)) && return 0
        (($(kg_now_ms) >= deadline)) && break
        sleep 0.05
    done
    for pid in "${left[@]}"; do
        kg_proc_stat "$pid"
        printf '%s:%s\n' "$pid" "${KG_STATE:-?}"
    done
    return 1
}
