"""Export a topd checkpoint (or a training run's checkpoint) as a Hugging Face model directory.

Megatron-Bridge gathers the TP/PP shards back to Hugging Face tensors (`AutoBridge.save_hf_pretrained`) and writes
config.json, safetensors weights, the tokenizer files and generation_config.json, loadable with transformers'
AutoModelForCausalLM / AutoTokenizer. The directory is written under a hidden sibling name and renamed into place at
the end, so an interrupted export never leaves a partial OUT_DIR. Run from the repository root:

    # a topd checkpoint (converted with tools/convert_hf_to_megatron.py): one local rank by default
    python tools/convert_megatron_to_hf.py ckpts/student-topd export/student
    # a training run (its latest checkpoint) or one step of it; --base is the run's student.path
    python tools/convert_megatron_to_hf.py runs/my-run export/student --base ckpts/qwen3-0.6b
    python tools/convert_megatron_to_hf.py runs/my-run/checkpoints/step_000030 export/s30 --base ckpts/qwen3-0.6b
    # a large model gathered on N GPUs with torchrun (world size = TP*PP)
    torchrun --nproc-per-node 8 tools/convert_megatron_to_hf.py ckpts/teacher-topd export/teacher --tp 8

Exit status: 0 on success, 2 for bad input (reported in one line before any rank starts), 1 when a rank fails.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

try:
    import topd_megatron  # noqa: F401 - installed (editable) in the project's environment
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PROG = "convert_megatron_to_hf"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=PROG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Export a topd checkpoint to a Hugging Face directory (config.json, *.safetensors, tokenizer"
        " files, generation_config.json).\n\nCKPT_DIR may be:\n"
        "  - a topd checkpoint (topd_checkpoint.json + hf/ + model/), e.g. from convert_hf_to_megatron.py;\n"
        "  - a training checkpoint RUN/checkpoints/step_NNNNNN (train_state.json + state/), needs --base;\n"
        "  - a training run directory RUN: its latest checkpoint (RUN/checkpoints/latest), needs --base.\n"
        "Training checkpoints hold weights and optimizer state but no HF config or tokenizer: --base names the HF"
        " or topd checkpoint the run's student was built from (the run config's student.path).",
        epilog="Without torchrun this starts TP*PP local ranks itself (default one); under torchrun/srun (RANK set)"
        " it is one rank of the launched job. Exit status 2: bad input (one line on stderr); 1: a rank failed.",
    )
    parser.add_argument("ckpt_dir", metavar="CKPT_DIR", help="topd checkpoint, training checkpoint or run directory")
    parser.add_argument("out_dir", metavar="OUT_DIR", help="Hugging Face directory to write (must be empty)")
    parser.add_argument(
        "--base", default=None, metavar="DIR", help="for training checkpoints: the run's student.path (HF or topd)"
    )
    parser.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        default=None,
        help="dtype of the exported weights (default: the dtype they are stored in)",
    )
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size to gather the weights on (default 1)")
    parser.add_argument("--pp", type=int, default=1, help="pipeline-parallel size to gather the weights on (default 1)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists and is not empty")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds before a hung export is stopped")
    return parser.parse_args(argv)


def _bad_input(error: ValueError) -> int:
    print(f"{PROG}: error: {error}", file=sys.stderr)  # one line, no traceback
    return 2


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from topd_megatron.models.convert import ExportConfig, check_paths, megatron_to_hf

    try:
        cfg = ExportConfig(
            source=args.ckpt_dir,
            out_dir=args.out_dir,
            base=args.base,
            dtype=args.dtype,
            tp=args.tp,
            pp=args.pp,
            overwrite=args.overwrite,
        )
        check_paths(cfg.source, cfg.out_dir, overwrite=cfg.overwrite, base=cfg.base)  # before the slow imports below
    except ValueError as e:
        return _bad_input(e)
    from topd_megatron.distributed.launch import DistributedFailure
    from topd_megatron.logs import quiet_third_party

    quiet_third_party()
    try:
        report = megatron_to_hf(cfg, timeout=args.timeout)
    except ValueError as e:
        return _bad_input(e)
    except DistributedFailure as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    if report is not None:
        print(f"wrote {report['out_dir']} ({report['dtype']}) from {report['source']}: {', '.join(report['files'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
