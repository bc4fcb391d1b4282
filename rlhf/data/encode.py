"""Tokenization and loss masks: canonical examples -> token id lists, and the whole pipeline (:func:`build_examples`).

Plain rows: ``tokenizer(prompt)`` (with the tokenizer's own special tokens, e.g. BOS) + ``tokenizer(completion)``
+ EOS; no chat template. Conversational rows use the tokenizer's chat template, and the trainable spans are
found generically, without ``{% generation %}`` markers (which most hub templates lack): assistant turn ``i``
spans from the tokens of ``template(messages[:i], add_generation_prompt=True)`` to the tokens of
``template(messages[:i+1])``. The template must be *prefix-consistent* (each shorter rendering is a token
prefix of the longer ones); otherwise :class:`~rlhf.data.errors.ChatTemplateError` names the tokenizer.
Inside a span, tokens after its last EOS (ChatML's ``"\\n"`` after ``<|im_end|>``) are not trained on: the
model stops at EOS and never generates them. The EOS closing a turn is trained on.

Lengths (:class:`LengthLimits`, from ``DataConfig``): the *prompt* is everything before the first trainable
token. A prompt longer than ``max_prompt_length`` is a bad row; a sequence longer than ``max_length`` is cut
from the end (``truncation="response"``; the prompt is kept whole, and a prompt that leaves no room for a
response is a bad row) or is a bad row (``truncation="error"``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, cast

from rlhf.data.collate import IGNORE_INDEX, pack_examples
from rlhf.data.errors import BadRowReport, ChatTemplateError, DataError, Source
from rlhf.data.formats import (
    REQUIRED_COLUMNS,
    Kind,
    LMExample,
    Message,
    PreferenceExample,
    PromptExample,
    Text,
    UnpairedExample,
    as_kind,
    normalise_row,
    resolve_format,
    source_field,
)
from rlhf.data.loading import Rows, column_names, load_rows

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from rlhf.data.config import DataConfig


@dataclass(frozen=True)
class LengthLimits:
    """The length slice of ``DataConfig`` (see its help texts)."""

    max_length: int
    max_prompt_length: int | None = None
    truncation: Literal["response", "error"] = "response"

    @classmethod
    def from_config(cls, config: DataConfig) -> LengthLimits:
        """The limits set in ``config``."""
        return cls(config.max_length, config.max_prompt_length, config.truncation)


# --- tokenizing one sequence ---


def _ids(tokenizer: PreTrainedTokenizerBase, text: str, special: bool = False) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def _render(tokenizer: PreTrainedTokenizerBase, messages: list[Message], generation_prompt: bool) -> str:
    if not tokenizer.chat_template:
        raise ChatTemplateError(
            f"tokenizer {tokenizer.name_or_path!r} has no chat template; conversational rows need one"
        )
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    return cast(str, text)  # untokenized: the rendered string (transformers types every form it can return)


def _eos(tokenizer: PreTrainedTokenizerBase) -> int:
    if tokenizer.eos_token_id is None:
        from rlhf.models.loading import ModelLoadError

        raise ModelLoadError(f"tokenizer {tokenizer.name_or_path!r} has no eos token; plain-text responses end with it")
    return tokenizer.eos_token_id


def _encode_plain(tokenizer: PreTrainedTokenizerBase, prompt: str, completion: str) -> tuple[list[int], list[int]]:
    """``prompt ids + completion ids + eos``; labels -100 on the prompt."""
    prompt_ids = _ids(tokenizer, prompt, special=True)
    completion_ids = [*_ids(tokenizer, completion), _eos(tokenizer)]
    return prompt_ids + completion_ids, [IGNORE_INDEX] * len(prompt_ids) + completion_ids


def _encode_conversation(
    tokenizer: PreTrainedTokenizerBase, messages: list[Message], first_trainable: int
) -> tuple[list[int], list[int]]:
    """Tokens of the rendered conversation; labels on the assistant turns from ``first_trainable`` on."""
    input_ids = _ids(tokenizer, _render(tokenizer, messages, generation_prompt=False))
    labels = [IGNORE_INDEX] * len(input_ids)
    eos = tokenizer.eos_token_id
    for i in range(first_trainable, len(messages)):
        if messages[i]["role"] != "assistant":
            continue
        before = _ids(tokenizer, _render(tokenizer, messages[:i], generation_prompt=True))
        through = _ids(tokenizer, _render(tokenizer, messages[: i + 1], generation_prompt=False))
        if through[: len(before)] != before or input_ids[: len(through)] != through:
            raise ChatTemplateError(
                f"chat template of tokenizer {tokenizer.name_or_path!r} is not prefix-consistent at message {i}: "
                "the tokens of template(messages[:i], add_generation_prompt=True) must begin those of "
                "template(messages[:i+1]), which must begin those of the whole conversation; "
                "assistant-turn masks cannot be computed with this template"
            )
        start, end = len(before), len(through)
        if eos is not None and eos in through[start:end]:
            end = start + max(j for j, t in enumerate(through[start:end]) if t == eos) + 1
        if end <= start:
            raise ChatTemplateError(
                f"chat template of tokenizer {tokenizer.name_or_path!r} renders assistant message {i} to no tokens"
            )
        labels[start:end] = input_ids[start:end]
    return input_ids, labels


def _encode_lm(tokenizer: PreTrainedTokenizerBase, prompt: Text, completion: Text) -> tuple[list[int], list[int]]:
    if isinstance(prompt, str) and isinstance(completion, str):
        return _encode_plain(tokenizer, prompt, completion)
    if isinstance(prompt, list) and isinstance(completion, list):
        return _encode_conversation(tokenizer, prompt + completion, first_trainable=len(prompt))
    raise DataError("wrong type", detail="prompt and completion must both be strings or both messages")


def _check_prompt(prompt_length: int, limits: LengthLimits) -> None:
    """A prompt must fit ``max_prompt_length`` and leave room for at least one response token."""
    if limits.max_prompt_length is not None and prompt_length > limits.max_prompt_length:
        raise DataError(
            "prompt too long",
            detail=f"{prompt_length} tokens > max_prompt_length {limits.max_prompt_length}",
            field="prompt",
        )
    if prompt_length >= limits.max_length:
        raise DataError(
            "prompt leaves no room for a response",
            detail=f"{prompt_length} prompt tokens >= max_length {limits.max_length}",
            field="prompt",
        )


def _limit(
    input_ids: list[int], labels: list[int], limits: LengthLimits, response_field: str
) -> tuple[list[int], list[int]]:
    """Apply ``limits``; the prompt is everything before the first trainable token."""
    prompt_length = next((t for t, label in enumerate(labels) if label != IGNORE_INDEX), len(labels))
    _check_prompt(prompt_length, limits)
    if len(input_ids) <= limits.max_length:
        return input_ids, labels
    if limits.truncation == "error":
        raise DataError(
            "too long",
            detail=f"{len(input_ids)} tokens > max_length {limits.max_length} (truncation='error')",
            field=response_field,
        )
    return input_ids[: limits.max_length], labels[: limits.max_length]


# --- one canonical example -> token lists ---


def encode_sft(example: LMExample, tokenizer: PreTrainedTokenizerBase, limits: LengthLimits) -> dict[str, list[int]]:
    """``{"input_ids", "labels"}`` of a supervised example; labels -100 except on the response tokens."""
    input_ids, labels = _limit(*_encode_lm(tokenizer, example.prompt, example.completion), limits, "completion")
    return {"input_ids": input_ids, "labels": labels}


def encode_preference(
    example: PreferenceExample, tokenizer: PreTrainedTokenizerBase, limits: LengthLimits
) -> dict[str, list[int]]:
    """Chosen and rejected, each encoded like SFT (prompt masked) and limited on its own."""
    encoded = {}
    for name, response in (("chosen", example.chosen), ("rejected", example.rejected)):
        input_ids, labels = _limit(*_encode_lm(tokenizer, example.prompt, response), limits, name)
        encoded[f"{name}_input_ids"], encoded[f"{name}_labels"] = input_ids, labels
    return encoded


def encode_unpaired(
    example: UnpairedExample, tokenizer: PreTrainedTokenizerBase, limits: LengthLimits
) -> dict[str, Any]:
    """``{"input_ids", "labels", "label"}``: encoded like SFT, plus the boolean label."""
    input_ids, labels = _limit(*_encode_lm(tokenizer, example.prompt, example.completion), limits, "completion")
    return {"input_ids": input_ids, "labels": labels, "label": example.label}


def encode_prompt(example: PromptExample, tokenizer: PreTrainedTokenizerBase, limits: LengthLimits) -> dict[str, Any]:
    """``{"prompt", "prompt_ids", "prompt_text"}`` for generation (:func:`build_examples` adds ``columns``).

    ``prompt`` is the prompt as the data holds it (a string, or the list of messages), which is what a reward
    scores: a reward model renders a conversation with its own chat template, as ``rlhf rm`` trained it.
    ``prompt_text`` is the policy's rendering: chat prompts with the generation prompt, plain prompts as they
    are (tokenized with the tokenizer's own special tokens into ``prompt_ids``). The prompt must fit
    ``max_prompt_length`` and leave room for a response within ``max_length``.
    """
    if isinstance(example.prompt, list):
        prompt_text = _render(tokenizer, example.prompt, generation_prompt=True)
        prompt_ids = _ids(tokenizer, prompt_text)
    else:
        prompt_text = example.prompt
        prompt_ids = _ids(tokenizer, prompt_text, special=True)
    _check_prompt(len(prompt_ids), limits)
    return {"prompt": example.prompt, "prompt_ids": prompt_ids, "prompt_text": prompt_text}


ENCODERS: dict[str, Callable[[Any, PreTrainedTokenizerBase, LengthLimits], dict[str, Any]]] = {
    "sft": encode_sft,
    "preference": encode_preference,
    "unpaired": encode_unpaired,
    "prompt": encode_prompt,
}


# --- the pipeline ---


def build_examples(
    config: DataConfig,
    tokenizer: PreTrainedTokenizerBase,
    kind: Kind,
    split: str | None = None,
    path: str | None = None,
) -> list[dict[str, Any]]:
    """Load, normalise, encode (and, for SFT with ``config.packing``, pack) a dataset.

    Args:
        config: the data config (format, lengths, bad-row policy, max_rows, packing).
        tokenizer: tokenizer of the model being trained.
        kind: ``"sft"``, ``"preference"``, ``"unpaired"`` or ``"prompt"`` (see :data:`ENCODERS` for the keys).
        split: split to read; default ``config.split``.
        path: dataset to read; default ``config.path`` (pass ``config.eval_path`` for evaluation data).

    Returns:
        Encoded examples in dataset order, at most ``config.max_rows`` (counted before packing);
        packed SFT sequences (with ``position_ids``) when ``config.packing``. A prompt example also
        holds ``columns``: the row's other columns (e.g. ``answer``), which a reward may ask for.

    Raises:
        DataError: unreadable data or, with ``on_bad_row="error"``, the first bad row (naming file, row, field).
            With ``on_bad_row="skip"`` bad rows are skipped and one :class:`SkippedRowsWarning` counts them.
        ChatTemplateError: the chat template cannot mask conversations (never skipped).
    """
    path = config.path if path is None else path
    split = config.split if split is None else split
    if config.packing and kind not in ("sft", "preference"):
        raise ValueError(f"packing is supported for sft and preference data only, not {kind}")
    report = BadRowReport(path) if config.on_bad_row == "skip" else None
    rows, source = load_rows(path, split, report=report)
    if report is not None:
        report.source = source.name
    if len(rows) == 0:
        if report is not None:
            report.warn(kept=0)
        raise DataError("no rows", detail=f"split {split!r}", source=source.name)
    limits = LengthLimits.from_config(config)
    examples = _encode_rows(rows, source, config.format, kind, tokenizer, limits, config.max_rows, report)
    if report is not None:
        report.warn(kept=len(examples))
    if not examples:
        raise DataError("no usable rows", detail=f"split {split!r}", source=source.name)
    # preference pairs stay whole: the DPO objective packs each micro-batch's sequences when it collates
    return pack_examples(examples, config.max_length) if config.packing and kind == "sft" else examples


def _encode_rows(
    rows: Rows,
    source: Source,
    requested_format: str,
    kind: Kind,
    tokenizer: PreTrainedTokenizerBase,
    limits: LengthLimits,
    max_rows: int | None,
    report: BadRowReport | None,
) -> list[dict[str, Any]]:
    """Normalise and encode rows in order until ``max_rows`` examples; bad rows raise, or go to ``report``."""
    columns = column_names(rows)
    fmt = resolve_format(columns, requested_format, kind, source.name)
    # prompts are read from a prompt column alone when there is one (other columns need not be valid)
    read_as = "prompt" if kind == "prompt" and "prompt" in columns else fmt
    encode = ENCODERS[kind]
    examples: list[dict[str, Any]] = []
    for index, row in enumerate(rows):
        if max_rows is not None and len(examples) >= max_rows:
            break
        try:
            items = as_kind(normalise_row(row, read_as, source, index), kind)
            encoded = [encode(item, tokenizer, limits) for item in items]
            if kind == "prompt":  # the row's other columns (an answer, metadata) travel with it to the reward
                columns_of_row = {k: v for k, v in row.items() if k not in REQUIRED_COLUMNS[read_as]}
                for item in encoded:
                    item["columns"] = columns_of_row
            examples += encoded
        except DataError as err:
            if err.source is None:
                err = err.located(source, index, source_field(fmt, columns, err.field) if err.field else None)
            if report is None:
                raise err from None
            report.record(err)
    return examples if max_rows is None else examples[:max_rows]
