"""Judges: what scores a generated response, and which of two responses is better.

Two kinds (``judge.kind``):

* ``reward``: a reward source exactly as RLHF uses it (:func:`rlhf.rl.rewards.make_reward`:
  a reward-model directory from ``rlhf rm``, a ``module:function``, or an http(s)
  endpoint), run by ``judge.workers`` scoring actors on the cluster (the RLHF reward role's
  :class:`~rlhf.rl.workers.RewardWorker`), each scoring its share of the batch. A
  comparison is the difference of the two scores.
* ``llm``: a model answering a judging prompt on vLLM replicas (:class:`~rlhf.gen.sampler.Sampler`,
  greedy). A rating is the first group of ``judge.score_pattern`` in the answer. A
  comparison asks twice, with the responses in both orders, and averages, so a judge that
  prefers whichever comes first scores a tie rather than a win (position bias, Zheng et
  al. 2023). An answer that holds no score is ``None`` and is counted, never guessed.

A judge is a context manager: ``with open_judge(config, model, sampling) as judge``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from cluster.configtree import ConfigError
from rlhf.data.formats import Text
from rlhf.gen.config import JudgeConfig, SamplingConfig


def request_text(prompt: Text) -> str:
    """The request a prompt makes, as text: the prompt itself, or a conversation's last user turn."""
    if isinstance(prompt, str):
        return prompt
    users = [m["content"] for m in prompt if m.get("role") == "user"]
    return users[-1] if users else prompt[-1]["content"]


def parse_score(answer: str, pattern: re.Pattern[str]) -> float | None:
    """The judge's score in ``answer``: the first match's first group as a number, else None."""
    match = pattern.search(answer)
    if match is None:
        return None
    try:
        return float(match.group(1) if pattern.groups else match.group(0))
    except ValueError:
        return None


def two_order_outcome(first_in_a: float | None, first_in_b: float | None) -> float | None:
    """A comparison asked in both orders, as a margin for ``first``: +1, -1, 0 (a split), None when unparsed.

    ``first_in_a`` is the choice (1.0 = A) when ``first`` was shown as A; ``first_in_b`` the
    choice when it was shown as B. Each order votes +-1/2 for ``first``.
    """
    if first_in_a is None or first_in_b is None:
        return None
    return first_in_a + (1.0 - first_in_b) - 1.0


def parse_choice(answer: str) -> float | None:
    """1.0 when the answer picks A, 0.0 for B, None when it names neither (or both) first."""
    match = re.search(r"\b([AB])\b", answer.strip().upper())
    return None if match is None else float(match.group(1) == "A")


def check_judge(config: JudgeConfig) -> None:
    """Refuse a judge that cannot work, naming the config key, before any replica or actor starts."""
    from pathlib import Path

    from rlhf.gen.metrics import compile_answer_pattern
    from rlhf.gen.templates import placeholders
    from rlhf.rl.rewards import RewardError, make_reward, parse_reward, reward_model_config

    if config.kind == "llm":
        for key, template, needed in (
            ("judge.template", config.template, {"prompt", "response"}),
            ("judge.pairwise_template", config.pairwise_template, {"prompt", "response_a", "response_b"}),
        ):
            names = set(placeholders(template, key))
            if names != needed:
                raise ConfigError(
                    f"config key '{key}': the template must use exactly {sorted(needed)}, it uses {sorted(names)}"
                )
        compile_answer_pattern(config.score_pattern, "judge.score_pattern")
        return
    try:
        spec = parse_reward(config.reward)
        if spec.is_model:
            reward_model_config(Path(spec.source))  # the model itself loads in the actors
        else:
            make_reward(spec)
    except RewardError as exc:
        raise ConfigError(str(exc).replace("config key 'reward'", "config key 'judge.reward'")) from None


class RewardJudge:
    """A reward source on ``config.workers`` Ray actors; ``describe`` says which."""

    def __init__(self, config: JudgeConfig) -> None:
        from cluster.groups import ActorGroup
        from rlhf.rl.workers import RewardWorker

        check_judge(config)
        self.config = config
        self.group = ActorGroup(
            "judge",
            RewardWorker,
            num_actors=config.workers,
            num_cpus_per_actor=config.cpus_per_worker,
            num_gpus_per_actor=config.gpus_per_worker,
            setup_timeout_s=config.timeout_s,
            call_timeout_s=config.timeout_s,
        )
        try:
            self.describe = self.group.call(RewardWorker.build, config.reward)[0]
        except BaseException:
            self.group.kill()
            raise

    def __enter__(self) -> RewardJudge:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.group.kill()

    def score(self, prompts: Sequence[Text], responses: Sequence[str]) -> list[float | None]:
        """One score per (prompt, response), the batch split over the scoring actors."""
        from rlhf.rl.experience import split_rows
        from rlhf.rl.workers import RewardWorker

        if not responses:
            return []
        slices = split_rows(len(responses), self.group.world_size)
        shards = [(list(prompts[s]), list(responses[s])) for s in slices]
        results = self.group.call_sharded(
            RewardWorker.score, shards, self.config.timeout_s, timeout_s=self.config.timeout_s + 30
        )
        return [score for shard in results for score in shard]

    def compare(self, prompts: Sequence[Text], first: Sequence[str], second: Sequence[str]) -> list[float | None]:
        """Score of ``first`` minus score of ``second``, per prompt (positive: ``first`` is better)."""
        scores = self.score([*prompts, *prompts], [*first, *second])
        return [a - b for a, b in zip(scores[: len(first)], scores[len(first) :], strict=True)]  # type: ignore[operator]


class LLMJudge:
    """A model answering the judging prompts of ``config`` on a :class:`Sampler`."""

    def __init__(self, config: JudgeConfig, sampler: Any) -> None:
        from rlhf.gen.metrics import compile_answer_pattern

        check_judge(config)
        self.config = config
        self.sampler = sampler
        self.pattern = compile_answer_pattern(config.score_pattern, "judge.score_pattern")
        self.describe = f"LLM judge {sampler.model}"
        self.unparsed = 0

    def __enter__(self) -> LLMJudge:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.sampler.__exit__(*exc_info)

    def _ask(self, questions: list[str], description: str) -> list[str]:
        chat = getattr(self.sampler.tokenizer, "chat_template", None)
        prompts: list[Text] = [[{"role": "user", "content": q}] if chat else q for q in questions]
        answers = self.sampler.generate(
            self.sampler.encode(prompts),
            n=1,
            max_new_tokens=self.config.max_new_tokens,
            temperature=0.0,
            description=description,
        )
        return [a[0].text for a in answers]

    def score(self, prompts: Sequence[Text], responses: Sequence[str]) -> list[float | None]:
        """The judge's rating of each response (None when its answer holds no number)."""
        questions = [
            self.config.template.format(prompt=request_text(p), response=r)
            for p, r in zip(prompts, responses, strict=True)
        ]
        scores = [parse_score(answer, self.pattern) for answer in self._ask(questions, "judge")]
        self.unparsed += sum(s is None for s in scores)
        return scores

    def compare(self, prompts: Sequence[Text], first: Sequence[str], second: Sequence[str]) -> list[float | None]:
        """+1 when ``first`` is judged better in both orders, -1 when ``second`` is, 0 for a split; None unparsed."""
        template = self.config.pairwise_template
        questions = []
        for p, a, b in zip(prompts, first, second, strict=True):
            request = request_text(p)
            questions += [
                template.format(prompt=request, response_a=a, response_b=b),
                template.format(prompt=request, response_a=b, response_b=a),
            ]
        answers = [parse_choice(answer) for answer in self._ask(questions, "judge pairs")]
        outcomes = [two_order_outcome(ab, ba) for ab, ba in zip(answers[0::2], answers[1::2], strict=True)]
        self.unparsed += sum(o is None for o in outcomes)
        return outcomes


def open_judge(config: JudgeConfig, generating_model: str, sampling: SamplingConfig) -> Any:
    """The judge of ``config``: a :class:`RewardJudge`, or an :class:`LLMJudge` whose replicas start now.

    An LLM judge gets its own application, ``<sampling.app_name>-judge`` (with no
    ``sampling.app_name``, one of this run's own: ``rlhf-judge-<id>``), so that it can run
    next to the generating model's replicas, serving the judge model (default: the
    generating model).
    """
    from dataclasses import replace

    if config.kind == "reward":
        return RewardJudge(config)
    from rlhf.gen.sampler import Sampler

    judge_sampling = replace(sampling, app_name=f"{sampling.app_name}-judge" if sampling.app_name else "", n=1)
    sampler = Sampler(config.model or generating_model, judge_sampling, role="judge").__enter__()
    try:
        return LLMJudge(config, sampler)
    except BaseException:
        sampler.__exit__()
        raise
