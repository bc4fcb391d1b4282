"""What an RL run checks and loads before it touches the cluster: the config, the output directory, the prompts,
the reward on one of them, and the checkpoint to resume from."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlhf.jobs.runner import JobError
from rlhf.rl.config import PPOConfig


def check_config(config: PPOConfig) -> None:
    """Refuse settings that cannot work, naming the config key, before anything starts."""
    from rlhf.algos.estimators import estimator
    from rlhf.jobs.storage import is_uri

    rollout, algorithm, roles = config.rollout, config.algorithm, config.roles
    if estimator(algorithm.estimator).grouped and rollout.group_size < 2:
        raise JobError(
            f"rollout.group_size={rollout.group_size}: algorithm.estimator={algorithm.estimator} "
            "compares samples of a prompt and needs at least 2"
        )
    if config.train.max_steps is None:
        raise JobError("train.max_steps: rlhf ppo needs a number of steps")
    batch = config.rows_per_step
    for role, workers in (("policy", roles.policy_workers), ("value", roles.value_workers)):
        if batch % (workers * algorithm.mini_batches):
            raise JobError(
                f"roles.{role}_workers={workers} x algorithm.mini_batches={algorithm.mini_batches} must divide the "
                f"batch of rollout.prompts_per_step x rollout.group_size = {batch} sequences"
            )
    if is_uri(config.train.output_dir):
        raise JobError(
            f"train.output_dir={config.train.output_dir!r}: rlhf ppo writes to a local or shared-filesystem "
            "directory (the replicas read the synced weights from it)"
        )


def check_reward(config: PPOConfig, row: dict[str, Any]) -> str:
    """Build each reward source once in the driver and score one pair of ``row`` (a training prompt as the data
    holds it, a string or messages, with its other columns, as the reward will get them), so a wrong path, a down
    endpoint or a column the function needs and the data lacks fails now. Returns the reward's description."""
    from rlhf.rl.config import reward_terms
    from rlhf.rl.rewards import RewardError, make_reward, parse_reward, reward_model_config

    key = "rewards" if config.rewards else "reward"
    terms = reward_terms(config)
    described = []
    for term in terms:
        spec = parse_reward(term["source"])
        if spec.is_model:
            reward_model_config(Path(spec.source))  # a reward model: checked without loading it here
            described.append(f"reward model {spec.source}")
            continue
        source = make_reward(spec)
        try:
            columns = {name: [value] for name, value in row.get("columns", {}).items()}
            source.score([row["prompt"]], ["The cat is calm."], config.reward_timeout_s, columns)
        except RewardError as exc:
            raise RewardError(f"config key '{key}': {exc}") from None
        finally:
            getattr(source, "close", lambda: None)()
        described.append(repr(source))
    if not config.rewards:
        return described[0]
    return " + ".join(f"{t['weight']:g} * {d}" for t, d in zip(terms, described, strict=True))


@dataclass(frozen=True)
class Prepared:
    """What :func:`prepare` checked and loaded before the cluster is used."""

    output_dir: Path
    state: dict[str, Any]
    """The state to start from: a checkpoint's when resuming (``step``, ``kl_coef``, ``prompt_position``)."""
    prompts: list[dict[str, Any]]
    eval_prompts: list[dict[str, Any]]
    pad_token_id: int
    reward: str
    """A description of the reward, for the run's first line."""


def prepare(config: PPOConfig) -> Prepared:
    """Check everything that can be checked before the cluster is used: the config, the output directory (its run
    lock is this run's from here), the prompts, the reward on one of them, and what to resume from."""
    from rlhf.jobs.runner import prepare_output_dir, release_output_dir, write_config
    from rlhf.models.loading import load_tokenizer
    from rlhf.rl.checkpoint import latest_checkpoint
    from rlhf.rl.prompts import load_prompts

    check_config(config)
    output_dir = Path(config.train.output_dir).expanduser().resolve()
    storage = prepare_output_dir(str(output_dir))
    try:
        # final/ is renamed into place once whole and summary.json is written after it: both mean a finished run
        if (output_dir / "final").is_dir() and (output_dir / "summary.json").is_file():
            raise JobError(f"{output_dir} holds a finished run (final/, summary.json); choose another train.output_dir")
        tokenizer = load_tokenizer(config.policy)
        prompts, eval_prompts = load_prompts(config, tokenizer)
        reward = check_reward(config, prompts[0])
        write_config(config, output_dir)
        state = {"step": 0, "kl_coef": config.kl.coefficient, "prompt_position": 0}
        resumed = latest_checkpoint(output_dir, warn=True)
        if resumed is not None:
            if config.train.resume == "never":
                raise JobError(f"{output_dir} has checkpoints (resume=never): choose another train.output_dir")
            state = resumed[1]
            print(f"resuming from {resumed[0]} (step {state['step']})", flush=True)
    except BaseException:
        release_output_dir(storage)
        raise
    return Prepared(output_dir, state, prompts, eval_prompts, tokenizer.pad_token_id, reward)
