"""Typed configuration of the data-generation and evaluation commands.

Each command's tree is composed of the same slices: ``template`` (how a dataset row becomes
a prompt), ``sampling`` (the vLLM replicas and their sampling settings), ``judge`` (what
scores a response), ``filter`` (near duplicates and low-quality rows) and ``output``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from cluster.config import ClusterConfig
from rlhf.config import DPOConfig, SFTConfig

RATING_TEMPLATE = (
    "Rate the response to the request below from 1 (bad) to 10 (excellent).\n\n"
    "Request: {prompt}\n\nResponse: {response}\n\nAnswer with the number only.\nRating:"
)
PAIRWISE_TEMPLATE = (
    "Which response answers the request better?\n\nRequest: {prompt}\n\n"
    "Response A: {response_a}\n\nResponse B: {response_b}\n\nAnswer with A or B only.\nBetter:"
)


@dataclass(frozen=True)
class TemplateConfig:
    """How a dataset row becomes a prompt: a content style and a layout."""

    style: Literal["zero_shot", "few_shot", "cot"] = field(
        default="zero_shot",
        metadata={
            "help": "zero_shot: the row's text alone; few_shot: num_examples solved examples from examples_path "
            "first; cot: a chain-of-thought trigger after the request"
        },
    )
    layout: Literal["plain", "instruction", "chat"] = field(
        default="chat",
        metadata={
            "help": "plain: the text as it is; instruction: '### Instruction: ... ### Response:' (Alpaca); chat: "
            "user (and system) messages rendered by the model's chat template"
        },
    )
    template: str = field(
        default="{prompt}",
        metadata={"help": "the request: a Python format string over the row's columns, e.g. 'Q: {question}'"},
    )
    system: str | None = field(default=None, metadata={"help": "chat layout: a system message (empty: none)"})
    examples_path: str | None = field(
        default=None, metadata={"help": "few_shot: the examples, a dataset (same forms as data.path)"}
    )
    example_answer: str = field(
        default="{completion}",
        metadata={"help": "few_shot: an example's answer, a format string over the example's columns"},
    )
    num_examples: int = field(default=3, metadata={"help": "few_shot: examples per prompt (drawn per row, seeded)"})
    cot_trigger: str = field(default="Let's think step by step.", metadata={"help": "cot: the trigger sentence"})
    seed: int = field(default=0, metadata={"help": "seed of the few-shot example draw"})

    def __post_init__(self) -> None:
        if self.num_examples < 1:
            raise ValueError(f"num_examples must be at least 1, got {self.num_examples}")


@dataclass(frozen=True)
class SamplingConfig:
    """The vLLM replicas (a Ray Serve application) that generate, and how they sample."""

    n: int = field(default=1, metadata={"help": "samples per prompt"})
    max_new_tokens: int = field(default=64, metadata={"help": "maximum generated tokens per sample"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature (0: greedy)"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling threshold"})
    seed: int = field(default=0, metadata={"help": "sampling seed (sample j of prompt i gets seed + i*n + j)"})
    num_replicas: int = field(default=1, metadata={"help": "vLLM replicas"})
    max_model_len: int = field(default=1024, metadata={"help": "context length of the replicas"})
    app_name: str = field(
        default="",
        metadata={
            "help": "Serve application of the replicas; empty: rlhf-generate-<id>, this command's own, deployed for "
            "it and deleted when it ends or is stopped; a name given here: a running application of that name is "
            "reused (its weights are replaced by the model's, which must then be a local directory), otherwise one "
            "is deployed and deleted"
        },
    )
    chunk_prompts: int = field(default=256, metadata={"help": "prompts per request wave (the progress bar's unit)"})
    timeout_s: float = field(default=600.0, metadata={"help": "deadline of one wave, and of deploying the replicas"})

    def __post_init__(self) -> None:
        for name in ("n", "max_new_tokens", "num_replicas", "chunk_prompts"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.temperature < 0:
            raise ValueError(f"temperature must not be negative, got {self.temperature}")


@dataclass(frozen=True)
class JudgeConfig:
    """What scores a response: a reward source, or an LLM answering a judging prompt."""

    kind: Literal["reward", "llm"] = field(
        default="reward", metadata={"help": "reward: a reward model, function or endpoint; llm: a judging prompt"}
    )
    reward: str = field(
        default="rlhf.data.bundled:positive_word_reward",
        metadata={"help": "kind=reward: a reward-model directory (rlhf rm), a module:function, or an http(s) URL"},
    )
    model: str | None = field(
        default=None, metadata={"help": "kind=llm: the judge model (dir or hub id; empty: the generating model)"}
    )
    template: str = field(
        default=RATING_TEMPLATE,
        metadata={"help": "kind=llm: the rating prompt, with {prompt} and {response}"},
    )
    pairwise_template: str = field(
        default=PAIRWISE_TEMPLATE,
        metadata={"help": "kind=llm: the comparison prompt (win rates), with {prompt}, {response_a}, {response_b}"},
    )
    score_pattern: str = field(
        default=r"(-?\d+(?:\.\d+)?)",
        metadata={"help": "kind=llm: regex whose first group is the score in the judge's answer"},
    )
    max_new_tokens: int = field(default=8, metadata={"help": "kind=llm: tokens of the judge's answer"})
    workers: int = field(default=1, metadata={"help": "kind=reward: scoring actors"})
    cpus_per_worker: float = field(default=1.0, metadata={"help": "kind=reward: CPUs per scoring actor"})
    gpus_per_worker: float = field(default=0.0, metadata={"help": "kind=reward: GPUs per scoring actor"})
    timeout_s: float = field(default=600.0, metadata={"help": "deadline of scoring one batch"})

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ValueError(f"workers must be at least 1, got {self.workers}")


@dataclass(frozen=True)
class FilterConfig:
    """Rows dropped before writing: near duplicates and low-quality responses."""

    dedup_threshold: float | None = field(
        default=0.8,
        metadata={
            "help": "drop a row whose text has this word-3-gram Jaccard similarity to an earlier one (empty: off)"
        },
    )
    min_words: int = field(default=1, metadata={"help": "fewest words of a response"})
    max_words: int = field(default=512, metadata={"help": "most words of a response"})
    max_repeated_ngram_share: float = field(
        default=0.5, metadata={"help": "largest share of repeated word 3-grams in a response"}
    )
    min_letter_share: float = field(default=0.5, metadata={"help": "smallest share of letters among its characters"})
    min_score: float | None = field(
        default=None, metadata={"help": "smallest judge score of a kept response, where one is judged (empty: any)"}
    )
    enabled: bool = field(default=True, metadata={"help": "apply the quality rules (false: keep every response)"})


@dataclass(frozen=True)
class DataSource:
    """The rows a command reads."""

    path: str = field(
        default="bundled:prompts",
        metadata={"help": "dataset: a hub id, a local .json/.jsonl/.parquet/.csv file, a saved dataset, bundled:NAME"},
    )
    split: str = field(default="train", metadata={"help": "split to read"})
    max_rows: int | None = field(default=None, metadata={"help": "read at most this many rows (empty: all)"})


@dataclass(frozen=True)
class GenerateConfig:
    """Batch generation over a prompts dataset with vLLM replicas on the cluster."""

    model: str = field(default="tiny", metadata={"help": "the model: a directory (a run's final/) or a hub id"})
    data: DataSource = field(default_factory=DataSource, metadata={"help": "the prompts"})
    template: TemplateConfig = field(default_factory=TemplateConfig, metadata={"help": "prompt template"})
    sampling: SamplingConfig = field(default_factory=SamplingConfig, metadata={"help": "generation"})
    output_dir: str = field(default="runs/generate", metadata={"help": "where data.jsonl and manifest.json go"})
    cluster: ClusterConfig = field(default_factory=ClusterConfig, metadata={"help": "where it runs"})


EVOLUTIONS = ("deepen", "concretise", "add_reasoning", "broaden")


@dataclass(frozen=True)
class SynthConfig:
    """Synthetic data: self-instruct, evol-instruct, or judged preference pairs."""

    mode: Literal["self_instruct", "evol_instruct", "preference"] = field(
        default="preference",
        metadata={
            "help": "self_instruct: new instruction/response pairs from seed tasks; evol_instruct: harder variants "
            "of the seed instructions; preference: sampling.n responses per prompt ranked by the judge -> "
            "prompt/chosen/rejected"
        },
    )
    model: str = field(default="tiny", metadata={"help": "the generating model"})
    data: DataSource = field(
        default_factory=DataSource,
        metadata={"help": "seed tasks (self_instruct, evol_instruct) or prompts (preference)"},
    )
    template: TemplateConfig = field(
        default_factory=TemplateConfig, metadata={"help": "preference: the prompt template over data rows"}
    )
    num_instructions: int = field(default=64, metadata={"help": "self_instruct: new instructions to propose"})
    seeds_per_prompt: int = field(default=3, metadata={"help": "self_instruct: seed tasks shown per proposal"})
    evolutions: tuple[str, ...] = field(
        default=EVOLUTIONS, metadata={"help": f"evol_instruct: operations applied, from {', '.join(EVOLUTIONS)}"}
    )
    evol_rounds: int = field(default=1, metadata={"help": "evol_instruct: rounds of evolution of each instruction"})
    min_margin: float = field(
        default=0.0, metadata={"help": "preference: drop prompts whose best and worst scores differ by no more"}
    )
    sampling: SamplingConfig = field(
        default_factory=lambda: SamplingConfig(n=4), metadata={"help": "generation (n: samples per prompt)"}
    )
    judge: JudgeConfig = field(default_factory=JudgeConfig, metadata={"help": "the judge (preference mode)"})
    filter: FilterConfig = field(default_factory=FilterConfig, metadata={"help": "dedup and quality filter"})
    output_dir: str = field(default="runs/synth", metadata={"help": "where data.jsonl and manifest.json go"})
    cluster: ClusterConfig = field(default_factory=ClusterConfig, metadata={"help": "where it runs"})

    def __post_init__(self) -> None:
        if unknown := sorted(set(self.evolutions) - set(EVOLUTIONS)):
            raise ValueError(f"evolutions: unknown {unknown}; choose from {list(EVOLUTIONS)}")
        for name in ("num_instructions", "seeds_per_prompt", "evol_rounds"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")


@dataclass(frozen=True)
class BestOfNConfig:
    """Rejection sampling: sampling.n responses per prompt, the judge's top_k kept as SFT data (then SFT)."""

    model: str = field(default="tiny", metadata={"help": "the generating model"})
    data: DataSource = field(default_factory=DataSource, metadata={"help": "the prompts"})
    template: TemplateConfig = field(default_factory=TemplateConfig, metadata={"help": "prompt template"})
    sampling: SamplingConfig = field(
        default_factory=lambda: SamplingConfig(n=8), metadata={"help": "generation (n: samples per prompt)"}
    )
    judge: JudgeConfig = field(default_factory=JudgeConfig, metadata={"help": "the reward model or judge"})
    top_k: int = field(default=1, metadata={"help": "responses kept per prompt (the best-scored)"})
    filter: FilterConfig = field(default_factory=FilterConfig, metadata={"help": "dedup and quality filter"})
    finetune: bool = field(
        default=False,
        metadata={"help": "then fine-tune the model on the kept responses (one round of expert iteration)"},
    )
    sft: SFTConfig = field(
        default_factory=SFTConfig,
        metadata={"help": "finetune: the SFT job (its model and data are set to this model and the output)"},
    )
    output_dir: str = field(default="runs/best-of-n", metadata={"help": "data.jsonl, manifest.json, sft/"})
    cluster: ClusterConfig = field(default_factory=ClusterConfig, metadata={"help": "where it runs"})

    def __post_init__(self) -> None:
        if not 1 <= self.top_k <= self.sampling.n:
            raise ValueError(f"top_k must be between 1 and sampling.n={self.sampling.n}, got {self.top_k}")


METRICS = ("exact_match", "token_f1", "format", "reward", "self_consistency", "win_rate", "accuracy")


@dataclass(frozen=True)
class EvalConfig:
    """The eval harness: generate on a dataset, score, and report."""

    model: str = field(default="tiny", metadata={"help": "the model evaluated"})
    baseline: str | None = field(
        default=None, metadata={"help": "win_rate: the model compared against (empty: no win rate)"}
    )
    data: DataSource = field(
        default_factory=lambda: DataSource(path="bundled:sft_prompt_completion", max_rows=64),
        metadata={"help": "the eval set"},
    )
    template: TemplateConfig = field(default_factory=TemplateConfig, metadata={"help": "prompt template"})
    reference: str = field(
        default="{completion}",
        metadata={
            "help": "exact_match, token_f1, self_consistency: the reference answer, a format string over columns"
        },
    )
    metrics: tuple[str, ...] = field(
        default=("exact_match", "token_f1", "reward"),
        metadata={
            "help": "from: exact_match, token_f1, format, reward, self_consistency, win_rate, accuracy "
            "(reasoning_gym:TASK data: the task's scorer)"
        },
    )
    answer_pattern: str | None = field(
        default=None,
        metadata={"help": "regex whose group is the answer inside a response (last match; empty: the whole response)"},
    )
    format_regex: str | None = field(
        default=None, metadata={"help": "format: the whole response must match this regex"}
    )
    format_schema: str | None = field(
        default=None, metadata={"help": "format: a JSON-schema file the response, parsed as JSON, must satisfy"}
    )
    sampling: SamplingConfig = field(
        default_factory=lambda: SamplingConfig(temperature=0.0),
        metadata={"help": "generation (n > 1 for self_consistency; the first sample is scored by the rest)"},
    )
    judge: JudgeConfig = field(default_factory=JudgeConfig, metadata={"help": "reward and win_rate judge"})
    output_dir: str = field(default="runs/eval", metadata={"help": "report.json, report.md, report.png, samples"})
    cluster: ClusterConfig = field(default_factory=ClusterConfig, metadata={"help": "where it runs"})

    def __post_init__(self) -> None:
        if unknown := sorted(set(self.metrics) - set(METRICS)):
            raise ValueError(f"metrics: unknown {unknown}; choose from {list(METRICS)}")
        if "win_rate" in self.metrics and not self.baseline:
            raise ValueError("metrics: win_rate needs a baseline model (set baseline)")
        if "self_consistency" in self.metrics and self.sampling.n < 2:
            raise ValueError("metrics: self_consistency needs sampling.n of at least 2 (a vote over samples)")
        if "format" in self.metrics and not (self.format_regex or self.format_schema):
            raise ValueError("metrics: format needs format_regex or format_schema")
        if "accuracy" in self.metrics and not self.data.path.startswith("reasoning_gym:"):
            raise ValueError("metrics: accuracy needs data of a reasoning-gym task (data.path=reasoning_gym:TASK)")


@dataclass(frozen=True)
class IterativeDPOConfig:
    """Online iterative DPO: each round samples the current policy, judges pairs, and trains DPO on them."""

    model: str = field(default="tiny", metadata={"help": "the starting policy"})
    rounds: int = field(default=2, metadata={"help": "generate -> judge -> DPO rounds"})
    data: DataSource = field(default_factory=DataSource, metadata={"help": "the prompts"})
    template: TemplateConfig = field(default_factory=TemplateConfig, metadata={"help": "prompt template"})
    prompts_per_round: int = field(default=128, metadata={"help": "prompts sampled per round (a fresh draw each)"})
    sampling: SamplingConfig = field(
        default_factory=lambda: SamplingConfig(n=4), metadata={"help": "generation (n: samples per prompt)"}
    )
    judge: JudgeConfig = field(default_factory=JudgeConfig, metadata={"help": "ranks the samples into pairs"})
    min_margin: float = field(default=0.0, metadata={"help": "drop pairs whose scores differ by no more"})
    filter: FilterConfig = field(
        default_factory=lambda: FilterConfig(dedup_threshold=None), metadata={"help": "quality filter of responses"}
    )
    dpo: DPOConfig = field(
        default_factory=DPOConfig,
        metadata={"help": "the DPO job of each round (its model, data and output_dir are set per round)"},
    )
    eval_data: DataSource = field(
        default_factory=lambda: DataSource(max_rows=64),
        metadata={"help": "prompts of the judged win rate against the starting policy after each round"},
    )
    output_dir: str = field(default="runs/iterative-dpo", metadata={"help": "round-N/ directories and summary"})
    cluster: ClusterConfig = field(default_factory=ClusterConfig, metadata={"help": "where it runs"})

    def __post_init__(self) -> None:
        if self.rounds < 1 or self.prompts_per_round < 1:
            raise ValueError("rounds and prompts_per_round must be at least 1")
        if self.sampling.n < 2:
            raise ValueError(f"sampling.n must be at least 2 to make pairs, got {self.sampling.n}")
