"""Prompt templates: how a dataset row becomes a prompt for generation.

A template has a content *style* and a *layout* (:class:`~rlhf.gen.config.TemplateConfig`):

* the request is ``template`` (a Python format string) filled with the row's columns;
* ``zero_shot`` uses it alone; ``few_shot`` puts ``num_examples`` solved examples first
  (their requests filled by the same template, their answers by ``example_answer``, drawn
  per row from ``examples_path`` with a fixed seed); ``cot`` appends ``cot_trigger``;
* ``plain`` joins the parts with blank lines; ``instruction`` writes Alpaca's
  ``### Instruction:`` / ``### Response:`` blocks; ``chat`` gives ``{"role", "content"}``
  messages (an optional system turn, the examples as user/assistant turns, then the
  request), which the generating model's chat template renders.

A row whose ``prompt`` column already is a conversation (a list of messages) is used as it
is by the ``chat`` layout with the default template, so chat datasets need no template.

Errors name what is wrong and where: a template that is not a valid format string names
its config key; a placeholder that is not a column names the file and the columns it has;
a row without a value for a placeholder names the file, row and column.
"""

from __future__ import annotations

import random
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cluster.configtree import ConfigError
from rlhf import seeds
from rlhf.data.errors import DataError, Source
from rlhf.data.formats import Message, Text
from rlhf.gen.config import TemplateConfig

INSTRUCTION_BLOCK = "### Instruction:\n{request}\n\n### Response:\n"


def placeholders(template: str, key: str) -> list[str]:
    """The column names ``template`` fills, in order; ConfigError naming ``key`` when it is malformed."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ConfigError(f"config key '{key}': {template!r} is not a valid template: {exc}") from None
    names = []
    for _, name, _, _ in parsed:
        if name is None:
            continue
        if name == "" or name.isdigit():
            raise ConfigError(
                f"config key '{key}': {template!r} has a positional placeholder {{{name}}}; name a column, e.g. "
                "{prompt}"
            )
        column = name.split(".")[0].split("[")[0]
        if column not in names:
            names.append(column)
    return names


def fill(template: str, row: Mapping[str, Any], key: str, source: Source, index: int) -> str:
    """``template`` filled with ``row``; DataError naming the row (its line in JSONL) and column when it cannot be."""
    for name in placeholders(template, key):
        value = row.get(name)
        if value is None or (isinstance(value, str) and not value.strip()):
            raise DataError("no value").located(source, index, name)
        if isinstance(value, list):
            reason = (
                "is a conversation, which a text template cannot hold (use template.layout=chat, template {prompt})"
            )
            raise DataError(reason).located(source, index, name)
    try:
        return template.format_map(row)
    except (KeyError, IndexError, AttributeError, ValueError) as exc:
        raise DataError(f"cannot fill {key} {template!r}: {exc}").located(source, index) from None


def check_columns(template: str, columns: Sequence[str], key: str, source: str) -> None:
    """Refuse a template whose placeholders are not all columns of the dataset."""
    missing = [name for name in placeholders(template, key) if name not in columns]
    if missing:
        raise ConfigError(
            f"config key '{key}': {template!r} uses {', '.join('{' + m + '}' for m in missing)}, which "
            f"{source} does not have (its columns: {', '.join(columns)})"
        )


@dataclass
class PromptBuilder:
    """Builds the prompt of each row of one dataset (see the module docstring)."""

    config: TemplateConfig
    source: Source
    examples: list[tuple[str, str]]
    """The few-shot examples as (request, answer) texts."""

    def build(self, row: Mapping[str, Any], index: int) -> Text:
        """The prompt of ``row`` (row ``index`` of the source): a string, or chat messages."""
        c = self.config
        conversation = row.get("prompt") if c.template == "{prompt}" else None
        if isinstance(conversation, list):
            if c.layout != "chat":
                raise DataError("is a conversation: use template.layout=chat").located(self.source, index, "prompt")
            return self._with_system(list(conversation))
        request = fill(c.template, row, "template.template", self.source, index)
        if c.style == "cot":
            request = f"{request}\n{c.cot_trigger}"
        shots = self._draw(index)
        if c.layout == "chat":
            turns: list[Message] = []
            for example_request, answer in shots:
                turns += [{"role": "user", "content": example_request}, {"role": "assistant", "content": answer}]
            return self._with_system([*turns, {"role": "user", "content": request}])
        if c.layout == "instruction":
            blocks = [INSTRUCTION_BLOCK.format(request=q) + a for q, a in shots]
            return "\n\n".join([*blocks, INSTRUCTION_BLOCK.format(request=request)])
        return "\n\n".join([*(f"{q}\n{a}" for q, a in shots), request])

    def _draw(self, index: int) -> list[tuple[str, str]]:
        if self.config.style != "few_shot":
            return []
        rng = random.Random(seeds.position(self.config.seed, index))
        return rng.sample(self.examples, min(self.config.num_examples, len(self.examples)))

    def _with_system(self, messages: list[Message]) -> list[Message]:
        if self.config.system and not (messages and messages[0].get("role") == "system"):
            return [{"role": "system", "content": self.config.system}, *messages]
        return messages


def prompt_builder(config: TemplateConfig, columns: Sequence[str], source: Source) -> PromptBuilder:
    """A builder for a dataset with ``columns``, its template checked against them and its examples loaded."""
    from rlhf.data.loading import column_names, load_rows

    placeholders(config.example_answer, "template.example_answer")
    is_conversation_passthrough = config.template == "{prompt}" and "prompt" in columns
    if not is_conversation_passthrough:
        check_columns(config.template, columns, "template.template", source.name)
    examples: list[tuple[str, str]] = []
    if config.style == "few_shot":
        if not config.examples_path:
            raise ConfigError("config key 'template.examples_path': template.style=few_shot needs an examples file")
        rows, example_source = load_rows(config.examples_path, "train")
        if len(rows) == 0:
            raise DataError("no examples", source=example_source.name)
        example_columns = column_names(rows)
        check_columns(config.template, example_columns, "template.template", example_source.name)
        check_columns(config.example_answer, example_columns, "template.example_answer", example_source.name)
        for i, row in enumerate(rows):
            request = fill(config.template, row, "template.template", example_source, i)
            answer = fill(config.example_answer, row, "template.example_answer", example_source, i)
            examples.append((request, answer))
    return PromptBuilder(config, source, examples)
