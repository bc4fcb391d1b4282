"""Row formats: recognising them from the columns and normalising rows into four canonical kinds.

Formats follow TRL's conventions; each is either *plain* (strings) or *conversational* (lists of
``{"role", "content"}`` messages):

==================  ==========================================  =====================
format              columns                                     canonical kind
==================  ==========================================  =====================
prompt_completion   prompt, completion                          :class:`LMExample`
messages            messages (multi-turn chat)                  :class:`LMExample`
alpaca              instruction, input (optional), output       :class:`LMExample`
text                text (plain language modelling)             :class:`LMExample`
preference          prompt (optional), chosen, rejected         :class:`PreferenceExample`
unpaired            prompt, completion, label                   :class:`UnpairedExample`
prompt              prompt                                      :class:`PromptExample`
==================  ==========================================  =====================

Normalisation rules:

* ``messages``: prompt = the turns before the first assistant turn, completion = the rest; every
  assistant turn of the completion is trainable (user turns inside it are not).
* ``alpaca``: prompt = instruction + ``"\\n\\n"`` + input when input is not blank, else instruction.
* ``text``: prompt ``""``, completion = the whole text.
* ``preference`` without a prompt column (implicit prompt): chosen and rejected are full conversations
  (or full texts); their longest shared prefix of messages becomes the prompt. For strings the prefix is
  cut back to a word boundary and a trailing space is left to the responses (as TRL does).
* ``unpaired`` labels are booleans; 0 and 1 are accepted, anything else is a bad row.

Every problem in a row raises :class:`~rlhf.data.errors.DataError` naming source, row and field.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from rlhf.data.errors import DataError, Source

Message = dict[str, Any]
"""A chat message: at least ``role`` (one of :data:`ROLES`) and string ``content``; other keys are kept."""
Text = str | list[Message]
"""Plain text, or a conversation (list of messages)."""

Kind = Literal["sft", "preference", "unpaired", "prompt"]
ROLES = ("system", "user", "assistant", "tool")


@dataclass(frozen=True)
class LMExample:
    """Supervised example: ``prompt`` is context (not trained on), ``completion`` is trained on.

    Both are strings (plain) or both lists of messages (conversational; only the completion's
    assistant turns are trained on). ``prompt`` may be ``""`` / ``[]``.
    """

    prompt: Text
    completion: Text


@dataclass(frozen=True)
class PreferenceExample:
    """A preference pair; conversational ``chosen``/``rejected`` hold the response turns only (prompt apart)."""

    prompt: Text
    chosen: Text
    rejected: Text


@dataclass(frozen=True)
class UnpairedExample:
    """One response with a binary desirability label (KTO-style data)."""

    prompt: Text
    completion: Text
    label: bool


@dataclass(frozen=True)
class PromptExample:
    """A prompt alone, for on-policy RL; never empty."""

    prompt: Text


Example = LMExample | PreferenceExample | UnpairedExample | PromptExample

# Required columns per format, in the order auto-detection tries them (most specific first).
REQUIRED_COLUMNS: dict[str, tuple[str, ...]] = {
    "preference": ("chosen", "rejected"),
    "unpaired": ("prompt", "completion", "label"),
    "prompt_completion": ("prompt", "completion"),
    "messages": ("messages",),
    "alpaca": ("instruction", "output"),
    "text": ("text",),
    "prompt": ("prompt",),
}
FORMATS = tuple(REQUIRED_COLUMNS)

# Which formats each kind of training can read (preference pairs also give two unpaired rows; any
# format with a prompt gives prompts).
KIND_FORMATS: dict[str, tuple[str, ...]] = {
    "sft": ("prompt_completion", "messages", "alpaca", "text"),
    "preference": ("preference",),
    "unpaired": ("unpaired", "preference"),
    "prompt": ("prompt", "prompt_completion", "messages", "alpaca", "preference", "unpaired"),
}


def detect_format(columns: Iterable[str], source: str | None = None) -> str:
    """The format of a dataset with these columns (see the module table); DataError if none fits."""
    present = set(columns)
    for fmt, required in REQUIRED_COLUMNS.items():
        if present.issuperset(required):
            return fmt
    known = "; ".join(f"{fmt}: {', '.join(cols)}" for fmt, cols in REQUIRED_COLUMNS.items())
    raise DataError("unrecognised format", detail=f"columns {sorted(present)}; expected one of {known}", source=source)


def check_columns(columns: Iterable[str], fmt: str, source: str | None = None) -> None:
    """Raise DataError unless ``fmt`` is a known format and every column it needs is present."""
    if fmt not in REQUIRED_COLUMNS:
        raise DataError("unknown format", detail=f"{fmt!r}; known: {list(FORMATS)}", source=source)
    present = set(columns)
    missing = [c for c in REQUIRED_COLUMNS[fmt] if c not in present]
    if missing:
        raise DataError(
            "missing columns", detail=f"format {fmt!r} needs {missing}; found {sorted(present)}", source=source
        )


def resolve_format(columns: Iterable[str], requested: str, kind: Kind, source: str | None = None) -> str:
    """The format to read: detected when ``requested == "auto"``, else checked; it must suit ``kind``."""
    columns = list(columns)
    if requested == "auto":
        fmt = detect_format(columns, source)
    else:
        check_columns(columns, requested, source)
        fmt = requested
    if fmt not in KIND_FORMATS[kind]:
        raise DataError(
            "format does not suit the training kind",
            detail=f"{kind} reads {list(KIND_FORMATS[kind])}, but the data is {fmt!r} (columns {sorted(columns)})",
            source=source,
        )
    return fmt


def source_field(fmt: str, columns: Iterable[str], canonical: str) -> str:
    """The data column a canonical field (``prompt``, ``completion``, ``chosen``...) of ``fmt`` comes from."""
    if fmt == "messages":
        return "messages"
    if fmt == "text":
        return "text"
    if fmt == "alpaca":
        return {"prompt": "instruction", "completion": "output"}.get(canonical, canonical)
    if fmt == "preference" and canonical == "prompt" and "prompt" not in set(columns):
        return "chosen"  # implicit prompt: split out of chosen/rejected
    return canonical


def normalise_row(row: Mapping[str, Any], fmt: str, source: Source | str, index: int) -> Example:
    """Row ``index`` of ``source`` as its canonical example; DataError naming source, row and field if bad."""
    if not isinstance(source, Source):
        source = Source(str(source))
    normaliser = _NORMALISERS.get(fmt)
    if normaliser is None:
        raise DataError("unknown format", detail=f"{fmt!r}; known: {list(FORMATS)}", source=source.name)
    try:
        return normaliser(row)
    except DataError as err:
        raise err.located(source, index) from None


def as_kind(example: Example, kind: Kind) -> list[Example]:
    """``example`` as the examples a ``kind`` of training reads (a preference pair gives two unpaired rows)."""
    if kind == "prompt":
        prompt = example.prompt
        if not _has_content(prompt):
            raise DataError("empty prompt", field="prompt")
        return [example if isinstance(example, PromptExample) else PromptExample(prompt)]
    if kind == "unpaired" and isinstance(example, PreferenceExample):
        return [
            UnpairedExample(example.prompt, example.chosen, True),
            UnpairedExample(example.prompt, example.rejected, False),
        ]
    return [example]


# --- per-format normalisers; they raise DataError with the field only, located by normalise_row ---


def _prompt_completion(row: Mapping[str, Any]) -> LMExample:
    prompt = _prompt(row, "prompt")
    return LMExample(prompt, _response(row, "completion", conversational=isinstance(prompt, list)))


def _messages(row: Mapping[str, Any]) -> LMExample:
    messages = _conversation(_field(row, "messages"), "messages")
    first = next((i for i, m in enumerate(messages) if m["role"] == "assistant"), None)
    if first is None:
        raise DataError("no assistant turn", field="messages")
    _check_assistant_turns(messages, "messages")
    return LMExample(messages[:first], messages[first:])


def _alpaca(row: Mapping[str, Any]) -> LMExample:
    instruction = _string(_field(row, "instruction"), "instruction")
    if not instruction.strip():
        raise DataError("empty instruction", field="instruction")
    extra = row.get("input")
    extra = "" if extra is None else _string(extra, "input")
    prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    return LMExample(prompt, _response(row, "output", conversational=False))


def _text(row: Mapping[str, Any]) -> LMExample:
    return LMExample("", _response(row, "text", conversational=False, reason="empty text"))


def _preference(row: Mapping[str, Any]) -> PreferenceExample:
    if row.get("prompt") is None:
        return _implicit_preference(row)
    prompt = _prompt(row, "prompt")
    conversational = isinstance(prompt, list)
    chosen = _response(row, "chosen", conversational=conversational)
    rejected = _response(row, "rejected", conversational=conversational)
    return PreferenceExample(prompt, chosen, rejected)


def _implicit_preference(row: Mapping[str, Any]) -> PreferenceExample:
    chosen, rejected = _field(row, "chosen"), _field(row, "rejected")
    if isinstance(chosen, str) and isinstance(rejected, str):
        prompt = _shared_text_prefix(chosen, rejected)
        split: dict[str, Any] = {"prompt": prompt, "chosen": chosen[len(prompt) :], "rejected": rejected[len(prompt) :]}
        return PreferenceExample(
            prompt,
            _response(split, "chosen", conversational=False),
            _response(split, "rejected", conversational=False),
        )
    chosen = _conversation(chosen, "chosen")
    rejected = _conversation(rejected, "rejected")
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    if shared == len(chosen) == len(rejected):
        raise DataError("chosen and rejected are identical", field="chosen")
    for name, messages in (("chosen", chosen), ("rejected", rejected)):
        if shared < len(messages) and messages[shared]["role"] != "assistant":
            raise DataError(
                "chosen and rejected must differ from an assistant turn on",
                detail=f"they diverge at message {shared} with role {messages[shared]['role']!r}",
                field=name,
            )
    split = {"chosen": chosen[shared:], "rejected": rejected[shared:]}
    return PreferenceExample(
        chosen[:shared],
        _response(split, "chosen", conversational=True),
        _response(split, "rejected", conversational=True),
    )


def _shared_text_prefix(a: str, b: str) -> str:
    """Longest common prefix cut back to a word boundary, its trailing space left to the responses."""
    shared = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
    prefix = a[:shared]
    if prefix and prefix not in (a, b) and not prefix[-1].isspace():
        cut = max(prefix.rfind(c) for c in (" ", "\n", "\t"))
        prefix = prefix[: cut + 1]
    return prefix[:-1] if prefix.endswith(" ") else prefix


def _unpaired(row: Mapping[str, Any]) -> UnpairedExample:
    prompt = _prompt(row, "prompt")
    completion = _response(row, "completion", conversational=isinstance(prompt, list))
    label = _field(row, "label")
    if isinstance(label, bool):
        return UnpairedExample(prompt, completion, label)
    if type(label) is int and label in (0, 1):
        return UnpairedExample(prompt, completion, bool(label))
    raise DataError("bad label", detail=f"expected true/false or 0/1, got {label!r}", field="label")


def _prompt_only(row: Mapping[str, Any]) -> PromptExample:
    prompt = _prompt(row, "prompt")
    if not _has_content(prompt):
        raise DataError("empty prompt", field="prompt")
    return PromptExample(prompt)


_NORMALISERS: dict[str, Callable[[Mapping[str, Any]], Example]] = {
    "prompt_completion": _prompt_completion,
    "messages": _messages,
    "alpaca": _alpaca,
    "text": _text,
    "preference": _preference,
    "unpaired": _unpaired,
    "prompt": _prompt_only,
}


# --- field checks ---


def _field(row: Mapping[str, Any], name: str) -> Any:
    value = row.get(name)
    if value is None:
        raise DataError("missing field", field=name)
    return value


def _string(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise DataError("wrong type", detail=f"expected a string, got {type(value).__name__}", field=name)
    return value


def _prompt(row: Mapping[str, Any], name: str) -> Text:
    value = _field(row, name)
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return _conversation(value, name)
    raise DataError(
        "wrong type", detail=f"expected a string or a list of messages, got {type(value).__name__}", field=name
    )


def _response(row: Mapping[str, Any], name: str, *, conversational: bool, reason: str = "empty response") -> Text:
    """A response field: a non-blank string, or (conversational) messages with non-empty assistant turns."""
    value = _field(row, name)
    if not conversational:
        if isinstance(value, list):
            raise DataError("wrong type", detail="a list of messages, but the prompt is a string", field=name)
        if not _string(value, name).strip():
            raise DataError(reason, field=name)
        return value
    if not isinstance(value, list):
        raise DataError(
            "wrong type", detail=f"expected a list of messages like the prompt, got {type(value).__name__}", field=name
        )
    messages = _conversation(value, name)
    if not messages:
        raise DataError(reason, field=name)
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError("no assistant turn", field=name)
    _check_assistant_turns(messages, name)
    return messages


def _conversation(value: Any, name: str) -> list[Message]:
    if not isinstance(value, list):
        raise DataError("wrong type", detail=f"expected a list of messages, got {type(value).__name__}", field=name)
    messages = []
    for i, message in enumerate(value):
        if not isinstance(message, Mapping) or "role" not in message or "content" not in message:
            raise DataError(
                "malformed message", detail=f"message {i} is not a {{'role', 'content'}} object", field=name
            )
        if message["role"] not in ROLES:
            raise DataError(
                "unknown role", detail=f"message {i} has role {message['role']!r}; known {ROLES}", field=name
            )
        if not isinstance(message["content"], str):
            raise DataError(
                "wrong type",
                detail=f"message {i} content is {type(message['content']).__name__}, expected a string",
                field=name,
            )
        messages.append(dict(message))
    return messages


def _check_assistant_turns(messages: list[Message], name: str) -> None:
    for i, message in enumerate(messages):
        if message["role"] == "assistant" and not message["content"].strip():
            raise DataError("empty response", detail=f"assistant message {i} is empty", field=name)


def _has_content(text: Text) -> bool:
    if isinstance(text, str):
        return bool(text.strip())
    return any(m["content"].strip() for m in text)
