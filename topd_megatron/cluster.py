"""ClusterConfig: the machines a run is meant for. Read by the planner (`topd plan`), the recipes' launchers and the
Slurm scripts; training itself only uses what torchrun/srun give it (ranks, world size)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(kw_only=True, slots=True)
class ClusterConfig:
    """Nodes and GPUs of one run. Training ranks = nodes * gpus_per_node; the SGLang servers either share those GPUs
    (server nodes = 0: colocated, each server takes `ServerConfig.mem_fraction` of a GPU's memory) or get nodes of
    their own."""

    nodes: int = 1
    """Nodes running Megatron training ranks."""
    gpus_per_node: int = 8
    gpu_memory_gib: float = 80.0
    """Usable memory per GPU (H100 SXM: 80, H200: 141)."""
    gpu_peak_tflops: float = 989.0
    """Dense bf16 peak per GPU (H100/H200 SXM: 989); FP8 is taken as twice this."""
    mfu: float = 0.35
    """Model-FLOPs utilisation assumed by the planner's step-time estimate."""
    student_server_nodes: int = 0
    """Nodes dedicated to student SGLang servers (0: colocated on the training nodes)."""
    teacher_server_nodes: int = 0
    """Nodes dedicated to teacher SGLang servers (0: colocated, or no teacher server)."""

    def __post_init__(self) -> None:
        if self.nodes < 1 or self.gpus_per_node < 1:
            raise ValueError(
                f"cluster.nodes and cluster.gpus_per_node must be >= 1, got {self.nodes}, {self.gpus_per_node}"
            )
        if self.gpu_memory_gib <= 0 or self.gpu_peak_tflops <= 0 or not 0 < self.mfu <= 1:
            raise ValueError("cluster.gpu_memory_gib and gpu_peak_tflops must be > 0 and cluster.mfu in (0, 1]")
        if self.student_server_nodes < 0 or self.teacher_server_nodes < 0:
            raise ValueError("cluster.student_server_nodes and teacher_server_nodes must be >= 0")

    @property
    def training_gpus(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def total_nodes(self) -> int:
        return self.nodes + self.student_server_nodes + self.teacher_server_nodes
