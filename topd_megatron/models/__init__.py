"""Model construction: HF or topd checkpoints -> Megatron-Core GPT models (student and teacher)."""
