"""Processes and process groups: the CPU platform layer, rank launch, torchrun/Slurm environment, model parallelism."""
