"""TOPD: trajectory-aware on-policy distillation on Megatron-Core."""
