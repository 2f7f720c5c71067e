#!/usr/bin/env bash
# The checks that need a GPU and cannot run in CI, on one GPU. Every step records its outcome in OUT/summary.txt
# (ok / FAILED / skipped: why) and its output in OUT/<step>.log; docs/benchmarks.md records the results.
#
#   bash tools/gpu_check.sh [OUT_DIR]          # default OUT_DIR: $OUT if set, else runs/gpu-check
#
# Steps:
#   env        nvidia-smi, torch + CUDA, and which optional packages import (megatron.core, transformer_engine, sglang)
#   loss       bench/loss.py on the GPU (T=4096 bf16, V=32768 and 151936, TP=1): the vocab-parallel loss against the
#              naive gather-then-softmax KL, time and peak memory (torch + this repository only)
#   tiny       the tiny recipe on one GPU (TP=1, 5 steps, bf16, embedded rollouts): needs megatron-core and the
#              project's dependencies (the .venv of tools/setup_env.sh, or TOPD_PYTHON pointing at such a Python)
#   tiny_fp8   the same with TransformerEngine FP8 (student tensorwise, teacher tensorwise with FP8 weights): needs TE
#   packing    tests/distributed/test_packing.py on the GPU (one rank): packed guidance windows against the per-branch
#              rows in float64 with the local attention, and the fallback (a warning, the per-branch rows) for models
#              whose attention cannot take the per-window mask; with TransformerEngine installed, also the student
#              built with the TE spec (`TOPD_PACKING_TE=1`)
#   windows    bench/window_decode.py on the GPU: 4 of Qwen3-4B's layers at its widths and vocabulary, bf16, 4 rows of
#              4,096 tokens, 64 windows of 50 tokens per row: the in-process window sampler against the planner's bound
# Environment: TOPD_PYTHON (default .venv/bin/python when present, else python3), TOPD_CACHE_DIR (where the
# prepared tiny pair is cached), TOPD_GPU_CHECK_STEPS (default 5).
# Exit status: 0 when every step that could run passed, 1 when one failed, 2 when there is no usable GPU.
set -uo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
out="${1:-${OUT:-runs/gpu-check}}"
mkdir -p "$out"
summary="$out/summary.txt"
: >"$summary"
if [[ -n "${TOPD_PYTHON:-}" ]]; then py="$TOPD_PYTHON"
elif [[ -x .venv/bin/python ]]; then py=".venv/bin/python"
else py="python3"; fi
steps="${TOPD_GPU_CHECK_STEPS:-5}"
failed=0

record() { echo "$1: $2" | tee -a "$summary"; }
run_step() {  # run_step NAME COMMAND...: run, log, record ok/FAILED with the wall time
    local name="$1" t0=$SECONDS rc
    shift
    "$@" >"$out/$name.log" 2>&1
    rc=$?
    if ((rc == 0)); then record "$name" "ok ($((SECONDS - t0)) s)"
    else record "$name" "FAILED (exit $rc after $((SECONDS - t0)) s; see $out/$name.log)"; failed=1; fi
}
importable() { "$py" -c "import $1" >/dev/null 2>&1; }
export PYTHONWARNINGS=ignore

# ---- env -----------------------------------------------------------------------------------------------------------
{
    date -u
    nvidia-smi 2>&1 || echo "nvidia-smi not found"
    "$py" - <<'PY'
import importlib, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(0), round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1), "GiB")
for mod in ("megatron.core", "megatron.bridge", "transformer_engine", "sglang", "transformers"):
    try:
        if mod == "megatron.bridge":  # imported the project's way (a TE placeholder where TE is absent)
            from topd_megatron.models.bridge_import import import_bridge

            m = import_bridge()
        else:
            m = importlib.import_module(mod)
        print(mod, getattr(m, "__version__", "importable"))
    except Exception as e:  # noqa: BLE001 - report any import failure
        print(mod, "not importable:", type(e).__name__, str(e).splitlines()[0] if str(e) else "")
PY
} >"$out/env.log" 2>&1
cat "$out/env.log"
if ! "$py" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" >/dev/null 2>&1; then
    record env "no usable GPU (torch.cuda.is_available() is false): nothing else can run"
    exit 2
fi
record env "ok ($("$py" -c 'import torch; print(torch.cuda.get_device_name(0))'))"

# ---- loss benchmark ------------------------------------------------------------------------------------------------
run_step loss "$py" bench/loss.py --device cuda --tp 1 --json
if [[ -s "$out/loss.log" ]]; then cp "$out/loss.log" "$out/loss.json"; fi

# ---- tiny recipe on one GPU -----------------------------------------------------------------------------------------
tiny_args=(--recipe tiny --set parallel.tp=1 --set "train.steps=$steps" --set eval.problems=16
    --set student.dtype=bfloat16 --set teacher.dtype=bfloat16 --set train.offload_teacher_logits=true)
if importable megatron.core && importable "topd_megatron.models.bridge_import as b; b.import_bridge()"; then
    TOPD_OUT="$out/tiny" run_step tiny "$py" -m topd_megatron.cli train "${tiny_args[@]}"
    if importable transformer_engine; then
        TOPD_OUT="$out/tiny_fp8" run_step tiny_fp8 "$py" -m topd_megatron.cli train "${tiny_args[@]}" \
            --set student.fp8=tensorwise --set teacher.fp8=tensorwise --set teacher.fp8_weights=true
    else
        record tiny_fp8 "skipped: transformer_engine is not importable with $py (FP8 needs TE with CUDA)"
    fi
else
    record tiny "skipped: megatron.core/megatron.bridge are not importable with $py (build .venv with tools/setup_env.sh)"
    record tiny_fp8 "skipped: needs the tiny step's environment and TransformerEngine"
fi

# ---- packed guidance windows on the GPU --------------------------------------------------------------------------
if importable megatron.core && importable pytest; then
    te=0
    importable transformer_engine && te=1
    TOPD_PACKING_TE="$te" run_step packing "$py" -m pytest tests/distributed/test_packing.py -x -q -k "TP1 or fall"
else
    record packing "skipped: megatron.core or pytest is not importable with $py"
fi

# ---- in-process windows against the planner's lower bound ----------------------------------------------------------
if importable megatron.core && importable "topd_megatron.models.bridge_import as b; b.import_bridge()"; then
    run_step windows "$py" bench/window_decode.py --device cuda --dtype bfloat16 --layers 4 --hidden 2560 --heads 32 \
        --kv-heads 8 --head-dim 128 --ffn 9728 --vocab 151936 --seq 4096 --rows 4 --windows 64 --window 50 \
        --markdown --json-out "$out/windows.json"
else
    record windows "skipped: megatron.core/megatron.bridge are not importable with $py"
fi
exit "$failed"
