# shellcheck shell=bash
# keepgpu-job's multi-node part (sourced by keepgpu-job, never run). Bash >= 4.4.
#
# The batch script runs on the job's first node only, so `keepgpu-job start` in a job of several
# nodes (or with --nodes LIST) runs one background step,
#     srun --overlap --ntasks-per-node=1 --nodelist=LIST keepgpu-job _node-keeper [options]
# whose task on each node starts that node's keeper (job-<id>.<step>, as any step keeper) and
# then stays, because the TaskEpilog ends a step's keeper as soon as its task returns. Each task
# reports on its stdout, which srun collects on the batch node in <runtime dir>/job-<id>.nodes.out:
#     keepgpu-node NODE start|gone|stop EXIT STEP MESSAGE
# `start` returns once every node reported. `stop` sends SIGUSR1 to that srun, which forwards it
# to every task; each stops its keeper (as `keepgpu-job stop` does on one node) and reports.
# scancel, the time limit and the job's end signal the tasks too; the TaskEpilog and each node's
# Epilog remain the guarantee. `status` runs a short step that asks every node's keeper.
# <runtime dir>/job-<id>.nodes holds "SRUN_PID NODELIST" while the step runs.

KG_NODE=$KG_HOST

multi_node_job() {
    [[ ${SLURM_JOB_NUM_NODES:-1} =~ ^[0-9]+$ ]] && ((SLURM_JOB_NUM_NODES > 1))
}

want_nodes() {
    # want_nodes ARGS...: sets KG_NODES (a Slurm node list) and KG_ARGS (ARGS without
    # --nodes LIST); true when start must cover nodes by a step: --nodes was given, or the job
    # has several nodes and this is not already inside a step.
    KG_NODES="" KG_ARGS=()
    local given=0
    while (($#)); do
        case $1 in
        --nodes) (($# >= 2)) || die 2 "--nodes needs a node list"; KG_NODES=$2; given=1; shift 2 ;;
        --nodes=*) KG_NODES=${1#--nodes=}; given=1; shift ;;
        *) KG_ARGS+=("$1"); shift ;;
        esac
    done
    if ((given)); then
        [[ -n $KG_NODES ]] || die 2 "--nodes needs a node list"
        kg_step_is_numbered && die 2 "--nodes works in the batch script, not inside an srun step"
        return 0
    fi
    kg_step_is_numbered && return 1
    multi_node_job || return 1
    KG_NODES=${SLURM_JOB_NODELIST:?}
}

# shellcheck disable=SC2153 # NAME and RUNDIR come from keepgpu-job's job_context
group_file() { printf '%s' "$RUNDIR/$NAME.nodes"; }

group_exists() {
    # A recorded node step whose srun still runs (or just ended: its report is still to read).
    [[ -f $(group_file) && ! -L $(group_file) ]]
}

group_read() {
    # Sets G_PID and G_LIST from the group file.
    G_PID="" G_LIST=""
    read -r G_PID G_LIST 2>/dev/null <"$(group_file)" || true
    [[ $G_PID =~ ^[0-9]+$ ]] || G_PID=""
}

group_srun_alive() {
    [[ -n $G_PID ]] && kg_alive "$G_PID" || return 1
    local argv0
    IFS= read -r -d '' argv0 2>/dev/null <"/proc/$G_PID/cmdline"
    [[ ${argv0##*/} == srun ]]
}

node_lines() {
    # node_lines EVENT: the report lines of that event ("NODE EXIT STEP MESSAGE").
    local tag event node rc rest
    while read -r tag node event rc rest; do
        [[ $tag == keepgpu-node && $event == "$1" ]] && printf '%s %s %s\n' "$node" "$rc" "$rest"
    done 2>/dev/null <"$(group_file).out"
}

group_start() {
    local supervise self out
    supervise=$(kg_tool keepgpu-supervise) || exit 78
    local -a nodes
    mapfile -t nodes < <(scontrol show hostnames "$KG_NODES" 2>/dev/null)
    ((${#nodes[@]} > 0)) || die 2 "--nodes '$KG_NODES' is not a node list"
    if group_exists; then
        group_read
        group_srun_alive && die 1 "job $SLURM_JOB_ID already has keepers on $G_LIST (srun pid \
$G_PID); run keepgpu-job stop first"
        rm -f -- "$(group_file)" "$(group_file).out"
    fi
    if [[ ! -d $RUNDIR ]]; then
        mkdir -m 0700 -- "$RUNDIR" || die 78 "cannot create $RUNDIR"
    fi
    [[ -O $RUNDIR && ! -L $RUNDIR ]] || die 78 "$RUNDIR is not a directory of yours"
    self=$(readlink -f -- "$0")
    out=$(group_file).out
    # --overlap: the keeper step shares the job's CPUs and GPUs with the job's later steps.
    srun --overlap --nodes="${#nodes[@]}" --ntasks="${#nodes[@]}" --ntasks-per-node=1 \
        --nodelist="$KG_NODES" --kill-on-bad-exit=0 --job-name=keepgpu \
        "$self" _node-keeper "$@" >"$out" 2>&1 </dev/null &
    local pid=$!
    printf '%s %s\n' "$pid" "$KG_NODES" >"$(group_file)"
    group_wait_started "$pid" "${nodes[@]}"
}

group_wait_started() {
    # group_wait_started SRUN_PID NODE...: wait for every node's start report, print them.
    local pid=$1
    shift
    local n=$# bound=$((KEEPGPU_START_TIMEOUT + 90))
    local deadline=$(($(kg_now_ms) + bound * 1000)) got
    while :; do
        got=$(node_lines start | wc -l)
        ((got >= n)) && break
        kg_alive "$pid" || break
        if (($(kg_now_ms) >= deadline)); then
            printf 'keepgpu-job: no report from every node within %ss; stopping\n' "$bound" >&2
            kill -USR1 "$pid" 2>/dev/null
            break
        fi
        sleep 0.05
    done
    local -A rcs=() msgs=()
    local node rc s step="" msg
    while read -r node rc s msg; do
        rcs[$node]=$rc msgs[$node]=$msg step=$s
    done < <(node_lines start)
    local ok=0 held=0 total=0 worst="" failed=()
    for node in "$@"; do
        rc=${rcs[$node]:-}
        if [[ -z $rc ]]; then
            failed+=("$node")
            printf '%s: error: no report from the node\n' "$node" >&2
            worst=1
            continue
        fi
        if [[ ${msgs[$node]} =~ ([0-9]+)/([0-9]+)\ GPU\(s\)\ holding ]]; then
            held=$((held + BASH_REMATCH[1])) total=$((total + BASH_REMATCH[2]))
        fi
        if ((rc == 0)); then
            ok=$((ok + 1))
            printf '%s: %s\n' "$node" "${msgs[$node]}"
        else
            failed+=("$node")
            printf '%s: error (exit %s): %s\n' "$node" "$rc" "${msgs[$node]}" >&2
            if [[ -z $worst ]]; then worst=$rc; elif [[ $worst != "$rc" ]]; then worst=1; fi
        fi
    done
    if ((${#rcs[@]} < n)) && ! kg_alive "$pid"; then
        # srun itself failed (bad node list, no such node in the job...): say what it said.
        local line
        while IFS= read -r line; do
            [[ $line == keepgpu-node\ * ]] || printf 'srun: %s\n' "${line#srun: }" >&2
        done <"$(group_file).out"
    fi
    printf 'keepgpu-job: %s: %d/%d node(s) holding, %d/%d GPU(s)%s\n' "$NAME" "$ok" "$n" \
        "$held" "$total" "${step:+ (step $step)}${failed[*]:+; failed: ${failed[*]}}"
    ((${#failed[@]} == 0)) && return 0
    if ((ok == 0)); then
        group_end "$pid"
        return "${worst:-1}"
    fi
    return 1
}

group_end() {
    # group_end SRUN_PID: make the step end (its tasks stop their keepers), bounded; then forget it.
    local pid=$1 deadline=$(($(kg_now_ms) + (KEEPGPU_STOP_TIMEOUT + 10) * 1000))
    kill -USR1 "$pid" 2>/dev/null
    while kg_alive "$pid" && (($(kg_now_ms) < deadline)); do sleep 0.05; done
    kg_alive "$pid" && kill -KILL "$pid" 2>/dev/null
    rm -f -- "$(group_file)" "$(group_file).out"
}

group_stop() {
    group_read
    local t0 deadline
    t0=$(kg_now_ms)
    deadline=$((t0 + (KEEPGPU_STOP_TIMEOUT + KEEPGPU_KILL_WAIT + 10) * 1000))
    if group_srun_alive; then
        # srun forwards the signal to every task of the step.
        kill -USR1 "$G_PID" 2>/dev/null
        while kg_alive "$G_PID" && (($(kg_now_ms) < deadline)); do sleep 0.02; done
    fi
    local -A starts=() gone=() stops=()
    local node rc step msg
    while read -r node rc step msg; do starts[$node]=$rc; done < <(node_lines start)
    while read -r node rc step msg; do gone[$node]=$msg; done < <(node_lines gone)
    while read -r node rc step msg; do stops[$node]="$rc $msg"; done < <(node_lines stop)
    local -a nodes
    mapfile -t nodes < <(scontrol show hostnames "$G_LIST" 2>/dev/null)
    local bad=0
    for node in "${nodes[@]}"; do
        if [[ -n ${stops[$node]:-} ]]; then
            rc=${stops[$node]%% *}
            printf '%s: %s\n' "$node" "${stops[$node]#* }"
            ((rc == 0)) || bad=1
        elif [[ -n ${gone[$node]:-} ]]; then
            printf '%s: %s\n' "$node" "${gone[$node]}"
        elif [[ -n ${starts[$node]:-} && ${starts[$node]} != 0 && ${starts[$node]} != 1 ]]; then
            printf '%s: no keeper (it had not started)\n' "$node"
        else
            printf '%s: error: no stop report from the node\n' "$node" >&2
            bad=1
        fi
    done
    if kg_alive "$G_PID"; then
        printf 'keepgpu-job: the keeper step did not end within its bound; SIGKILL srun %s\n' \
            "$G_PID" >&2
        kill -KILL "$G_PID" 2>/dev/null
        bad=1
    fi
    rm -f -- "$(group_file)" "$(group_file).out"
    printf 'keepgpu-job: %s: %d node(s) released in %dms%s\n' "$NAME" "${#nodes[@]}" \
        "$(($(kg_now_ms) - t0))" "$( ((bad)) && printf '; some not cleanly')"
    # A keeper of this node outside the step (the Prolog's) goes too.
    if [[ -e $RUNDIR/$NAME.pid ]]; then
        stop_named "$NAME" || bad=1
    fi
    return "$bad"
}

node_report() {
    # node_report EVENT EXIT MESSAGE: one report line for the batch node (newlines folded).
    local msg=${3//$'\n'/ | }
    printf 'keepgpu-node %s %s %s %s %s\n' "$KG_NODE" "$1" "$2" "${SLURM_STEP_ID:--}" "$msg"
}

node_keeper() {
    # The node step's task: start this node's keeper, stay until told to stop or it ends.
    job_context
    local stop=0 out rc pid
    # USR1: keepgpu-job stop (through srun); TERM/INT: scancel, the time limit, the job's end.
    trap 'stop=1' USR1 TERM INT HUP
    if ! out=$(job_gpus 2>&1); then
        node_report start 78 "${out#keepgpu-job: error: }"
        exit 78
    fi
    local supervise
    supervise=$(kg_tool keepgpu-supervise 2>&1) || { node_report start 78 "$supervise"; exit 78; }
    # shellcheck disable=SC2086 # KEEPGPU_SUPERVISE_ARGS is a word list by design
    out=$("$supervise" --name "$NAME" --detach $KEEPGPU_SUPERVISE_ARGS "$@" 2>&1)
    rc=$?
    # On success the summary is the last line (before it: per-GPU progress of a slow start);
    # a failure reports everything, the reasons included.
    ((rc == 0)) && out=${out##*$'\n'}
    node_report start "$rc" "$out"
    pid=$(kg_read_pidfile "$RUNDIR/$NAME.pid") || pid=""
    [[ -n $pid ]] && kg_alive "$pid" || exit "$rc"
    # A signal interrupts `wait` at once; the poll only notices a keeper that ended by itself.
    local sleeper
    while ((!stop)) && kg_alive "$pid"; do
        sleep 1 &
        sleeper=$!
        wait "$sleeper"
        kill "$sleeper" 2>/dev/null
    done
    if ((!stop)); then
        node_report gone 0 "keeper $NAME had ended before stop"
        exit 0
    fi
    out=$(node_stop "$NAME" "$pid" 2>&1)
    rc=$?
    node_report stop "$rc" "$out"
    exit "$rc"
}

node_stop() {
    # node_stop NAME PID: release by SIGTERM, which the supervisor handles exactly as the stop
    # command (STOP to every worker, join, then SIGKILL, each bounded), and wait by pid for it and
    # its workers to be gone. No client to start: four nodes' stops cost what one does.
    local name=$1 pid=$2 log=$RUNDIR/$1.log size=0 t0
    t0=$(kg_now_ms)
    local -a family left
    mapfile -t family < <(kg_keeper_family "$pid")
    [[ -f $log ]] && size=$(stat -c %s -- "$log" 2>/dev/null)
    kill -TERM "$pid" 2>/dev/null
    local deadline=$((t0 + KEEPGPU_STOP_TIMEOUT * 1000)) p
    while :; do
        left=()
        for p in "${family[@]}"; do kg_alive "$p" && left+=("$p"); done
        ((${#left[@]} == 0)) && break
        if (($(kg_now_ms) >= deadline)); then
            printf 'keeper %s (pid %s) still there after %ss; killing %s: %s\n' "$name" "$pid" \
                "$KEEPGPU_STOP_TIMEOUT" "${left[*]}" "$(kg_kill_and_wait "$KEEPGPU_KILL_WAIT" \
                "${left[@]}" | tr '\n' ' ')"
            return 1
        fi
        sleep 0.02
    done
    local took=$(($(kg_now_ms) - t0))
    # The supervisor logs each worker it had to SIGKILL (or could not kill) during the release.
    if [[ -f $log ]] && tail -c "+$((size + 1))" -- "$log" | grep -q -e SIGKILL -e unkillable
    then
        printf 'keeper %s: %d GPU(s) released in %dms, some killed (see %s)\n' "$name" \
            "$((${#family[@]} - 1))" "$took" "$log"
        return 1
    fi
    printf 'keeper %s: %d GPU(s) released in %dms\n' "$name" "$((${#family[@]} - 1))" "$took"
}

group_status() {
    # group_status [--json]: ask every node's keeper, in one short step.
    group_read
    local step="" node rc s msg
    while read -r node rc s msg; do step=$s; done < <(node_lines start)
    [[ -n $step && -n $G_LIST ]] || die 3 "the keeper step of job $SLURM_JOB_ID has no report"
    local -a nodes
    mapfile -t nodes < <(scontrol show hostnames "$G_LIST" 2>/dev/null)
    local self raw
    self=$(readlink -f -- "$0")
    raw=$(timeout -k 2 60 srun --overlap --nodes="${#nodes[@]}" --ntasks="${#nodes[@]}" \
        --ntasks-per-node=1 --nodelist="$G_LIST" --kill-on-bad-exit=0 \
        --job-name=keepgpu-status "$self" _node-status "$NAME.$step" "$@" 2>&1)
    local -A rcs=() b64=() outs=()
    local tag event chunk
    while read -r tag node event rc s chunk; do
        [[ $tag == keepgpu-node && $event == status ]] || continue
        rcs[$node]=$rc
        b64[$node]+=$chunk
    done <<<"$raw"
    for node in "${!b64[@]}"; do
        outs[$node]=$(printf '%s' "${b64[$node]}" | base64 -d 2>/dev/null)
    done
    local answered=0 json="" sep=""
    for node in "${nodes[@]}"; do
        rc=${rcs[$node]:-3}
        ((rc == 0)) && answered=$((answered + 1))
        if [[ ${1:-} == --json ]]; then
            if ((rc == 0)); then
                json+="$sep\"$node\":${outs[$node]}"
            else
                msg=${outs[$node]:-no answer}
                msg=${msg//\\/\\\\}
                msg=${msg//\"/\\\"}
                json+="$sep\"$node\":{\"error\":\"${msg//$'\n'/ }\",\"exit\":$rc}"
            fi
            sep=","
        else
            printf '== %s: %s ==\n%s\n' "$node" "$NAME.$step" "${outs[$node]:-no answer (exit $rc)}"
        fi
    done
    if [[ ${1:-} == --json ]]; then
        printf '{"job":"%s","step":%s,"nodes":{%s}}\n' "$NAME" "$step" "$json"
    fi
    ((answered == ${#nodes[@]})) && return 0
    ((answered == 0)) && return 3
    return 1
}

node_status() {
    # node_status NAME [--json]: this node's keeper status, as one report line (base64).
    job_context
    local name=$1 ctl out rc
    shift
    ctl=$(kg_tool keepgpu-ctl 2>&1) || { node_report status 78 "$(base64 -w0 <<<"$ctl")"; exit 0; }
    out=$("$ctl" --name "$name" status "$@" 2>&1)
    rc=$?
    [[ ${1:-} == --json ]] && ((rc == 0)) && out=${out//$'\n'/ }
    # Short lines: srun may interleave the tasks' output within a long line.
    local chunk
    while IFS= read -r chunk; do
        printf 'keepgpu-node %s status %s %s %s\n' "$KG_NODE" "$rc" "${SLURM_STEP_ID:--}" "$chunk"
    done < <(printf '%s' "$out" | base64 -w 512)
}

prolog_stop_all() {
    # Prolog keepers on several nodes: one step on every node releases them all (each node's
    # TaskProlog stops its keeper before the task starts); the task checks it is gone.
    local self raw t0 bad=0
    t0=$(kg_now_ms)
    self=$(readlink -f -- "$0")
    raw=$(timeout -k 2 "$((KEEPGPU_STOP_TIMEOUT + 30))" srun --overlap \
        --nodes="$SLURM_JOB_NUM_NODES" --ntasks="$SLURM_JOB_NUM_NODES" --ntasks-per-node=1 \
        --kill-on-bad-exit=0 --job-name=keepgpu-stop "$self" _node-check "$NAME" 2>&1)
    local tag node event rc msg
    local -a seen=()
    while read -r tag node event rc _ msg; do
        [[ $tag == keepgpu-node && $event == check ]] || continue
        seen+=("$node")
        printf '%s: %s\n' "$node" "$msg"
        ((rc == 0)) || bad=1
    done <<<"$raw"
    ((${#seen[@]} == SLURM_JOB_NUM_NODES)) || bad=1
    printf 'keepgpu-job: %s: %d/%d node(s) released in %dms\n' "$NAME" "${#seen[@]}" \
        "$SLURM_JOB_NUM_NODES" "$(($(kg_now_ms) - t0))"
    return "$bad"
}

node_check() {
    # node_check NAME: after the TaskProlog ran, is this node's keeper NAME gone?
    job_context
    local name=$1 pid
    pid=$(kg_read_pidfile "$RUNDIR/$name.pid") || pid=""
    if [[ -n $pid ]] && kg_alive "$pid" && kg_is_keepgpu_proc "$pid"; then
        node_report check 1 "keeper $name (pid $pid) still runs"
    else
        node_report check 0 "released (no keeper $name)"
    fi
}
