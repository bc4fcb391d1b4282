"""``rlhf ppo``: RLHF on Ray actors, one short loop for PPO, GRPO, RLOO and REINFORCE++.

Each step reads like the algorithm (:func:`rl_step`)::

    samples    = generate(...)            # vLLM replicas on Ray Serve sample group_size responses per prompt
    experience = make_experience(...)     # policy, reference and value log-probs/values, rewards: in parallel
    advantages(...)                       # the estimator's math on the whole batch (rlhf.rl.experience)
    train_value(...)                      # ppo only: clipped value loss
    train_policy(...)                     # clipped surrogate (+ entropy, + KL when it is a loss term)
    sync_weights(...)                     # the new policy reaches every replica before the next step
    checkpoint(...)                       # every trainable group, the driver's state and the prompt position

The pieces live in :mod:`rlhf.rl`: the checks before the cluster is used (``preflight``), the
typed role groups (``roles``), the stages (``stages``), the replicas' deployment and weight sync
(``replicas``), checkpoints (``checkpoint``), the prompts (``prompts``); the math is
:mod:`rlhf.algos`. The critic-free estimators create no value group; without a KL term
(``kl.coefficient=0``) there is no reference group.

Failures: every group call, generation, reward and weight sync has a deadline and fails
with an error naming what failed. A role actor that dies or hangs is not fatal: the
groups are rebuilt, the last checkpoint is loaded, the replicas are re-synced and the run
goes on (up to ``train.max_failures`` times). Re-running the command resumes from the last
checkpoint too.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import torch

from rlhf import seeds
from rlhf.jobs.runner import JobError
from rlhf.rl.checkpoint import checkpoint, latest_checkpoint, restore
from rlhf.rl.config import PPOConfig
from rlhf.rl.experience import need
from rlhf.rl.preflight import Prepared, prepare
from rlhf.rl.prompts import prompts_for_step
from rlhf.rl.replicas import POLICY_MODEL_NAME, deploy_rollouts, sync_weights
from rlhf.rl.roles import Roles, build_roles
from rlhf.rl.stages import (
    STAGES,
    StageTimer,
    advantages,
    evaluate,
    generate,
    make_experience,
    summarize,
    train_policy,
    train_value,
)

if TYPE_CHECKING:
    from rlhf.jobs.progress import RunLog

PANELS = [
    ("train", "reward_mean"),
    ("eval", "eval_reward"),
    ("train", "kl"),
    ("train", "entropy"),
    ("train", "clip_fraction"),
    ("train", "approx_kl"),
    ("train", "value_loss"),
    ("train", "explained_variance"),
    ("train", "response_length"),
    ("train", "tokens_per_second"),
    ("train", "logprob_gap_mean"),
    ("train", "time/step"),
]


def rl_step(step: int, roles: Roles, run: Run) -> tuple[dict[str, float], StageTimer]:
    """One RL step (0-based ``step``): generate, experience, advantages, value, policy, sync."""
    config, prompts, timer = run.config, run.prepared.prompts, StageTimer()
    r = config.rollout
    chosen = [prompts[i] for i in prompts_for_step(len(prompts), step, r.prompts_per_step, config.data.shuffle_seed)]
    with timer("generate"):
        samples = generate(run.client, chosen, config, seed=seeds.generation(config.train.seed, step))
    with timer("experience"):
        experience, components = make_experience(roles, samples, chosen, config, run.prepared.pad_token_id)
        experience, metrics = advantages(experience, config, run.kl_coef)
    with timer("train_value"):
        metrics |= train_value(roles, experience, config, step)
    with timer("train_policy"):
        metrics |= train_policy(roles, experience, config, step, run.kl_coef)
    with timer("sync"):
        sync_weights(roles, run.client, run.deployment, run.weights_dir, config)
    scores = need(experience.scores, "scores")
    lengths = torch.tensor([len(s.token_ids) for s in samples], dtype=torch.float32)
    generated = float(lengths.sum())
    metrics |= {
        "reward_mean": float(scores.mean()),
        "reward_std": float(scores.std()) if len(scores) > 1 else 0.0,
        **{f"reward/{name}": float(values.mean()) for name, values in components.items()},
        "response_length": float(lengths.mean()),
        "truncated_fraction": sum(s.finish_reason == "length" for s in samples) / len(samples),
        "generated_tokens": generated,
        "tokens_per_second": generated / max(timer.seconds["generate"], 1e-9),
        "kl_coef": run.kl_coef,
    }
    return metrics, timer


class Run:
    """One ``rlhf ppo`` run on its deployed replicas: the step loop, recovery, the final evaluation and export."""

    def __init__(self, config: PPOConfig, prepared: Prepared, client: Any, deployment: Any, run_log: RunLog) -> None:
        self.config, self.prepared, self.client, self.deployment = config, prepared, client, deployment
        self.run_log = run_log
        self.weights_dir = prepared.output_dir / "rollout-weights"
        self.step: int = prepared.state["step"]
        self.kl_coef: float = prepared.state["kl_coef"]
        self.roles: Roles | None = None
        self.failures = 0
        self.records: list[dict[str, Any]] = []

    def log(self, record: dict[str, Any]) -> None:
        """Keep ``record`` for the summary and write it to the run's log."""
        self.records.append(record)
        self.run_log.write([record])

    def start_roles(self) -> Roles:
        """Build the role groups, load the last checkpoint if there is one (its step and KL coefficient are the
        run's from then on), and sync the policy to the replicas."""
        roles = build_roles(self.config)
        try:
            resumed = latest_checkpoint(self.prepared.output_dir)
            if resumed is not None:
                restore(roles, resumed[0], self.config.roles.call_timeout_s)
            sync_weights(roles, self.client, self.deployment, self.weights_dir, self.config)
        except BaseException:
            roles.kill()
            raise
        if resumed is not None:
            self.step, self.kl_coef = resumed[1]["step"], resumed[1]["kl_coef"]
        self.roles = roles
        return roles

    def evaluate(self, roles: Roles) -> None:
        """Log the held-out reward at the current step (when there are held-out prompts)."""
        if self.prepared.eval_prompts:
            scores = evaluate(self.client, roles, self.prepared.eval_prompts, self.config, self.config.train.seed)
            self.log({"kind": "eval", "step": self.step, **scores})

    def train(self) -> None:
        """The steps up to ``train.max_steps``; a role group that died or hung is rebuilt from the last checkpoint."""
        from cluster.group_errors import GroupError

        while self.step < self.config.steps:
            try:
                roles = self.roles
                if roles is None:
                    roles = self.start_roles()
                    if self.step == 0 and not any(x["kind"] == "eval" for x in self.records):
                        self.evaluate(roles)
                started = time.perf_counter()
                metrics, timer = rl_step(self.step, roles, self)
                self.log(self.close_step(metrics, timer, roles, started))
                self.step += 1
            except GroupError as error:
                self.recover(error)

    def close_step(self, metrics: dict[str, float], timer: StageTimer, roles: Roles, started: float) -> dict[str, Any]:
        """After the step: the KL coefficient for the next step, a checkpoint when one is due, and the step's record."""
        from rlhf.algos import adaptive_kl_coefficient

        config, done = self.config, self.step + 1
        if config.kl.target is not None:
            self.kl_coef = adaptive_kl_coefficient(
                self.kl_coef, metrics["kl_sequence"], config.kl.target, config.kl.horizon, config.rows_per_step
            )
        save_every = config.train.save_every
        if done == config.train.max_steps or (save_every and done % save_every == 0):
            with timer("checkpoint"):
                position = done * config.rollout.prompts_per_step
                state = {"step": done, "kl_coef": self.kl_coef, "prompt_position": position}
                keep, timeout_s = config.train.keep_checkpoints, config.roles.call_timeout_s
                checkpoint(roles, self.prepared.output_dir, state, keep, timeout_s)
        record = {"kind": "train", "step": done, "total_steps": config.train.max_steps, **metrics}
        record |= {f"time/{name}": timer.seconds.get(name, 0.0) for name in STAGES}
        record["time/step"] = time.perf_counter() - started
        return record

    def recover(self, error: Any) -> None:
        """Drop the groups after ``error`` (a ``GroupError``) when it can be recovered from, else raise a
        :class:`JobError`."""
        config = self.config
        if error.kind not in ("died", "timeout", "broken") or self.failures >= config.train.max_failures:
            raise JobError(f"rlhf ppo failed at step {self.step + 1}: {error}") from None
        print(
            f"\n{error}\nrecovering ({self.failures + 1} of {config.train.max_failures}): rebuilding the role groups "
            "from the last checkpoint",
            flush=True,
        )
        self.failures += 1
        self.log({"kind": "failure", "step": self.step, "error": str(error)})
        if self.roles is not None:
            self.roles.kill()
        self.roles = None

    def finish(self) -> dict[str, Any]:
        """The final evaluation, the policy exported to ``final/`` (whole, or not at all), and the summary."""
        from rlhf.jobs.rundir import atomic_dir

        # resumed from a checkpoint of the last step: only the export is left to do
        roles = self.roles if self.roles is not None else self.start_roles()
        self.evaluate(roles)
        output_dir = self.prepared.output_dir
        with atomic_dir(output_dir / "final") as export_dir:
            roles.policy.export(export_dir, self.config.roles.call_timeout_s)
        return summarize(self.records, output_dir, str(output_dir / "final"), self.failures)


def run(config: PPOConfig) -> dict[str, Any]:
    """Run RLHF as configured; return a summary (rewards before and after, final model, steps, failures).

    The run holds its output directory's lock throughout. Its rollout application is
    ``rollout.app_name``, or when that is empty one named for this run (``rlhf-rollout-<id>``);
    what the run deployed is deleted when it ends, fails or is stopped (SIGTERM, which Ray's
    driver turns into ``SystemExit``, or Ctrl-C): the deletion is requested first, without
    waiting, since ``rlhf jobs stop`` kills a driver 3 s after its SIGTERM.
    """
    from cluster.connect import connect
    from cluster.group_errors import GroupError
    from rlhf.jobs.progress import RunLog
    from rlhf.jobs.rundir import run_app_name, unlock_run_directory
    from serving.rollout import RolloutClient

    prepared = prepare(config)
    r = config.rollout
    app_name = run_app_name(r.app_name, "rlhf-rollout")
    deployment = None
    current: Run | None = None
    finished = False
    try:
        connect(config.cluster)
        deployment = deploy_rollouts(config, app_name)
        postfix = ("reward_mean", "kl", "logprob_gap_mean")
        step = prepared.state["step"]
        run_log = RunLog(prepared.output_dir, config.train.max_steps, "ppo", postfix, PANELS, initial_step=step)
        current = Run(config, prepared, RolloutClient(POLICY_MODEL_NAME, app_name=app_name), deployment, run_log)
        print(
            f"ppo: estimator {config.algorithm.estimator}, reward {prepared.reward}, {r.num_replicas} rollout "
            f"replica(s) (Serve application {app_name!r}), {r.prompts_per_step} prompts x {r.group_size} samples "
            "per step",
            flush=True,
        )
        current.train()
        summary = current.finish()
        finished = True
    except GroupError as error:
        raise JobError(f"rlhf ppo failed: {error}") from None
    finally:
        try:
            if deployment is not None:
                deployment.release(wait=finished)
            if current is not None:
                if current.roles is not None:
                    current.roles.kill()
                current.run_log.close()
        finally:
            unlock_run_directory(prepared.output_dir)
    return summary
