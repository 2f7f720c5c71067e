"""Placeholder package: only `vllm._custom_ops.rotary_embedding` is provided (see
topd_megatron.rollout.sglang.cpu_shim)."""
