#!/usr/bin/env bash
#SBATCH --job-name=topd-tiny
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=2
#SBATCH --time=01:00:00
#SBATCH --output=topd-tiny-%j.out
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=B:USR1@300
#
# The `tiny` recipe (tiny prepared pair, the drift task, TOPD, CPU gloo ranks) as a Slurm job, with its student
# rollouts from an SGLang server that this script starts: the layout of the multi-node scripts, on one CPU node.
#
#   sbatch slurm/topd_tiny.sh                                   # from the repository root
#   TOPD_OVERRIDES="train.steps=2 eval.problems=8" sbatch --wait slurm/topd_tiny.sh
#   SBATCH_PARTITION=cpu SBATCH_ACCOUNT=myproj sbatch slurm/topd_tiny.sh   # sbatch reads SBATCH_* itself
#
# Settings (environment variables, defaults in brackets):
#   TOPD_REPO       [$SLURM_SUBMIT_DIR, the directory sbatch was run from] the repository checkout
#   TOPD_VENV       [$TOPD_REPO/.venv] its Python environment (tools/setup_env.sh makes it)
#   TOPD_OUT        [$TOPD_REPO/runs/slurm-tiny] runs go to $TOPD_OUT/tiny (resubmitting resumes it); the SGLang
#                   server's log and PID file to $TOPD_OUT/slurm-$SLURM_JOB_ID
#   TOPD_OVERRIDES  [empty] more `--set` overrides, space-separated KEY=VALUE (e.g. "train.steps=2 parallel.tp=1")
#   TOPD_NPROC_PER_NODE  [the recipe's cluster.gpus_per_node: 2] training ranks on the node
#   TOPD_SGLANG_TIMEOUT  [600] seconds for the SGLang server to become healthy
#   TOPD_MASTER_PORT     [20000 + job id % 20000] torchrun's c10d rendezvous port
#   TOPD_STOP_GRACE      [120] seconds the ranks get to finish their step and write a checkpoint after a stop signal
#                        (torchrun's --shutdown-timeout); keep it below the early warning (--signal ...@300)
#   TOPD_MAX_REQUEUES    [20] requeue at most this many times (SLURM_RESTART_COUNT); then exit 75
# Partition, account, QOS, container: SBATCH_PARTITION, SBATCH_ACCOUNT, SBATCH_QOS, SBATCH_CONTAINER (an OCI bundle
# for `sbatch --container`), read by sbatch itself; or the same sbatch options on its command line.
#
# What it does: (a) prepares the tiny pair (cached) and starts the student SGLang server
# (`python -m topd_megatron.rollout.sglang.serve`, bound to 127.0.0.1), waiting until it is healthy; (b) runs training
# with srun (one task per node) + torchrun (c10d rendezvous on the first node), attached to that server; (c) on exit,
# stops what it started, by PID; (d) exits with training's exit code.
#
# Time limits and preemption: Slurm sends this script SIGUSR1 300 s before the time limit (--signal=B:USR1@300);
# the script passes it on to training (srun forwards it to every task; torchrun, told to handle it, to its ranks),
# whose ranks finish the step in flight, write a checkpoint and RUN_DIR/requeue.json, and exit. The script then stops
# the server and requeues the job (`scontrol requeue`, --requeue); the next start resumes from the checkpoint (the
# output file is appended to). SIGTERM (scancel, the time limit itself, a preemption) is passed on the same way, with
# only Slurm's KillWait (or the partition's GraceTime) before SIGKILL. `scancel --signal=USR1 --batch JOBID` asks a
# running job to checkpoint and requeue now.
set -euo pipefail

# ---- settings ------------------------------------------------------------------------------------------------------
TOPD_REPO="${TOPD_REPO:-${SLURM_SUBMIT_DIR:-$PWD}}"
TOPD_VENV="${TOPD_VENV:-$TOPD_REPO/.venv}"
export TOPD_OUT="${TOPD_OUT:-$TOPD_REPO/runs/slurm-tiny}"  # exported: the recipe puts its run directory there
TOPD_OVERRIDES="${TOPD_OVERRIDES:-}"
TOPD_SGLANG_TIMEOUT="${TOPD_SGLANG_TIMEOUT:-600}"
job="${SLURM_JOB_ID:-0}"
TOPD_MASTER_PORT="${TOPD_MASTER_PORT:-$((20000 + job % 20000))}"
TOPD_STOP_GRACE="${TOPD_STOP_GRACE:-120}"
TOPD_MAX_REQUEUES="${TOPD_MAX_REQUEUES:-20}"
PY="$TOPD_VENV/bin/python"
cd "$TOPD_REPO"
work="$TOPD_OUT/slurm-$job"
mkdir -p "$work"
read -r -a user_overrides <<<"$TOPD_OVERRIDES"
log() { echo "[topd_tiny $(date +%H:%M:%S)] $*"; }

# ---- cleanup: stop what this script started, by PID, whatever way it ends -----------------------------------------
serve_pid=""
train_pid=""
stop_pid() {  # stop_pid PID NAME: SIGTERM, up to 60 s to exit, then SIGKILL
    local pid="$1" name="$2" i
    [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null || return 0
    log "stopping $name (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 600; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null || true
    local rc=0
    wait "$pid" 2>/dev/null || rc=$?
    log "$name stopped (exit code $rc)"
}
run_dir=""
stop_signal=""
requeue_if_stopped() {  # after a clean stop (RUN_DIR/requeue.json), or a warning before training began: requeue
    local restarts="${SLURM_RESTART_COUNT:-0}"
    if [[ -n "$run_dir" && -f "$run_dir/requeue.json" ]] || [[ "$stop_signal" == USR1 && -z "$train_pid" ]]; then
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
    stop_pid "$train_pid" training
    stop_pid "$serve_pid" "the SGLang student server"
    requeue_if_stopped
}
on_stop() {  # on_stop SIG: training finishes its step, writes a checkpoint and stops; before training, stop here
    stop_signal="$1"
    if [[ -z "$train_pid" ]]; then
        log "got SIG$1 before training started"
        exit $((128 + $(kill -l "$1")))
    fi
    log "got SIG$1: passing it on to training (finish the step, checkpoint, stop)"
    kill -"$1" "$train_pid" 2>/dev/null || true  # srun forwards it to every task
}
trap cleanup EXIT
trap 'on_stop USR1' USR1  # the early warning before the time limit (#SBATCH --signal=B:USR1@300)
trap 'on_stop TERM' TERM  # scancel / time limit / preemption
trap 'exit 130' INT

# ---- (a) the tiny pair, then the student SGLang server ------------------------------------------------------------
# `topd prepare` is cached; ranks started by torchrun do not prepare (they would race), so it runs once here.
"$PY" -m topd_megatron.cli prepare
# The student checkpoint and ranks per node, as the recipe (with the user's overrides) defines them.
read -r student nproc run_dir < <("$PY" -c '
import sys
from topd_megatron import recipes
cfg = recipes.get("tiny", sys.argv[1:])
print(cfg.student.path, cfg.cluster.gpus_per_node, cfg.run_dir)' "${user_overrides[@]}")
nproc="${TOPD_NPROC_PER_NODE:-$nproc}"
# a marker left by the previous start is stale from here on: only this start's training may ask for a requeue
rm -f "$run_dir/requeue.json"  # written by training only when it stops on a signal with a checkpoint
port="$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
rm -f "$work/student.pid"
log "starting the SGLang student server on 127.0.0.1:$port ($student); log in $work"
"$PY" -m topd_megatron.rollout.sglang.serve --role student --model "$student" --host 127.0.0.1 --port "$port" \
    --dtype float32 --log-dir "$work" --pid-file "$work/student.pid" --timeout "$TOPD_SGLANG_TIMEOUT" \
    >"$work/serve-student.out" 2>&1 &
serve_pid=$!
# serve.py writes its PID file once /health_generate answers; it exits non-zero if the server fails to start.
deadline=$((SECONDS + TOPD_SGLANG_TIMEOUT + 60))
until [[ -s "$work/student.pid" ]]; do
    if ! kill -0 "$serve_pid" 2>/dev/null || ((SECONDS > deadline)); then
        log "the SGLang student server did not become healthy:"
        tail -n 40 "$work/serve-student.out" >&2 || true
        exit 1
    fi
    sleep 1
done
log "SGLang student server healthy at http://127.0.0.1:$port (server pid $(cat "$work/student.pid"))"

# ---- (b) training: one srun task per node, each running torchrun; c10d rendezvous on the first node ---------------
MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
nodes="${SLURM_JOB_NUM_NODES:-1}"
log "training: $nodes node(s) x $nproc ranks, rendezvous $MASTER_ADDR:$TOPD_MASTER_PORT, run dir $run_dir" \
    "(restart ${SLURM_RESTART_COUNT:-0})"
# torchrun passes SIGUSR1 (and SIGTERM) on to its ranks and waits TOPD_STOP_GRACE s for them to checkpoint and exit.
srun --nodes="$nodes" --ntasks="$nodes" --ntasks-per-node=1 --kill-on-bad-exit=1 \
    "$PY" -m torch.distributed.run --nnodes="$nodes" --nproc-per-node="$nproc" \
    --rdzv-id="topd-$job" --rdzv-backend=c10d --rdzv-endpoint="$MASTER_ADDR:$TOPD_MASTER_PORT" \
    --signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 --shutdown-timeout="$TOPD_STOP_GRACE" \
    -m topd_megatron.cli train --recipe tiny \
    --set rollout=sglang --set "sglang.student.url=http://127.0.0.1:$port" \
    "${user_overrides[@]/#/--set=}" &
train_pid=$!
rc=0
while :; do  # a trapped signal interrupts `wait`: wait again until training has really exited
    wait "$train_pid" && rc=0 || rc=$?
    kill -0 "$train_pid" 2>/dev/null || break
done

# ---- (c) + (d): the EXIT trap stops the server (and requeues a stopped run); the job's exit code is training's -----
log "training exited with code $rc"
exit "$rc"
