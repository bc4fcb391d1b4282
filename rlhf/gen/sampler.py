"""The generating model on vLLM replicas (a Ray Serve application), for one command.

Every data-generation command samples through the same serving stack as RLHF's rollouts
(:mod:`serving.rollout`): :class:`Sampler` deploys the model's LLMServer replicas on the
cluster for the length of a ``with`` block, as an application of its own
(``rlhf-<role>-<id>``) unless ``sampling.app_name`` names one (a running application of
that name is then reused, the model's weights loaded into it), and sends the prompts in
waves through the deployment's handle, with a progress bar. Prompts are tokenized here exactly as RLHF
tokenizes its prompts (:func:`rlhf.data.encode.encode_prompt`: a conversation through the
model's chat template with the generation prompt, plain text with the tokenizer's special
tokens), so what a command generates is what the policy would see in training.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rlhf.data.errors import DataError
from rlhf.data.formats import Text
from rlhf.gen.config import SamplingConfig

if TYPE_CHECKING:
    from serving.deploy import RolloutDeployment

log = logging.getLogger(__name__)

_NOT_ARCHITECTURE = {"_name_or_path", "transformers_version", "torch_dtype", "dtype", "use_cache"}

MODEL_NAME = "policy"
"""The model's name inside the Serve application (the one RLHF's rollout replicas use)."""


@dataclass(frozen=True)
class Completion:
    """One sampled completion of one prompt."""

    prompt_index: int
    sample_index: int
    text: str
    finish_reason: str
    num_tokens: int


class Sampler:
    """``with Sampler(model, sampling) as sampler: sampler.generate(prompts)`` on the cluster's replicas.

    ``role`` names the application when ``sampling.app_name`` is empty (``rlhf-<role>-<id>``).
    """

    def __init__(self, model: str, sampling: SamplingConfig, role: str = "generate") -> None:
        from rlhf.jobs.rundir import run_app_name

        self.model = model
        self.sampling = sampling
        self.app_name = run_app_name(sampling.app_name, f"rlhf-{role}")
        self.tokenizer: Any = None
        self._client: Any = None
        self._deployment: RolloutDeployment | None = None

    def __enter__(self) -> Sampler:
        from rlhf.models.config import ModelConfig
        from rlhf.models.loading import load_tokenizer, resolve
        from serving.config import ServeConfig
        from serving.deploy import deploy
        from serving.replicas import RolloutError
        from serving.rollout import RolloutClient

        s = self.sampling
        path = resolve(self.model)
        self.tokenizer = load_tokenizer(ModelConfig(name_or_path=self.model))
        config = ServeConfig(
            model=path,
            model_name=MODEL_NAME,
            min_replicas=s.num_replicas,
            max_replicas=s.num_replicas,
            max_model_len=s.max_model_len,
            max_tokens_limit=s.max_model_len,
        )
        self._deployment = deploy(config, self.app_name, timeout_s=s.timeout_s)
        try:
            self._client = RolloutClient(MODEL_NAME, app_name=self.app_name)
            if self._deployment.how == "reused":
                if not Path(path).is_dir():
                    raise RolloutError(
                        f"Serve application {self.app_name!r} is running already and {self.model} is not a local "
                        "directory whose weights could be loaded into it: set sampling.app_name to a free name"
                    )
                self._client.sync_weights(path, timeout_s=s.timeout_s)
        except BaseException as exc:
            self.__exit__(type(exc), exc, exc.__traceback__)
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:

        if self._deployment is not None:
            deployment, self._deployment = self._deployment, None
            # after an error or a stop (SIGTERM, Ctrl-C) the deletion is only requested: the driver may be killed soon
            deployment.release(wait=not exc_info or exc_info[0] is None)

    def can_load(self, model: str) -> bool:
        """Whether ``model`` is a local directory of the same architecture and shapes as the served one.

        Such a model is served by loading its weights into the running replicas
        (:meth:`load_weights`, about a second) instead of starting new ones.
        """
        from rlhf.models.loading import resolve

        configs = []
        for name in (self.model, model):
            path = Path(resolve(name)) / "config.json"
            if not path.is_file():
                return False
            config = json.loads(path.read_text())
            configs.append({k: v for k, v in config.items() if k not in _NOT_ARCHITECTURE})
        return configs[0] == configs[1]

    def load_weights(self, directory: str | Path) -> None:
        """Serve the weights in ``directory`` (same architecture, safetensors) from now on."""
        from rlhf.models.loading import resolve

        self._client.sync_weights(resolve(str(directory)), timeout_s=self.sampling.timeout_s)
        self.model = str(directory)

    def encode(self, prompts: Sequence[Text], source: Any = None, rows: Sequence[int] | None = None) -> list[list[int]]:
        """Token ids of each prompt; DataError naming the row when one leaves no room for ``max_new_tokens``.

        ``source`` and ``rows`` place an error: prompt ``i`` is row ``rows[i]`` (default ``i``) of ``source``.
        """
        from rlhf.data.encode import LengthLimits, encode_prompt
        from rlhf.data.formats import PromptExample

        budget = self.sampling.max_model_len - self.sampling.max_new_tokens
        unlimited = LengthLimits(max_length=1 << 30)
        encoded = []
        for index, prompt in enumerate(prompts):
            row = index if rows is None else rows[index]
            try:
                ids = encode_prompt(PromptExample(prompt), self.tokenizer, unlimited)["prompt_ids"]
            except DataError as err:
                raise (err.located(source, row) if source is not None else err) from None
            if len(ids) > budget:
                too_long = DataError(
                    "prompt too long",
                    detail=f"{len(ids)} tokens + sampling.max_new_tokens {self.sampling.max_new_tokens} > "
                    f"sampling.max_model_len {self.sampling.max_model_len}",
                )
                raise too_long.located(source, row) if source is not None else too_long
            encoded.append(ids)
        return encoded

    def generate(
        self,
        prompt_ids: Sequence[Sequence[int]],
        n: int | None = None,
        max_new_tokens: int | None = None,
        temperature: float | None = None,
        description: str = "generate",
    ) -> list[list[Completion]]:
        """``n`` completions of each prompt (``sampling``'s settings unless given), per prompt, in order."""
        from tqdm.auto import tqdm

        from rlhf import console

        s = self.sampling
        n = n or s.n
        completions: list[list[Completion]] = []
        with tqdm(
            total=len(prompt_ids), desc=description, unit="prompt", dynamic_ncols=True, file=console.stream()
        ) as bar:
            for start in range(0, len(prompt_ids), s.chunk_prompts):
                wave = prompt_ids[start : start + s.chunk_prompts]
                samples = self._client.generate(
                    wave,
                    n=n,
                    max_tokens=max_new_tokens or s.max_new_tokens,
                    temperature=s.temperature if temperature is None else temperature,
                    top_p=s.top_p,
                    seed=s.seed + start * n,
                    timeout_s=s.timeout_s,
                )
                for i in range(len(wave)):
                    completions.append(
                        [
                            Completion(start + i, x.sample_index, x.text, x.finish_reason, len(x.token_ids))
                            for x in samples[i * n : (i + 1) * n]
                        ]
                    )
                bar.update(len(wave))
        return completions
