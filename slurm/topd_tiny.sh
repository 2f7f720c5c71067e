#!/usr/bin/env bash
#SBATCH --job-name=topd-tiny
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=2
#SBATCH --time=01:00:00
#SBATCH --output=topd-tiny-%j.out
#
# The `tiny` recipe (tiny prepared pair, synthetic task, TOPD, CPU gloo ranks) as a Slurm job, with its student
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
# Partition, account, QOS, container: SBATCH_PARTITION, SBATCH_ACCOUNT, SBATCH_QOS, SBATCH_CONTAINER (an OCI bundle
# for `sbatch --container`), read by sbatch itself; or the same sbatch options on its command line.
#
# What it does: (a) prepares the tiny pair (cached) and starts the student SGLang server
# (`python -m topd_megatron.rollout.sglang.serve`, bound to 127.0.0.1), waiting until it is healthy; (b) runs training
# with srun (one task per node) + torchrun (c10d rendezvous on the first node), attached to that server; (c) on exit,
# stops what it started, by PID; (d) exits with training's exit code.
set -euo pipefail

# ---- settings ------------------------------------------------------------------------------------------------------
TOPD_REPO="${TOPD_REPO:-${SLURM_SUBMIT_DIR:-$PWD}}"
TOPD_VENV="${TOPD_VENV:-$TOPD_REPO/.venv}"
export TOPD_OUT="${TOPD_OUT:-$TOPD_REPO/runs/slurm-tiny}"  # exported: the recipe puts its run directory there
TOPD_OVERRIDES="${TOPD_OVERRIDES:-}"
TOPD_SGLANG_TIMEOUT="${TOPD_SGLANG_TIMEOUT:-600}"
job="${SLURM_JOB_ID:-0}"
TOPD_MASTER_PORT="${TOPD_MASTER_PORT:-$((20000 + job % 20000))}"
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
cleanup() {
    stop_pid "$train_pid" training
    stop_pid "$serve_pid" "the SGLang student server"
}
trap cleanup EXIT
trap 'exit 143' TERM  # scancel / time limit: run the EXIT trap, exit like a SIGTERM-ed process
trap 'exit 130' INT

# ---- (a) the tiny pair, then the student SGLang server ------------------------------------------------------------
# `topd prepare` is cached; ranks started by torchrun do not prepare (they would race), so it runs once here.
"$PY" -m topd_megatron.cli prepare
# The student checkpoint and ranks per node, as the recipe (with the user's overrides) defines them.
read -r student nproc < <("$PY" -c '
import sys
from topd_megatron import recipes
cfg = recipes.get("tiny", sys.argv[1:])
print(cfg.student.path, cfg.cluster.gpus_per_node)' "${user_overrides[@]}")
nproc="${TOPD_NPROC_PER_NODE:-$nproc}"
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
log "training: $nodes node(s) x $nproc ranks, rendezvous $MASTER_ADDR:$TOPD_MASTER_PORT, run dir under $TOPD_OUT"
srun --nodes="$nodes" --ntasks="$nodes" --ntasks-per-node=1 --kill-on-bad-exit=1 \
    "$PY" -m torch.distributed.run --nnodes="$nodes" --nproc-per-node="$nproc" \
    --rdzv-id="topd-$job" --rdzv-backend=c10d --rdzv-endpoint="$MASTER_ADDR:$TOPD_MASTER_PORT" \
    -m topd_megatron.cli train --recipe tiny \
    --set rollout=sglang --set "sglang.student.url=http://127.0.0.1:$port" \
    "${user_overrides[@]/#/--set=}" &
train_pid=$!
rc=0
wait "$train_pid" || rc=$?
train_pid=""

# ---- (c) + (d): the EXIT trap stops the server; the job's exit code is training's ---------------------------------
log "training exited with code $rc"
exit "$rc"
