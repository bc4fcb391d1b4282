"""Reward models written by ``rlhf rm``: checking a directory holds one, and scoring with it."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rlhf.data.formats import Text
from rlhf.rl.rewards.base import DEFAULT_TIMEOUT_S, RewardError, _as_reward, _check_batch

if TYPE_CHECKING:
    from transformers import PretrainedConfig


def reward_model_config(directory: Path) -> PretrainedConfig:
    """The transformers config of a reward model in ``directory``; RewardError when it holds none."""
    if not directory.is_dir():
        raise RewardError(f"config key 'reward': reward-model directory {directory} does not exist")
    if not (directory / "config.json").is_file():
        hint = ""
        if (directory / "final" / "config.json").is_file():
            hint = f"; it looks like a run directory: the trained model is {directory / 'final'}"
        elif (directory / "adapter_config.json").is_file():
            hint = "; it holds a LoRA adapter only: use the merged model (train with model.lora.merge_on_save=true)"
        raise RewardError(f"config key 'reward': {directory} is not a model directory (no config.json){hint}")
    from transformers import AutoConfig

    try:
        config: PretrainedConfig = AutoConfig.from_pretrained(str(directory))
    except Exception as exc:
        raise RewardError(
            f"config key 'reward': cannot read the model config in {directory}: {type(exc).__name__}: {exc}"
        ) from None
    architectures = config.architectures or []
    if not any(name.endswith("ForSequenceClassification") for name in architectures):
        held = ", ".join(architectures) or "a model of no recorded architecture"
        raise RewardError(
            f"config key 'reward': {directory} holds {held}, not a reward model "
            "(a ...ForSequenceClassification model with one output, as `rlhf rm` writes)"
        )
    if config.num_labels != 1:
        raise RewardError(
            f"config key 'reward': {directory} holds a classifier with {config.num_labels} labels, "
            "not a reward model (one scalar output)"
        )
    return config


class ModelReward:
    """A reward model from ``rlhf rm`` (a local directory), frozen, scoring in batches without gradients.

    Args:
        directory: the model directory (a run's ``final/``).
        device: where the model runs (``"cpu"``, ``"cuda:0"``, ...).
        batch_size: sequences per forward pass.
        max_length: tokens per sequence, longer ones lose response tokens from the end (default: the
            model's ``max_position_embeddings``).
    """

    def __init__(
        self, directory: str | Path, device: str = "cpu", batch_size: int = 16, max_length: int | None = None
    ) -> None:
        import torch

        from rlhf.data.encode import LengthLimits
        from rlhf.models.config import ModelConfig
        from rlhf.models.loading import load_scalar_model, load_tokenizer

        self.directory = Path(directory).expanduser()
        hf_config = reward_model_config(self.directory)
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        config = ModelConfig(name_or_path=str(self.directory))
        self.tokenizer = load_tokenizer(config)
        model = load_scalar_model(config, trainable=False)
        if torch.device(device).type == "cpu":
            model = model.float()  # frozen models load in bf16 where CUDA exists; fp32 on the CPU
        # transformers types to() as functools.wraps(Module.to), whose signature takes the module first
        self.model = model.to(device)  # type: ignore[arg-type]
        self.device = device
        self.batch_size = batch_size
        self.limits = LengthLimits(max_length or getattr(hf_config, "max_position_embeddings", None) or 2048)
        self._source = f"reward model {self.directory}"

    def __repr__(self) -> str:
        return f"ModelReward({str(self.directory)!r}, device={self.device!r})"

    def encode(self, prompt: Text, response: str) -> list[int]:
        """Token ids of one pair, as ``rlhf rm`` encodes the chosen side of a preference example."""
        from rlhf.data.encode import encode_sft
        from rlhf.data.formats import LMExample

        completion: Text = response if isinstance(prompt, str) else [{"role": "assistant", "content": response}]
        return encode_sft(LMExample(prompt, completion), self.tokenizer, self.limits)["input_ids"]

    def score(
        self,
        prompts: Sequence[Text],
        responses: Sequence[str],
        timeout_s: float = DEFAULT_TIMEOUT_S,
        columns: Mapping[str, Sequence[Any]] | None = None,
    ) -> list[float]:
        """The scalar head at each sequence's last token; the model reads no other column, and ``timeout_s`` is
        not enforced (a local model)."""
        import torch

        from rlhf.data.collate import pad_batch
        from rlhf.data.errors import ChatTemplateError, DataError

        _check_batch(prompts, responses)
        sequences = []
        for row, (prompt, response) in enumerate(zip(prompts, responses, strict=True)):
            try:
                sequences.append({"input_ids": self.encode(prompt, response)})
            except (DataError, ChatTemplateError) as exc:
                raise RewardError(f"{self._source} cannot encode row {row}: {exc}") from None
        rewards: list[float] = []
        with torch.no_grad():
            for start in range(0, len(sequences), self.batch_size):
                batch = pad_batch(
                    sequences[start : start + self.batch_size], self.tokenizer.pad_token_id, ("input_ids",)
                )
                logits = self.model(
                    input_ids=batch["input_ids"].to(self.device), attention_mask=batch["attention_mask"].to(self.device)
                ).logits
                rewards += logits.squeeze(-1).float().tolist()
        return [_as_reward(value, self._source, row) for row, value in enumerate(rewards)]
