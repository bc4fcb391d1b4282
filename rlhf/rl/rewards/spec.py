"""Reward sources from the config string: parsing a spec into its kind, and building the source it names."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from rlhf.rl.rewards.base import FORMS, RewardError, RewardSource
from rlhf.rl.rewards.function import FunctionReward
from rlhf.rl.rewards.http import HTTPReward, _without_credentials
from rlhf.rl.rewards.model import ModelReward
from rlhf.rl.rewards.weighted import WeightedReward


def make_weighted(terms: Sequence[Mapping[str, Any]], *, device: str = "cpu") -> WeightedReward:
    """A :class:`WeightedReward` of ``terms``, each ``{"name", "source", "weight"}`` (:func:`rlhf.rl.config.reward_terms`)."""
    return WeightedReward([(t["name"], make_reward(t["source"], device=device), float(t["weight"])) for t in terms])


def term_name(spec: str) -> str:
    """A short name for the reward source ``spec``, for logs: a function's name, a directory's, a URL's host."""
    if spec.lower().startswith(("http://", "https://")):
        return re.sub(r"^https?://(?:[^/@]*@)?([^/:?#]*).*$", r"\1", spec, flags=re.IGNORECASE) or "http"
    if ":" in spec and "/" not in spec:
        return spec.rsplit(":", 1)[1].rsplit(".", 1)[-1]
    path = Path(spec)
    return path.parent.name if path.name == "final" and path.parent.name else path.name or spec


@dataclass(frozen=True)
class RewardSpec:
    """A reward source as a config names it, parsed once: its kind, and the URL, directory or function."""

    kind: Literal["http", "model", "function"]
    source: str
    """The URL as given, the reward model's resolved directory, or ``package.module:function``."""

    def __repr__(self) -> str:  # a URL's credentials stay out of every log and error that shows a spec
        return f"RewardSpec({self.kind!r}, {_without_credentials(self.source)!r})"

    @property
    def is_model(self) -> bool:
        """Whether it is a reward model (which a reward rank loads, and the memory plan counts)."""
        return self.kind == "model"


def parse_reward(spec: str) -> RewardSpec:
    """What kind of reward source ``spec`` (``PPOConfig.reward``, or a term's ``source``) names.

    An http(s) URL, an existing directory (a reward model), or ``package.module:function``; anything
    else is a :class:`RewardError` listing the three forms.
    """
    forms = "; reward takes one of: " + "; ".join(FORMS)
    if spec.lower().startswith(("http://", "https://")):
        return RewardSpec("http", spec)
    if "://" in spec:
        raise RewardError(f"config key 'reward': {_without_credentials(spec)!r} is a URL but not http(s){forms}")
    path = Path(spec).expanduser()
    if path.is_dir():
        return RewardSpec("model", str(path.resolve()))
    if ":" in spec and "/" not in spec:
        return RewardSpec("function", spec)
    if "/" in spec or spec.startswith((".", "~")):
        raise RewardError(f"config key 'reward': directory {spec} does not exist{forms}")
    raise RewardError(f"config key 'reward': {spec!r} is not one of the accepted forms{forms}")


def make_reward(spec: str | RewardSpec, *, device: str = "cpu") -> RewardSource:
    """The reward source named by ``spec`` (see :func:`parse_reward`); ``device`` places a reward model."""
    parsed = parse_reward(spec) if isinstance(spec, str) else spec
    if parsed.kind == "http":
        return HTTPReward(parsed.source)
    if parsed.kind == "model":
        return ModelReward(Path(parsed.source), device=device)
    return FunctionReward(parsed.source)
