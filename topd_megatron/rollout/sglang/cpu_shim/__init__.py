"""Import shims that let SGLang's generic torch path run on a machine without a GPU.

This directory is put on the PYTHONPATH of SGLang servers that topd starts on CPU (never on a CUDA machine, never in
the trainer). SGLang 0.5.23 imports `vllm._custom_ops.rotary_embedding` for rotary embeddings on non-CUDA devices
(srt/layers/rotary_embedding/base.py); vLLM is not installed, so `vllm/_custom_ops.py` here provides that function in
plain PyTorch. Nothing else of vLLM is provided.
"""

from pathlib import Path

SHIM_DIR = Path(__file__).parent
"""The directory to prepend to an SGLang server's PYTHONPATH on CPU."""
