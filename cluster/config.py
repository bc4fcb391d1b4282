"""Typed configuration of where a job runs: the Ray cluster and the workers' resources."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ClusterConfig:
    """The Ray cluster a job runs on and the resources of each training worker."""

    address: str | None = field(
        default=None,
        metadata={
            "help": "Ray cluster address (ray://host:10001 or auto); empty: RAY_ADDRESS, else an embedded local cluster"
        },
    )
    num_workers: int = field(default=1, metadata={"help": "data-parallel training workers (ranks)"})
    cpus_per_worker: float = field(default=1.0, metadata={"help": "CPUs reserved per worker"})
    gpus_per_worker: float = field(default=0.0, metadata={"help": "GPUs per worker (0: train on CPU)"})
    local_num_cpus: int = field(
        default=8,
        metadata={"help": "logical CPUs of the embedded local cluster (may exceed physical cores so actors fit)"},
    )

    def __post_init__(self) -> None:
        if self.num_workers < 1:
            raise ValueError(f"num_workers must be at least 1, got {self.num_workers}")
