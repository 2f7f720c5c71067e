"""Training: the loop, one step in phases, forward/backward through Megatron's schedules, optimizer, teacher,
metrics."""
