#!/usr/bin/env bash
# ==== LAYOUT, from `topd plan topd_70b`: 8 training nodes (each also a time-sliced student server) + 10 teacher =====
# ==== server nodes (one FP8 teacher server per node) ===============================================================
#SBATCH --nodes=18
#SBATCH --gpus-per-node=8
#SBATCH --ntasks-per-node=1
#SBATCH --exclusive
# ==== end of LAYOUT (the node split below must add up to --nodes) ==================================================
#SBATCH --job-name=topd-70b
#SBATCH --time=48:00:00
#SBATCH --output=topd-70b-%j.out
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=B:USR1@900
#
# The `topd_70b` recipe as a Slurm job: student Llama-3.3-70B-Instruct distilled from Llama-3.1-405B-Instruct. The
# allocation is split into training nodes (Megatron student, torchrun on each) and teacher SGLang server nodes (the
# teacher is served only: scoring, near-future windows). The student's SGLang servers (rollouts; weights pushed to every
# one after every step) run either on the training nodes, one per node, time-sliced with training
# (sglang.colocate=time_slice: a server holds the GPUs while Megatron's states wait in host memory, and releases them
# while Megatron trains; TOPD_STUDENT_SERVER_NODES=0, the default), or on nodes of their own. Each role's servers are
# reached through an sglang-router the trainer starts (cache-aware: a rollout's windows go where its prefix is cached).
#
#   sbatch slurm/topd_70b.sh                                        # from the repository root
#   TOPD_DRY_RUN=1 bash slurm/topd_70b.sh                          # print every command, run none (no cluster needed)
#   TOPD_CKPT_DIR=/lustre/ckpts TOPD_OUT=/lustre/runs SBATCH_ACCOUNT=myproj sbatch slurm/topd_70b.sh
#
# Settings (environment variables, defaults in brackets):
#   TOPD_REPO       [$SLURM_SUBMIT_DIR, the directory sbatch was run from] the repository checkout (shared filesystem)
#   TOPD_VENV       [$TOPD_REPO/.venv] its Python environment, as seen by the tasks (inside the container if any)
#   TOPD_CKPT_DIR   [$TOPD_REPO/checkpoints] Hugging Face checkpoints, named as on the Hub
#   TOPD_DATA_DIR   [$TOPD_SHARED_DATA, else $TOPD_REPO/../shared/data] the math JSONL files (exported as
#                   TOPD_SHARED_DATA, where the task reads them)
#   TOPD_OUT        [$TOPD_REPO/runs] the run goes to $TOPD_OUT/topd_70b (resubmitting resumes it); server logs to
#                   $TOPD_OUT/slurm-$SLURM_JOB_ID
#   TOPD_RUN_DIR    [$TOPD_OUT/topd_70b] the run directory (checkpoints, metrics, requeue.json)
#   TOPD_STUDENT_MODEL / TOPD_TEACHER_MODEL  [$TOPD_CKPT_DIR/Llama-3.3-70B-Instruct / .../Llama-3.1-405B-Instruct]
#   TOPD_CONTAINER  [unset] a container image: every srun gets --container-image (pyxis/enroot), plus
#                   --container-mounts=$TOPD_CONTAINER_MOUNTS when that is set
#   TOPD_OVERRIDES  [empty] more `--set` overrides for training, space-separated KEY=VALUE
#   TOPD_SGLANG_API_KEY  [generated per job] the servers listen beyond loopback, so every request carries this key;
#                   it stays in the environment (srun passes it to the tasks; the trainer is told the variable's name,
#                   the servers get it on stdin), never on a command line
#   TOPD_STOP_GRACE [600] seconds the ranks get to finish their step and write a checkpoint after a stop signal
#                   (torchrun's --shutdown-timeout); keep it below the early warning (--signal=B:USR1@900)
#   TOPD_MAX_REQUEUES [20] requeue at most this many times (SLURM_RESTART_COUNT); then exit 75
#   TOPD_SGLANG_TIMEOUT  [1800] seconds for every server to become healthy
#   TOPD_DRY_RUN    [0] 1: print the commands (srun lines included) and exit 0 without running them
#   Ports: TOPD_MASTER_PORT [29500] (torchrun c10d rendezvous), TOPD_STUDENT_PORT [30000], TOPD_TEACHER_PORT [30001]
#          (every server of a role listens on its node at this port), TOPD_STUDENT_DIST_PORT [5000] /
#          TOPD_TEACHER_DIST_PORT [5001] (bootstrap of a server spanning several nodes).
# Partition, account, QOS, container: SBATCH_PARTITION, SBATCH_ACCOUNT, SBATCH_QOS, SBATCH_CONTAINER (an OCI bundle
# for `sbatch --container`), read by sbatch itself; or the same sbatch options on its command line.
#
# What it does: (a) starts the SGLang servers with srun (`python -m topd_megatron.rollout.sglang.serve`, one task per
# node; a server of more GPUs than a node spans nodes in SGLang's multi-node mode; time-sliced student servers share
# their training node, `srun --overlap`, and start with SGLang's memory saver) and waits until each answers
# /health_generate; (b) runs training with srun (one task per training node) + torchrun (c10d rendezvous on the first
# training node) of `topd train --recipe topd_70b`, attached to the servers (sglang.*.urls); (c) on exit, stops what it
# started by PID (srun forwards the SIGTERM to its tasks; serve.py stops its server); (d) exits with training's exit
# code.
#
# Time limits and preemption: Slurm sends this script SIGUSR1 900 s before the time limit (--signal=B:USR1@900; the
# servers are not signalled); the script passes it on to training (srun forwards it to every task; torchrun, told to
# handle it, to its ranks), whose ranks finish the step in flight, write a checkpoint and RUN_DIR/requeue.json, and
# exit. The script then stops the servers and requeues the job (`scontrol requeue`, --requeue); the next start resumes
# from the checkpoint, on the nodes it gets (checkpoints load at any TP/PP/DP). SIGTERM (scancel, the time limit
# itself, a preemption) is passed on the same way, with only Slurm's KillWait (or the partition's GraceTime) before
# SIGKILL. `scancel --signal=USR1 --batch JOBID` asks a running job to checkpoint and requeue now.
set -euo pipefail

# ==== LAYOUT (continued): the node split and the servers' parallelism, set from `topd plan topd_70b` ================
STUDENT_SERVER_NODES="${TOPD_STUDENT_SERVER_NODES:-0}"  # 0: one server per training node, time-sliced with training
STUDENT_SERVER_TP="${TOPD_STUDENT_SERVER_TP:-8}"        # tensor parallel per replica
STUDENT_SERVER_DP="${TOPD_STUDENT_SERVER_DP:-1}"        # replicas per server; a server has TP x DP GPUs
TEACHER_SERVER_NODES="${TOPD_TEACHER_SERVER_NODES:-10}" # the recipe's teacher is served (teacher_source=sglang): >= 1
TEACHER_SERVER_TP="${TOPD_TEACHER_SERVER_TP:-8}"        # a server per TP x DP GPUs (here one per node)
TEACHER_SERVER_DP="${TOPD_TEACHER_SERVER_DP:-1}"
TEACHER_SERVER_ARGS="${TOPD_TEACHER_SERVER_ARGS:---quantization fp8}"  # extra sglang.launch_server arguments
# SGLang's --mem-fraction-static: a time-sliced student server leaves room for Megatron's weights and the d_t pass
# beside it (sglang.time_slice_span=step, the recipe's 0.72); servers on nodes of their own take 0.85
STUDENT_SERVER_MEM="${TOPD_STUDENT_SERVER_MEM_FRACTION:-}"  # [0.72 time-sliced, 0.85 on its own nodes]
TEACHER_SERVER_MEM="${TOPD_TEACHER_SERVER_MEM_FRACTION:-0.85}"
GPUS_PER_NODE="${TOPD_GPUS_PER_NODE:-8}"                # training ranks per training node
# Training nodes: the rest of the allocation (TOPD_TRAIN_NODES to use fewer).
# ==== end of LAYOUT ================================================================================================

# ---- settings ------------------------------------------------------------------------------------------------------
DRY_RUN="${TOPD_DRY_RUN:-0}"
TOPD_REPO="${TOPD_REPO:-${SLURM_SUBMIT_DIR:-$PWD}}"
TOPD_VENV="${TOPD_VENV:-$TOPD_REPO/.venv}"
export TOPD_CKPT_DIR="${TOPD_CKPT_DIR:-$TOPD_REPO/checkpoints}"  # exported: the recipe reads these three
export TOPD_SHARED_DATA="${TOPD_DATA_DIR:-${TOPD_SHARED_DATA:-$TOPD_REPO/../shared/data}}"
export TOPD_OUT="${TOPD_OUT:-$TOPD_REPO/runs}"
STUDENT_MODEL="${TOPD_STUDENT_MODEL:-$TOPD_CKPT_DIR/Llama-3.3-70B-Instruct}"
TEACHER_MODEL="${TOPD_TEACHER_MODEL:-$TOPD_CKPT_DIR/Llama-3.1-405B-Instruct}"
TOPD_OVERRIDES="${TOPD_OVERRIDES:-}"
TOPD_SGLANG_TIMEOUT="${TOPD_SGLANG_TIMEOUT:-1800}"
MASTER_PORT="${TOPD_MASTER_PORT:-29500}"
STUDENT_PORT="${TOPD_STUDENT_PORT:-30000}"
TEACHER_PORT="${TOPD_TEACHER_PORT:-30001}"
STUDENT_DIST_PORT="${TOPD_STUDENT_DIST_PORT:-5000}"
TEACHER_DIST_PORT="${TOPD_TEACHER_DIST_PORT:-5001}"
RUN_DIR="${TOPD_RUN_DIR:-$TOPD_OUT/topd_70b}"
TOPD_STOP_GRACE="${TOPD_STOP_GRACE:-600}"
TOPD_MAX_REQUEUES="${TOPD_MAX_REQUEUES:-20}"
PY="$TOPD_VENV/bin/python"
job="${SLURM_JOB_ID:-dry-run}"
work="$TOPD_OUT/slurm-$job"
read -r -a user_overrides <<<"$TOPD_OVERRIDES"
read -r -a teacher_server_args <<<"$TEACHER_SERVER_ARGS"
log() { echo "[topd_70b $(date +%H:%M:%S)] $*"; }

# The API key travels in the environment (srun passes it to the tasks) and is masked in every printed command.
export TOPD_SGLANG_API_KEY="${TOPD_SGLANG_API_KEY:-$(head -c 24 /dev/urandom | base64 | tr -d '/+=')}"

# ---- run / start_bg: execute a command, or only print it in a dry run ---------------------------------------------
show() {  # the command as a shell line: arguments with special characters in single quotes, the API key masked
    local a out=()
    for a in "$@"; do
        a="${a//"$TOPD_SGLANG_API_KEY"/***}"
        if [[ "$a" =~ ^[][A-Za-z0-9_./:=,@%+-]+$ ]]; then out+=("$a"); else out+=("'${a//\'/\'\\\'\'}'"); fi
    done
    echo "${out[*]}"
}
run() {
    echo "+ $(show "$@")"
    [[ "$DRY_RUN" == 1 ]] || "$@"
}
start_bg() {  # start_bg VAR CMD...: run CMD in the background, its PID into the array VAR
    local -n pids="$1"
    shift
    echo "+ $(show "$@") &"
    if [[ "$DRY_RUN" == 1 ]]; then
        pids+=(0)
    else
        "$@" &
        pids+=($!)
    fi
}

# ---- the node split: training nodes first (the first one hosts the rendezvous), then the server nodes ----------
if [[ -n "${SLURM_JOB_NODELIST:-}" ]]; then
    mapfile -t nodes < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
else  # dry run outside an allocation: as many placeholder names as the #SBATCH --nodes line asks for
    if [[ "$DRY_RUN" != 1 ]]; then
        echo "error: not in a Slurm allocation (submit with sbatch, or set TOPD_DRY_RUN=1)" >&2
        exit 2
    fi
    n="$(sed -n 's/^#SBATCH --nodes=\([0-9]*\).*/\1/p' "${BASH_SOURCE[0]}" | head -n 1)"
    mapfile -t nodes < <(for ((i = 1; i <= n; i++)); do printf 'node%03d\n' "$i"; done)
fi
servers=$((STUDENT_SERVER_NODES + TEACHER_SERVER_NODES))
TRAIN_NODES="${TOPD_TRAIN_NODES:-$((${#nodes[@]} - servers))}"
if ((TRAIN_NODES < 1 || TEACHER_SERVER_NODES < 1 || TRAIN_NODES + servers > ${#nodes[@]})); then
    echo "error: $TRAIN_NODES training + $STUDENT_SERVER_NODES student server + $TEACHER_SERVER_NODES teacher server" \
        "nodes do not fit the ${#nodes[@]} allocated nodes (set the LAYOUT block)" >&2
    exit 2
fi
# a server takes TP x DP GPUs: whole nodes (one server per node, or one server over several nodes)
for spec in "student $((STUDENT_SERVER_NODES ? STUDENT_SERVER_NODES : TRAIN_NODES)) $STUDENT_SERVER_TP $STUDENT_SERVER_DP" \
    "teacher $TEACHER_SERVER_NODES $TEACHER_SERVER_TP $TEACHER_SERVER_DP"; do
    read -r role n tp dp <<<"$spec"
    if (((tp * dp) % GPUS_PER_NODE || n % ((tp * dp) / GPUS_PER_NODE))); then
        echo "error: $role servers of TP $tp x DP $dp = $((tp * dp)) GPUs do not tile $n nodes of $GPUS_PER_NODE" >&2
        exit 2
    fi
done
train_nodes=("${nodes[@]:0:TRAIN_NODES}")
student_nodes=("${nodes[@]:TRAIN_NODES:STUDENT_SERVER_NODES}")
teacher_nodes=("${nodes[@]:TRAIN_NODES+STUDENT_SERVER_NODES:TEACHER_SERVER_NODES}")
colocate=share
if ((STUDENT_SERVER_NODES == 0)); then  # time-sliced: the student servers run on the training nodes
    colocate=time_slice
    student_nodes=("${train_nodes[@]}")
fi
join() { local IFS=,; echo "$*"; }
MASTER_ADDR="${train_nodes[0]}"
log "nodes: training $(join "${train_nodes[@]}"); student servers ($colocate) $(join "${student_nodes[@]}");" \
    "teacher servers $(join "${teacher_nodes[@]}")"

# srun options shared by every step; a container when TOPD_CONTAINER is set.
srun_common=(--ntasks-per-node=1 --kill-on-bad-exit=1 --gpus-per-node="$GPUS_PER_NODE")
if [[ -n "${TOPD_CONTAINER:-}" ]]; then
    srun_common+=(--container-image="$TOPD_CONTAINER" --container-workdir="$TOPD_REPO")
    [[ -z "${TOPD_CONTAINER_MOUNTS:-}" ]] || srun_common+=(--container-mounts="$TOPD_CONTAINER_MOUNTS")
fi

# ---- cleanup: stop what this script started, by PID (training first, then the servers) ----------------------------
server_pids=()
train_pids=()
stop_pids() {  # stop_pids NAME PID...: SIGTERM (srun forwards it to its tasks), up to 120 s, then SIGKILL
    local name="$1" pid i
    shift
    for pid in "$@"; do
        [[ "$pid" != 0 ]] && kill -0 "$pid" 2>/dev/null || continue
        log "stopping $name (srun pid $pid)"
        kill -TERM "$pid" 2>/dev/null || true
    done
    for pid in "$@"; do
        [[ "$pid" != 0 ]] || continue
        for ((i = 0; i < 1200; i++)); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
}
stop_signal=""
requeue_if_stopped() {  # after a clean stop (RUN_DIR/requeue.json), or a warning before training began: requeue
    local restarts="${SLURM_RESTART_COUNT:-0}"
    if [[ -f "$RUN_DIR/requeue.json" ]] || [[ "$stop_signal" == USR1 && ${#train_pids[@]} -eq 0 ]]; then
        if ((restarts >= TOPD_MAX_REQUEUES)); then
            log "stopped on SIG$stop_signal; not requeued: $restarts requeues already (TOPD_MAX_REQUEUES)"
            exit 75
        fi
        log "stopped on SIG$stop_signal: requeueing job $job (restart $((restarts + 1))); it resumes from the checkpoint"
        scontrol requeue "$job" || { log "scontrol requeue failed: resubmit this script to resume"; exit 75; }
        exit 75  # this start's code is "requeued" whatever torchrun answered the signal with (it may exit 1)
    fi
}
cleanup() {
    stop_pids training "${train_pids[@]}"
    stop_pids "SGLang servers" "${server_pids[@]}"
    [[ "$DRY_RUN" == 1 ]] || requeue_if_stopped
}
on_stop() {  # on_stop SIG: training finishes its step, writes a checkpoint and stops; before training, stop here
    stop_signal="$1"
    if [[ ${#train_pids[@]} -eq 0 ]]; then
        log "got SIG$1 before training started"
        exit $((128 + $(kill -l "$1")))
    fi
    log "got SIG$1: passing it on to training (finish the step, checkpoint, stop)"
    kill -"$1" "${train_pids[0]}" 2>/dev/null || true  # srun forwards it to every task
}
trap cleanup EXIT
trap 'on_stop USR1' USR1  # the early warning before the time limit (#SBATCH --signal=B:USR1@900)
trap 'on_stop TERM' TERM  # scancel / time limit / preemption
trap 'exit 130' INT

# ---- (a) SGLang servers: one srun per server (a server of TP x DP GPUs over as many nodes), one task per node ------
# start_server ROLE MODEL PORT DIST_PORT TP DP OVERLAP MEM_FRACTION NODE... [-- EXTRA SGLANG ARGS]
start_server() {
    local role="$1" model="$2" port="$3" dist_port="$4" tp="$5" dp="$6" overlap="$7" mem="$8"
    local hosts=() extra=() shared=()
    shift 8
    while (($#)) && [[ "$1" != -- ]]; do hosts+=("$1"); shift; done
    (($#)) && { shift; extra=(-- "$@"); }
    [[ "$overlap" == 1 ]] && shared=(--overlap)  # a time-sliced server shares its node with the training step
    # one task per node: node rank = the task's rank in this step; PID file per node ($1 of the inner bash)
    # shellcheck disable=SC2016  # expanded by the task's bash, not here
    local serve_on_node='exec "$0" -m topd_megatron.rollout.sglang.serve --node-rank "$SLURM_PROCID"'
    serve_on_node+=' --pid-file "$1$SLURM_PROCID.pid" "${@:2}"'
    start_bg server_pids srun "${shared[@]}" --nodes="${#hosts[@]}" --ntasks="${#hosts[@]}" \
        --nodelist="$(join "${hosts[@]}")" --output="$work/serve-$role-${hosts[0]}-%t.out" "${srun_common[@]}" \
        bash -c "$serve_on_node" "$PY" "$work/$role-${hosts[0]}-node" \
        --role "$role" --model "$model" --host 0.0.0.0 --port "$port" --tp "$tp" --dp "$dp" --dtype bfloat16 \
        --mem-fraction "$mem" --max-total-tokens auto --timeout "$TOPD_SGLANG_TIMEOUT" --log-dir "$work" \
        --nnodes "${#hosts[@]}" --dist-init-addr "${hosts[0]}:$dist_port" "${extra[@]}"
}
# start_servers VAR ROLE MODEL PORT DIST_PORT TP DP OVERLAP MEM_FRACTION NODE... [-- EXTRA]: a server per TP x DP
# GPUs of the nodes; their URLs into the array VAR (the trainer puts an sglang-router in front of them)
start_servers() {
    local -n urls_out="$1"
    local role="$2" model="$3" port="$4" dist_port="$5" tp="$6" dp="$7" overlap="$8" mem="$9" hosts=() rest=() i per
    shift 9
    while (($#)) && [[ "$1" != -- ]]; do hosts+=("$1"); shift; done
    rest=("$@")
    per=$(((tp * dp) / GPUS_PER_NODE))
    for ((i = 0; i < ${#hosts[@]}; i += per)); do
        start_server "$role" "$model" "$port" "$dist_port" "$tp" "$dp" "$overlap" "$mem" "${hosts[@]:i:per}" \
            "${rest[@]}"
        urls_out+=("http://${hosts[i]}:$port")
    done
}
# wait_healthy ROLE URL SRUN_PID: poll /health_generate until 200; fail when srun exits or the timeout passes.
wait_healthy() {
    local role="$1" url="$2" pid="$3" deadline=$((SECONDS + TOPD_SGLANG_TIMEOUT + 120))
    echo "+ wait until $url/health_generate answers 200 (timeout ${TOPD_SGLANG_TIMEOUT}s + 120s)"
    [[ "$DRY_RUN" == 1 ]] && return
    until curl -sf -o /dev/null --max-time 60 -H @<(printf 'Authorization: Bearer %s\n' "$TOPD_SGLANG_API_KEY") \
        "$url/health_generate"; do
        if ! kill -0 "$pid" 2>/dev/null || ((SECONDS > deadline)); then
            log "the SGLang $role server at $url did not become healthy; see $work/serve-$role-*.out and its log"
            exit 1
        fi
        sleep 10
    done
    log "SGLang $role server healthy at $url"
}

run mkdir -p "$work"
# a marker left by the previous start is stale from here on: only this start's training may ask for a requeue
run rm -f "$RUN_DIR/requeue.json"  # written by training only when it stops on a signal with a checkpoint
student_urls=()
teacher_urls=()
sliced=0
student_args=()
student_mem="${STUDENT_SERVER_MEM:-0.85}"
if [[ "$colocate" == time_slice ]]; then  # SGLang's memory saver: release / resume while Megatron trains
    sliced=1
    student_args=(-- --enable-memory-saver --enable-weights-cpu-backup)
    student_mem="${STUDENT_SERVER_MEM:-0.72}"
fi
start_servers student_urls student "$STUDENT_MODEL" "$STUDENT_PORT" "$STUDENT_DIST_PORT" "$STUDENT_SERVER_TP" \
    "$STUDENT_SERVER_DP" "$sliced" "$student_mem" "${student_nodes[@]}" "${student_args[@]}"
start_servers teacher_urls teacher "$TEACHER_MODEL" "$TEACHER_PORT" "$TEACHER_DIST_PORT" "$TEACHER_SERVER_TP" \
    "$TEACHER_SERVER_DP" 0 "$TEACHER_SERVER_MEM" "${teacher_nodes[@]}" -- "${teacher_server_args[@]}"
sets=(--set rollout=sglang --set "sglang.student.urls=$(join "${student_urls[@]}")" --set "sglang.colocate=$colocate")
sets+=(--set sglang.student.api_key_env=TOPD_SGLANG_API_KEY)  # the variable's name: the key stays in the environment
sets+=(--set "sglang.student.tp=$STUDENT_SERVER_TP" --set "sglang.student.dp=$STUDENT_SERVER_DP")
sets+=(--set "sglang.sync_address=$MASTER_ADDR" --set "student.path=$STUDENT_MODEL" --set "teacher.path=$TEACHER_MODEL")
sets+=(--set sglang.teacher=default --set "sglang.teacher.urls=$(join "${teacher_urls[@]}")")
sets+=(--set sglang.teacher.api_key_env=TOPD_SGLANG_API_KEY --set "run_dir=$RUN_DIR")
i=0
for url in "${student_urls[@]}"; do wait_healthy student "$url" "${server_pids[i]}"; i=$((i + 1)); done
for url in "${teacher_urls[@]}"; do wait_healthy teacher "$url" "${server_pids[i]}"; i=$((i + 1)); done

# ---- (b) training: one srun task per training node, each running torchrun; c10d rendezvous on the first ----------
# torchrun passes SIGUSR1 (and SIGTERM) on to its ranks and waits TOPD_STOP_GRACE s for them to checkpoint and exit.
log "training: run dir $RUN_DIR (restart ${SLURM_RESTART_COUNT:-0})"
train_shared=()
((sliced)) && train_shared=(--overlap)  # the training nodes also run the time-sliced student servers
start_bg train_pids srun "${train_shared[@]}" --nodes="$TRAIN_NODES" --ntasks="$TRAIN_NODES" \
    --nodelist="$(join "${train_nodes[@]}")" "${srun_common[@]}" \
    "$PY" -m torch.distributed.run --nnodes="$TRAIN_NODES" --nproc-per-node="$GPUS_PER_NODE" \
    --rdzv-id="topd-$job" --rdzv-backend=c10d --rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT" \
    --signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 --shutdown-timeout="$TOPD_STOP_GRACE" \
    -m topd_megatron.cli train --recipe topd_70b "${sets[@]}" "${user_overrides[@]/#/--set=}"
if [[ "$DRY_RUN" == 1 ]]; then
    echo "+ on SIGUSR1/SIGTERM: pass it on to training (srun pid); after training: requeue if $RUN_DIR/requeue.json"
    echo "+ on exit: SIGTERM to the training and server srun processes (by PID), SIGKILL after 120 s"
    echo "dry run: nothing was started"
    exit 0
fi
rc=0
while :; do  # a trapped signal interrupts `wait`: wait again until training has really exited
    wait "${train_pids[0]}" && rc=0 || rc=$?
    kill -0 "${train_pids[0]}" 2>/dev/null || break
done

# ---- (c) + (d): the EXIT trap stops the servers (and requeues a stopped run); the job's exit code is training's ----
log "training exited with code $rc"
exit "$rc"
