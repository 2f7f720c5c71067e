"""CPU platform layer for Megatron-Core (filled in next)."""


def apply() -> bool:
    return False
