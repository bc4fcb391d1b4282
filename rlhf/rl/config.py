"""``rlhf ppo``'s configuration: the rollouts, the KL term, the algorithm, the role groups, the reward and the
whole :class:`PPOConfig` tree (the training jobs' trees are :mod:`rlhf.config`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from cluster.config import ClusterConfig
from rlhf.config import TrainConfig
from rlhf.data.config import DataConfig
from rlhf.engine import EngineConfig
from rlhf.models.config import ModelConfig
from serving.config import Compilation, EngineDtype, compilation_field, dtype_field, engine_threads_field

if TYPE_CHECKING:
    from rlhf.algos.estimators import EstimatorSettings


@dataclass(frozen=True)
class RolloutConfig:
    """Generation of rollouts by the vLLM replicas (a Ray Serve application) and the weight sync to them."""

    num_replicas: int = field(default=1, metadata={"help": "vLLM replicas generating rollouts"})
    group_size: int = field(default=4, metadata={"help": "responses sampled per prompt"})
    prompts_per_step: int = field(default=8, metadata={"help": "prompts per RL step"})
    max_new_tokens: int = field(default=32, metadata={"help": "maximum generated tokens per response"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature"})
    top_p: float = field(
        default=1.0,
        metadata={
            "help": "nucleus sampling threshold; below 1 the replicas' log-probs are those of the truncated "
            "distribution and the trainer's are not, so the logged gap (and truncated IS) include the truncation"
        },
    )
    app_name: str = field(
        default="",
        metadata={
            "help": "Serve application of the replicas; empty: rlhf-rollout-<id>, this run's own, deployed for it and "
            "deleted when it ends or is stopped; a name given here: a running application of that name is reused (and "
            "kept), otherwise one is deployed for the run and deleted at its end"
        },
    )
    max_model_len: int = field(default=1024, metadata={"help": "context length of the replicas"})
    compilation: Compilation = compilation_field()  # noqa: RUF009 (a dataclasses.field)
    dtype: EngineDtype = dtype_field()  # noqa: RUF009 (a dataclasses.field)
    engine_threads: int = engine_threads_field()
    timeout_s: float = field(default=300.0, metadata={"help": "deadline of one step's generation"})
    sync_timeout_s: float = field(default=300.0, metadata={"help": "deadline of one weight sync to every replica"})
    weight_sync: Literal["transfer", "files"] = field(
        default="transfer",
        metadata={
            "help": "how new weights reach the replicas: transfer (vLLM's weight-transfer API from the trainer's "
            "memory: NCCL on GPUs, gloo on CPUs) or files (safetensors in train.output_dir, reloaded by each replica)"
        },
    )
    truncated_is: float | None = field(
        default=None,
        metadata={
            "help": "truncated importance sampling: weight each token's loss by min(pi_trainer/pi_rollout, this "
            "cap) to correct the trainer-rollout mismatch, both at the sampling temperature (empty: off; the gap is "
            "logged either way)"
        },
    )

    def __post_init__(self) -> None:
        for name in ("num_replicas", "group_size", "prompts_per_step", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be positive, got {self.temperature}")
        if self.truncated_is is not None and self.truncated_is < 1:
            raise ValueError(f"truncated_is must be at least 1 (a cap on the ratio), got {self.truncated_is}")


@dataclass(frozen=True)
class KLConfig:
    """KL control against the reference policy."""

    coefficient: float = field(default=0.05, metadata={"help": "initial KL coefficient (0: no reference group)"})
    estimator: Literal["k1", "k2", "k3"] = field(
        default="k1",
        metadata={
            "help": "per-token KL estimator: k1 (unbiased, the usual reward penalty), k2 or k3; a KL loss term "
            "(placement=loss) needs k2 or k3, since the expected gradient of k1 is zero"
        },
    )
    placement: Literal["reward", "loss"] = field(
        default="reward",
        metadata={"help": "KL as a penalty in the reward, or as a term of the policy loss (with estimator k2 or k3)"},
    )
    target: float | None = field(default=None, metadata={"help": "adaptive coefficient target KL (empty: fixed)"})
    horizon: int = field(default=10000, metadata={"help": "adaptive controller horizon in samples"})

    def __post_init__(self) -> None:
        if self.placement == "loss" and self.estimator == "k1":
            raise ValueError(
                "kl.placement=loss with kl.estimator=k1 regularises nothing (the expected gradient of k1 is zero): "
                "set kl.estimator=k3 (or k2), or kl.placement=reward"
            )


@dataclass(frozen=True)
class PPOAlgorithmConfig:
    """The RL algorithm: advantage estimator and policy-loss settings."""

    estimator: Literal["ppo", "grpo", "rloo", "reinforce_pp"] = field(
        default="ppo",
        metadata={
            "help": "advantage estimator (the table of rlhf/algos/estimators.py); only ppo creates a value "
            "(critic) group; grpo and rloo compare the samples of a prompt"
        },
    )
    gamma: float = field(default=1.0, metadata={"help": "discount"})
    lam: float = field(default=0.95, metadata={"help": "GAE lambda (ppo)"})
    clip_low: float = field(default=0.2, metadata={"help": "policy ratio clip below 1"})
    clip_high: float = field(default=0.2, metadata={"help": "policy ratio clip above 1"})
    value_clip: float = field(default=0.2, metadata={"help": "value clip range (ppo)"})
    aggregation: Literal["token", "sequence"] = field(default="token", metadata={"help": "loss aggregation"})
    ppo_epochs: int = field(default=1, metadata={"help": "passes over each batch of experience"})
    mini_batches: int = field(
        default=1, metadata={"help": "optimizer steps per pass: the batch of experience is split into this many"}
    )
    entropy_coef: float = field(default=0.0, metadata={"help": "entropy bonus weight in the policy loss"})
    whiten_advantages: bool = field(default=True, metadata={"help": "ppo and reinforce_pp: whiten over the batch"})
    grpo_std_normalize: bool = field(default=True, metadata={"help": "grpo: divide by the group's std"})
    disable_dropout: bool = field(
        default=True,
        metadata={
            "help": "turn dropout off in the policy and value models (log-probs of the rollout policy are taken "
            "without dropout, so with it on the first update's ratios are not 1); false keeps the models' dropout"
        },
    )

    def __post_init__(self) -> None:
        if self.ppo_epochs < 1 or self.mini_batches < 1:
            raise ValueError("ppo_epochs and mini_batches must be at least 1")


PlacementStrategy = Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"]
Role = Literal["policy", "reference", "value", "reward"]


@dataclass(frozen=True)
class RolesConfig:
    """How many Ray actors each role has and where they sit."""

    policy_workers: int = field(default=1, metadata={"help": "policy ranks (data parallel, one engine)"})
    reference_workers: int = field(default=1, metadata={"help": "reference ranks (frozen)"})
    value_workers: int = field(default=1, metadata={"help": "value ranks (ppo only)"})
    reward_workers: int = field(default=1, metadata={"help": "reward ranks (frozen model, function or endpoint)"})
    colocate: Literal["none", "policy+reference", "value+reward", "policy+reference,value+reward", "all"] = field(
        default="none",
        metadata={
            "help": "roles sharing placement bundles: none (each role its own), policy+reference, value+reward, "
            "both pairs, or all roles together"
        },
    )
    policy_strategy: PlacementStrategy = field(
        default="PACK",
        metadata={
            "help": "how the policy's bundles (and those of roles colocated with it) spread over nodes: PACK (as "
            "few nodes as possible), SPREAD (over nodes where possible), STRICT_PACK (one node), STRICT_SPREAD "
            "(one node each)"
        },
    )
    reference_strategy: PlacementStrategy = field(default="PACK", metadata={"help": "the same for the reference"})
    value_strategy: PlacementStrategy = field(
        default="PACK", metadata={"help": "the same for the value model (and roles colocated with it)"}
    )
    reward_strategy: PlacementStrategy = field(default="PACK", metadata={"help": "the same for the reward"})
    cpus_per_worker: float = field(default=1.0, metadata={"help": "CPUs per bundle (shared by colocated roles)"})
    gpus_per_worker: float = field(default=0.0, metadata={"help": "GPUs per bundle (shared by colocated roles)"})
    call_timeout_s: float = field(
        default=600.0, metadata={"help": "deadline of any one call on a role group (train, log-probs, scores)"}
    )

    def __post_init__(self) -> None:
        for name in ("policy_workers", "reference_workers", "value_workers", "reward_workers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")

    def workers(self, role: Role) -> int:
        """The ranks of ``role``."""
        return {
            "policy": self.policy_workers,
            "reference": self.reference_workers,
            "value": self.value_workers,
            "reward": self.reward_workers,
        }[role]

    def strategy(self, role: Role) -> PlacementStrategy:
        """The placement strategy of ``role``'s bundles."""
        return {
            "policy": self.policy_strategy,
            "reference": self.reference_strategy,
            "value": self.value_strategy,
            "reward": self.reward_strategy,
        }[role]


@dataclass(frozen=True)
class RewardTermConfig:
    """One component of a weighted reward."""

    source: str = field(metadata={"help": "a reward-model directory, a Python function module:function, or a URL"})
    weight: float = field(default=1.0, metadata={"help": "its weight in the sum"})
    name: str | None = field(default=None, metadata={"help": "its name in the logs (empty: from the source)"})


DEFAULT_REWARD = "rlhf.data.bundled:positive_word_reward"


@dataclass(frozen=True)
class PPOConfig:
    """RLHF on Ray actors: policy, reference, reward and value groups, rollouts from vLLM replicas."""

    policy: ModelConfig = field(default_factory=ModelConfig, metadata={"help": "the policy (and reference) model"})
    reward: str = field(
        default=DEFAULT_REWARD,
        metadata={"help": "reward: a reward-model directory, a Python function module:function, or an http(s) URL"},
    )
    rewards: tuple[RewardTermConfig, ...] = field(
        default=(),
        metadata={
            "help": "several rewards summed with weights, each logged as reward/<name> (instead of reward): "
            "a list of {source, weight, name}"
        },
    )
    reward_timeout_s: float = field(default=60.0, metadata={"help": "deadline of scoring one step's responses"})
    value: ModelConfig | None = field(
        default=None, metadata={"help": "value model (empty: the reward model when reward is one, else the policy)"}
    )
    data: DataConfig = field(
        default_factory=lambda: DataConfig(path="bundled:prompts", format="prompt"),
        metadata={"help": "prompts"},
    )
    engine: EngineConfig = field(default_factory=EngineConfig, metadata={"help": "training engine of the policy"})
    value_engine: EngineConfig = field(
        default_factory=EngineConfig, metadata={"help": "training engine of the value model (ppo)"}
    )
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(output_dir="runs/ppo", max_steps=20),
        metadata={"help": "training length and outputs"},
    )
    cluster: ClusterConfig = field(default_factory=ClusterConfig, metadata={"help": "where it runs"})
    roles: RolesConfig = field(default_factory=RolesConfig, metadata={"help": "role actor groups and placement"})
    rollout: RolloutConfig = field(default_factory=RolloutConfig, metadata={"help": "rollout generation"})
    kl: KLConfig = field(default_factory=KLConfig, metadata={"help": "KL control"})
    algorithm: PPOAlgorithmConfig = field(default_factory=PPOAlgorithmConfig, metadata={"help": "RL algorithm"})

    def __post_init__(self) -> None:
        if self.rewards and self.reward != DEFAULT_REWARD:
            raise ValueError("config keys 'reward' and 'rewards' are both set: give one reward, or a weighted list")
        if self.policy.quantization != "none":
            raise ValueError(
                f"config key 'policy.quantization' is {self.policy.quantization!r}: rlhf ppo sends the policy's "
                "weights to the rollout replicas unquantized; train LoRA adapters on the full-precision base"
            )
        if self.policy.lora.enabled and self.engine.zero_stage == 3:
            raise ValueError(
                "config keys 'policy.lora.enabled' and 'engine.zero_stage=3': a LoRA policy is merged whole on one "
                "rank for the replicas; use engine.zero_stage 0-2 (its frozen base is small next to full training)"
            )

    @property
    def needs_critic(self) -> bool:
        """Whether the configured estimator needs a value (critic) role."""
        from rlhf.algos.estimators import estimator

        return estimator(self.algorithm.estimator).critic

    @property
    def steps(self) -> int:
        """``train.max_steps``, which rlhf ppo needs (:mod:`rlhf.rl.preflight` refuses a config without it)."""
        if self.train.max_steps is None:
            raise ValueError("train.max_steps: rlhf ppo needs a number of steps")
        return self.train.max_steps

    @property
    def rows_per_step(self) -> int:
        """The sequences of one RL step: ``rollout.prompts_per_step`` x ``rollout.group_size``."""
        return self.rollout.prompts_per_step * self.rollout.group_size

    @property
    def needs_reference(self) -> bool:
        """Whether a reference role computes the KL to the reference (``kl.coefficient`` above 0)."""
        return self.kl.coefficient > 0

    def estimator_settings(self) -> EstimatorSettings:
        """The numbers the estimators read, from ``algorithm`` and ``rollout.group_size``."""
        from rlhf.algos.estimators import EstimatorSettings

        a = self.algorithm
        return EstimatorSettings(
            group_size=self.rollout.group_size,
            gamma=a.gamma,
            lam=a.lam,
            whiten=a.whiten_advantages,
            grpo_std_normalize=a.grpo_std_normalize,
        )


def reward_models(config: PPOConfig) -> list[tuple[str, Path]]:
    """The reward models among the reward's terms, as ``(term name, resolved directory)``, in order.

    Raises :class:`~rlhf.rl.rewards.RewardError` (naming the config key) for a source of no accepted form.
    """
    from rlhf.rl.rewards import parse_reward

    specs = [(term["name"], parse_reward(term["source"])) for term in reward_terms(config)]
    return [(name, Path(spec.source)) for name, spec in specs if spec.is_model]


def reward_terms(config: PPOConfig) -> list[dict[str, Any]]:
    """The reward of ``config`` as ``[{"name", "source", "weight"}, ...]``: its ``rewards``, else ``reward`` alone."""
    from rlhf.rl.rewards import term_name

    given = config.rewards or (RewardTermConfig(source=config.reward),)
    terms = [{"name": t.name or term_name(t.source), "source": t.source, "weight": t.weight} for t in given]
    names = [t["name"] for t in terms]
    for i, term in enumerate(terms):
        if names.count(term["name"]) > 1:
            term["name"] = f"{term['name']}_{i}"
    return terms
