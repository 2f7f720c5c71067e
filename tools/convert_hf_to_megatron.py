"""Convert a Hugging Face checkpoint into a topd checkpoint (Megatron distributed weights + HF config and tokenizer).

The weights go through Megatron-Bridge's mapping into a Megatron-Core GPT built at TP x PP and are saved with
dist_checkpointing (`topd_megatron.models.checkpoint.save_model`): the result loads at any TP/PP layout. Run from the
repository root:

    # one machine: starts TP*PP local ranks itself (gloo on CPU, NCCL with one GPU per rank)
    python tools/convert_hf_to_megatron.py ckpts/qwen3-4b ckpts/qwen3-4b-topd --tp 2
    # N GPUs with torchrun (world size = TP*PP)
    torchrun --nproc-per-node 8 tools/convert_hf_to_megatron.py ckpts/qwen3-30b-a3b ckpts/teacher-topd \\
        --tp 4 --pp 2 --role teacher --dtype bfloat16

Exit status: 0 on success, 2 for bad input (reported in one line before any rank starts), 1 when a rank fails.
Export back with tools/convert_megatron_to_hf.py.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

try:
    import topd_megatron  # noqa: F401 - installed (editable) in the project's environment
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PROG = "convert_hf_to_megatron"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Convert a Hugging Face checkpoint (config.json + *.safetensors + tokenizer files) into a topd"
        " checkpoint: topd_checkpoint.json, hf/ (config, generation config, tokenizer) and model/"
        " (Megatron dist_checkpointing shards, loadable at any TP/PP).",
        epilog="Without torchrun this starts TP*PP local ranks itself; under torchrun/srun (RANK set) it is one rank"
        " of the launched job. Exit status 2: bad input (one line on stderr); 1: a rank failed.",
    )
    parser.add_argument("hf_dir", metavar="HF_DIR", help="Hugging Face checkpoint directory")
    parser.add_argument("out_dir", metavar="OUT_DIR", help="topd checkpoint directory to write (must be empty)")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size to build the model at (default 1)")
    parser.add_argument("--pp", type=int, default=1, help="pipeline-parallel size to build the model at (default 1)")
    parser.add_argument(
        "--role", choices=["student", "teacher"], default="student", help="recorded in the checkpoint's metadata"
    )
    parser.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        default=None,
        help="dtype of the stored weights (default: the dtype in the HF config.json)",
    )
    parser.add_argument(
        "--pad-vocab-to-multiple-of",
        type=int,
        default=None,
        metavar="N",
        help="pad the vocabulary rows to a multiple of N*TP when TP does not divide vocab_size; runs that load the"
        " checkpoint must set the same model.pad_vocab_to_multiple_of",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists and is not empty")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds before a hung conversion is stopped")
    return parser.parse_args(argv)


def _bad_input(error: ValueError) -> int:
    print(f"{PROG}: error: {error}", file=sys.stderr)  # one line, no traceback
    return 2


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from topd_megatron.models.convert import ImportConfig, check_paths, hf_to_megatron

    try:
        cfg = ImportConfig(
            hf_dir=args.hf_dir,
            out_dir=args.out_dir,
            tp=args.tp,
            pp=args.pp,
            role=args.role,
            dtype=args.dtype,
            pad_vocab_to_multiple_of=args.pad_vocab_to_multiple_of,
            overwrite=args.overwrite,
        )
        check_paths(cfg.hf_dir, cfg.out_dir, overwrite=cfg.overwrite)  # before the slow imports below
    except ValueError as e:
        return _bad_input(e)
    from topd_megatron.distributed.launch import DistributedFailure
    from topd_megatron.logs import quiet_third_party

    quiet_third_party()
    try:
        report = hf_to_megatron(cfg, timeout=args.timeout)
    except ValueError as e:
        return _bad_input(e)
    except DistributedFailure as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    if report is not None:
        print(
            f"wrote {report['out_dir']}: {report['role']} in {report['dtype']}, converted at"
            f" TP={report['layout']['tp']} PP={report['layout']['pp']}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
