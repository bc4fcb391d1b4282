"""The typed configuration of the training jobs (``sft``, ``rm``, ``dpo``): one frozen tree per job, composed of
component slices. ``rlhf ppo``'s tree is :mod:`rlhf.rl.config`, the generation commands' :mod:`rlhf.gen.config`,
``rlhf serve``'s :mod:`serving.config`.

Each component receives only its own slice (``model``, ``data``, ``engine``, ``train``,
``cluster``, ...). YAML files and ``key=value`` overrides become these trees through
:mod:`cluster.configtree`, which refuses unknown keys and wrong types.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from cluster.config import ClusterConfig
from rlhf.data.config import DataConfig
from rlhf.engine import EngineConfig
from rlhf.models.config import ModelConfig

if TYPE_CHECKING:
    pass


@dataclass(frozen=True)
class TrainConfig:
    """Length of training, logging and outputs of a training job."""

    output_dir: str = field(default="runs/sft", metadata={"help": "run directory: final model, metrics, checkpoints"})
    max_steps: int | None = field(default=None, metadata={"help": "optimizer steps (empty: num_epochs over the data)"})
    num_epochs: float = field(default=1.0, metadata={"help": "passes over the training data when max_steps is empty"})
    log_every: int = field(default=1, metadata={"help": "report metrics every N optimizer steps"})
    eval_every: int | None = field(
        default=None, metadata={"help": "evaluate on held-out data every N steps (always before and after)"}
    )
    save_every: int | None = field(
        default=None, metadata={"help": "write a resumable checkpoint every N steps (always at the end)"}
    )
    keep_checkpoints: int = field(default=2, metadata={"help": "checkpoints kept (the oldest are deleted)"})
    max_failures: int = field(
        default=3, metadata={"help": "worker failures recovered from the latest checkpoint before the run fails"}
    )
    resume: Literal["auto", "never"] = field(
        default="auto",
        metadata={"help": "an output_dir with checkpoints: auto resumes from the latest; never refuses to start"},
    )
    seed: int = field(default=0, metadata={"help": "seed of model initialisation, data order and dropout"})

    def __post_init__(self) -> None:
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be at least 1, got {self.max_steps}")
        for name in ("log_every", "eval_every", "save_every", "keep_checkpoints"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")


@dataclass(frozen=True)
class SFTConfig:
    """Supervised fine-tuning: next-token loss on responses (prompt tokens masked)."""

    model: ModelConfig = field(default_factory=ModelConfig, metadata={"help": "the model to fine-tune"})
    data: DataConfig = field(default_factory=DataConfig, metadata={"help": "training data"})
    engine: EngineConfig = field(default_factory=EngineConfig, metadata={"help": "training engine"})
    train: TrainConfig = field(default_factory=TrainConfig, metadata={"help": "training length and outputs"})
    cluster: ClusterConfig = field(default_factory=ClusterConfig, metadata={"help": "where it runs"})


@dataclass(frozen=True)
class RewardLossConfig:
    """Bradley-Terry loss of a reward model."""

    margin: float = field(default=0.0, metadata={"help": "required reward margin between chosen and rejected"})
    center_rewards_coefficient: float = field(
        default=0.0, metadata={"help": "weight of a penalty on the mean squared reward (keeps rewards centred)"}
    )


@dataclass(frozen=True)
class RMConfig:
    """Reward-model training on preference pairs (Bradley-Terry)."""

    model: ModelConfig = field(default_factory=ModelConfig, metadata={"help": "base model; a scalar head is added"})
    data: DataConfig = field(
        default_factory=lambda: DataConfig(path="bundled:preference", eval_split="test"),
        metadata={"help": "preference data (prompt/chosen/rejected)"},
    )
    engine: EngineConfig = field(default_factory=EngineConfig, metadata={"help": "training engine"})
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(output_dir="runs/rm"), metadata={"help": "training length and outputs"}
    )
    cluster: ClusterConfig = field(default_factory=ClusterConfig, metadata={"help": "where it runs"})
    loss: RewardLossConfig = field(default_factory=RewardLossConfig, metadata={"help": "reward loss"})


@dataclass(frozen=True)
class PreferenceLossConfig:
    """Which DPO-family loss and its coefficients."""

    loss: Literal["dpo", "ipo", "cdpo", "simpo", "orpo", "kto"] = field(
        default="dpo", metadata={"help": "preference loss"}
    )
    beta: float = field(default=0.1, metadata={"help": "inverse temperature of the implicit reward"})
    label_smoothing: float = field(default=0.1, metadata={"help": "cdpo: assumed probability that a label is flipped"})
    simpo_gamma_beta_ratio: float = field(default=0.5, metadata={"help": "simpo: target margin gamma divided by beta"})
    desirable_weight: float = field(
        default=1.0,
        metadata={
            "help": "kto: weight of desirable examples (the paper keeps weight x count of desirable over that of "
            "undesirable in [1, 4/3])"
        },
    )
    undesirable_weight: float = field(default=1.0, metadata={"help": "kto: weight of undesirable examples"})
    reference: Literal["precomputed", "live"] = field(
        default="precomputed",
        metadata={"help": "reference log-probs computed once before training, or by a reference model held during it"},
    )


@dataclass(frozen=True)
class DPOConfig:
    """Direct preference optimisation and its family (IPO, cDPO, SimPO, ORPO, KTO)."""

    model: ModelConfig = field(default_factory=ModelConfig, metadata={"help": "policy (and reference) model"})
    data: DataConfig = field(
        default_factory=lambda: DataConfig(path="bundled:preference", eval_split="test"),
        metadata={"help": "preference data (unpaired prompt/completion/label for kto)"},
    )
    engine: EngineConfig = field(default_factory=EngineConfig, metadata={"help": "training engine"})
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(output_dir="runs/dpo"), metadata={"help": "training length and outputs"}
    )
    cluster: ClusterConfig = field(default_factory=ClusterConfig, metadata={"help": "where it runs"})
    preference: PreferenceLossConfig = field(default_factory=PreferenceLossConfig, metadata={"help": "the loss"})
