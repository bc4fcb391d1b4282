"""Rewards for RLHF: the frozen reward source named by ``PPOConfig.reward``, scoring batches of rollouts.

A reward source scores a batch: ``score(prompts, responses, timeout_s)`` returns one finite float per
(prompt, response) pair, in order (:class:`RewardSource`). :func:`make_reward` builds one from the
config string, by its form:

===============================  =======================  ===========================================
``reward``                       source                   scores by
===============================  =======================  ===========================================
``http://...`` / ``https://...``  :class:`HTTPReward`      POSTing the batch to a reward endpoint
an existing directory            :class:`ModelReward`     a reward model written by ``rlhf rm``
``package.module:function``      :class:`FunctionReward`  calling a Python function in this process
===============================  =======================  ===========================================

**Prompts and responses.** A prompt is what the prompt dataset holds (:data:`~rlhf.data.formats.Text`):
a string for plain prompts, a list of ``{"role", "content"}`` messages for conversational ones (not the
policy's rendering of them, so that a reward model renders a conversation with its own chat template).
A response is the generated text, a string without the stop token.

**Columns.** A prompt row's other columns (an ``answer``, a ``solution``, ``metadata``: whatever the data
holds besides the prompt) come with the batch as ``columns``, name -> one value per pair.

**Functions** are called by their signature, read once when the source is built:

* by name, when a parameter is named ``response``: ``f(response, answer)``, ``f(prompt, response,
  answer, metadata=None)``: ``response`` (and ``prompt``) by name, every other parameter from the
  column of that name (a required one the data lacks is an error naming it);
* ``f(response) -> number`` / ``f(prompt, response) -> number`` with other names: by position, one or
  two required parameters; optional parameters named like a column get it;
* batched, ``f(prompts, responses, answer) -> sequence of numbers`` (one per response, in order): a
  function with a parameter named ``prompts`` or ``responses`` gets those it names, and the columns
  it names as lists aligned with the batch (TRL's convention), once per batch.

A function that takes ``**kwargs`` gets every column (and a batched one both ``prompts`` and
``responses``). A number is any real number (``bool`` counts as 0 or 1; numpy scalars and arrays
work); it must be finite. A function runs in the calling thread, so ``timeout_s`` is not enforced on
it here: Python cannot interrupt a function safely, and running it in another thread would break
reward functions that use ``signal``-based timeouts (e.g. math-verify). RLHF runs rewards in Ray
actors, whose calls have a deadline (``reward_timeout_s``).

**Several sources** sum with weights (:class:`WeightedReward`, ``PPOConfig.rewards``); each
component's own rewards are kept by name for the logs.

**HTTP protocol.** ``POST <url>`` with the JSON body ``{"prompts": [...], "responses": [...]}``
(prompts as above: strings or message lists), plus ``"columns": {name: [...]}`` when the prompt rows
have other columns; a 2xx answer with the JSON body
``{"rewards": [number, ...]}``, one finite number per response, in order. Each call gets one request
and answers within ``timeout_s``: an endpoint that is down, one that is slow, a non-2xx status (the
error quotes the start of the body), a body that is not that JSON or is larger than 8 MiB
(:data:`MAX_RESPONSE_BYTES`), or a wrong number of rewards, each raise :class:`RewardError`
(:class:`RewardTimeoutError`, also a ``TimeoutError``, for the slow ones). A call given up at its
deadline closes its connection rather than reading on. Errors show the URL without its
``user:password@`` and query.

**Reward models** are scored exactly as ``rlhf rm`` trained them: each (prompt, response) is encoded
like a preference example's chosen side (:func:`rlhf.data.encode.encode_sft`: for a plain prompt
``tokenizer(prompt)`` with the tokenizer's special tokens, then the response's tokens, then EOS; for a
conversation, the reward model's chat template over the prompt plus one assistant turn), right-padded,
and the scalar head is read at the last non-pad token. A sequence longer than ``max_length`` loses
response tokens from the end, as in training. The model is local, so ``timeout_s`` is not enforced.

Every error names the config key ``reward`` when the spec itself is wrong, and the source (function,
URL or directory) and the row when scoring fails. Build a source where it is used (``make_reward(spec)``
inside the actor that scores): the spec string is what travels, an HTTP client or a model does not.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import json
import math
import numbers
import pkgutil
import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

from cluster.errors import UserError
from rlhf.data.formats import Text

if TYPE_CHECKING:
    import httpx
    from transformers import PretrainedConfig

DEFAULT_TIMEOUT_S = 60.0
MAX_RESPONSE_BYTES = 8 << 20
"""The largest answer an HTTP reward endpoint may give (8 MiB: a reward list is a few bytes per response)."""
FORMS = (
    "an http(s) URL of a reward endpoint",
    "a reward-model directory written by `rlhf rm` (its final/ folder)",
    "a Python function package.module:function",
)
_DOTTED = r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*"
_FUNCTION_SPEC = re.compile(rf"({_DOTTED}):({_DOTTED})")


class RewardError(UserError, ValueError):
    """A reward source that cannot be built or that failed to score; the message says which and why."""


class RewardTimeoutError(RewardError, TimeoutError):
    """A reward source that gave no answer within its timeout."""


@runtime_checkable
class RewardSource(Protocol):
    """Scores a batch of (prompt, response) pairs; frozen (never trained by RLHF)."""

    def score(
        self,
        prompts: Sequence[Text],
        responses: Sequence[str],
        timeout_s: float = DEFAULT_TIMEOUT_S,
        columns: Mapping[str, Sequence[Any]] | None = None,
    ) -> list[float]:
        """One finite reward per pair, in order; :class:`RewardError` when that cannot be done.

        ``columns`` holds the prompt rows' other data columns (name -> one value per pair).
        """
        ...


# --- shared checks ---


def _excerpt(value: Any, limit: int = 300) -> str:
    text = value if isinstance(value, str) else repr(value)
    if not text:
        return "(empty)"
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} characters)"


def _check_batch(
    prompts: Sequence[Text], responses: Sequence[str], columns: Mapping[str, Sequence[Any]] | None = None
) -> None:
    if len(prompts) != len(responses):
        raise RewardError(f"{len(prompts)} prompts but {len(responses)} responses: each response needs its prompt")
    for name, values in (columns or {}).items():
        if len(values) != len(responses):
            raise RewardError(f"column {name!r} has {len(values)} values for {len(responses)} responses")
    for row, (prompt, response) in enumerate(zip(prompts, responses, strict=True)):
        if not isinstance(response, str):
            raise RewardError(f"response of row {row} is a {type(response).__name__}, not a string")
        if not isinstance(prompt, str | list):
            raise RewardError(f"prompt of row {row} is a {type(prompt).__name__}, not a string or a list of messages")


def _as_reward(value: Any, source: str, row: int) -> float:
    """``value`` as a finite float, or a RewardError naming the source and the row."""
    if isinstance(value, numbers.Real):  # bool, int, float, numpy scalars
        reward = float(value)
        if math.isfinite(reward):
            return reward
        raise RewardError(f"{source} gave {reward} for row {row}: a reward must be finite")
    raise RewardError(
        f"{source} gave {_excerpt(repr(value), 100)} ({type(value).__name__}) for row {row}: not a number"
    )


# --- Python functions ---


def _nearest(name: str, candidates: list[str]) -> str | None:
    pool = [c for c in candidates if name.startswith("_") or not c.startswith("_")]
    close = difflib.get_close_matches(name, pool, n=1, cutoff=0.6)
    return close[0] if close else None


def _missing_module_hint(missing: str) -> str:
    """Where a module that does not exist might be: a sibling with a close name, or a file not on the path."""
    parent, _, leaf = missing.rpartition(".")
    if parent:
        try:
            package = importlib.import_module(parent)
        except Exception:
            return ""
        siblings = [m.name for m in pkgutil.iter_modules(getattr(package, "__path__", []))]
        near = _nearest(leaf, siblings)
        return f"; did you mean '{parent}.{near}'?" if near else ""
    if (Path.cwd() / f"{leaf}.py").is_file() or (Path.cwd() / leaf).is_dir():
        return f"; {leaf} is in the current directory, which is not on the Python path (run with PYTHONPATH=.)"
    near = _nearest(leaf, [m.name for m in pkgutil.iter_modules()])
    return f"; did you mean '{near}'?" if near else ""


def _import_module(name: str, spec: str) -> Any:
    try:
        return importlib.import_module(name)
    except Exception as exc:
        missing = exc.name if isinstance(exc, ModuleNotFoundError) else None
        if missing and (name == missing or name.startswith(missing + ".")):
            hint = _missing_module_hint(missing)
            raise RewardError(f"config key 'reward': no module named '{missing}' (in {spec!r}){hint}") from None
        # the module exists but fails to import: keep its traceback
        raise RewardError(
            f"config key 'reward': importing module '{name}' failed: {type(exc).__name__}: {exc}"
        ) from exc


def _missing_attribute(owner: Any, owner_name: str, attribute: str, spec: str) -> RewardError:
    near = _nearest(attribute, dir(owner))
    if near:
        hint = f"; did you mean '{near}'?"
    else:
        members = vars(owner) if hasattr(owner, "__dict__") else {}
        functions = [
            n
            for n, v in members.items()
            if not n.startswith("_") and inspect.isfunction(v) and v.__module__ == getattr(owner, "__name__", None)
        ]
        hint = f"; its functions: {', '.join(functions[:12])}" if functions else ""
    return RewardError(f"config key 'reward': '{owner_name}' has no attribute '{attribute}' (in {spec!r}){hint}")


def import_function(spec: str) -> Callable[..., Any]:
    """The callable named ``package.module:function`` (``function`` may be dotted, e.g. ``Class.method``)."""
    match = _FUNCTION_SPEC.fullmatch(spec)
    if match is None:
        raise RewardError(f"config key 'reward': {spec!r} is not of the form package.module:function")
    module_name, attribute_path = match.groups()
    target = _import_module(module_name, spec)
    owner_name = module_name
    for attribute in attribute_path.split("."):
        if not hasattr(target, attribute):
            raise _missing_attribute(target, owner_name, attribute, spec)
        target = getattr(target, attribute)
        owner_name += (":" if owner_name == module_name else ".") + attribute
    if not callable(target):
        raise RewardError(f"config key 'reward': {spec!r} is a {type(target).__name__}, not a function")
    return target


CallingForm = Literal["response", "prompt_response", "keywords", "batch"]
_CONVENTIONS = (
    "(response), (prompt, response), keywords (response, prompt, <column>...), or a batch "
    "(prompts, responses, <column>...) -> one number per response"
)


@dataclass(frozen=True)
class Calling:
    """How a reward function is called (module docstring), read once from its signature."""

    form: CallingForm
    passed: tuple[str, ...] = ()
    """For the keyword and batch forms: which of prompt(s)/response(s) it takes, by name."""
    columns: tuple[str, ...] = ()
    """Its other named parameters: data columns it asks for."""
    required: tuple[str, ...] = ()
    """Those of ``columns`` without a default: a batch without one of them is an error."""
    all_columns: bool = False
    """Whether it takes ``**kwargs`` (then every column is passed)."""

    def arguments(self, columns: Mapping[str, Any], where: str) -> dict[str, Any]:
        """The column keyword arguments (values of a row, or of a batch) for a call."""
        missing = [name for name in self.required if name not in columns]
        if missing:
            held = ", ".join(sorted(columns)) or "none besides the prompt"
            raise RewardError(f"{where} needs the data column(s) {', '.join(missing)}; the prompt data has: {held}")
        names = columns if self.all_columns else [n for n in self.columns if n in columns]
        return {name: columns[name] for name in names}


def calling_form(function: Callable[..., Any], spec: str) -> Calling:
    """How to call ``function`` (see the module docstring)."""
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):
        raise RewardError(
            f"config key 'reward': the parameters of {spec!r} cannot be read; wrap it in a Python function "
            f"taking {_CONVENTIONS}"
        ) from None
    kind = inspect.Parameter
    parameters = list(signature.parameters.values())
    named = [p for p in parameters if p.kind not in (kind.VAR_POSITIONAL, kind.VAR_KEYWORD)]
    required = [p for p in named if p.default is kind.empty]
    all_columns = any(p.kind is kind.VAR_KEYWORD for p in parameters)
    names = {p.name for p in named}

    def by_name(form: CallingForm, special: tuple[str, ...]) -> Calling | None:
        passed = tuple(n for n in special if n in names)
        if any(p.kind is kind.POSITIONAL_ONLY for p in required):  # cannot be passed by name
            return None
        columns = tuple(p.name for p in named if p.name not in special)
        needed = tuple(p.name for p in required if p.name not in special)
        return Calling(form, passed, columns, needed, all_columns)

    if names & {"prompts", "responses"}:
        calling = by_name("batch", ("prompts", "responses"))
        if calling is not None:
            return calling
    elif "response" in names:
        calling = by_name("keywords", ("prompt", "response"))
        if calling is not None:
            return calling
    elif not any(p.kind is kind.VAR_POSITIONAL for p in parameters) and all(
        p.kind in (kind.POSITIONAL_ONLY, kind.POSITIONAL_OR_KEYWORD) for p in required
    ):
        optional = tuple(p.name for p in named if p.default is not kind.empty and p.kind is not kind.POSITIONAL_ONLY)
        if len(required) == 1:
            return Calling("response", (), optional, (), all_columns)
        if len(required) == 2:
            return Calling("prompt_response", (), optional, (), all_columns)
    raise RewardError(f"config key 'reward': {spec!r} takes {signature}; a reward function takes {_CONVENTIONS}")


class FunctionReward:
    """A Python reward function ``package.module:function``, imported and checked when built."""

    def __init__(self, spec: str) -> None:
        self.spec = spec
        self.function = import_function(spec)
        self.calling = calling_form(self.function, spec)
        self._source = f"reward function {spec!r}"

    @property
    def form(self) -> CallingForm:
        """How the function is called (module docstring)."""
        return self.calling.form

    def __repr__(self) -> str:
        return f"FunctionReward({self.spec!r})"

    def score(
        self,
        prompts: Sequence[Text],
        responses: Sequence[str],
        timeout_s: float = DEFAULT_TIMEOUT_S,
        columns: Mapping[str, Sequence[Any]] | None = None,
    ) -> list[float]:
        """Call the function per row or once per batch; ``timeout_s`` is not enforced here (module docstring)."""
        columns = dict(columns or {})
        _check_batch(prompts, responses, columns)
        if not responses:
            return []
        if self.form == "batch":
            return self._score_batch(prompts, responses, columns)
        rewards = []
        for row, (prompt, response) in enumerate(zip(prompts, responses, strict=True)):
            extra = self.calling.arguments({name: values[row] for name, values in columns.items()}, self._source)
            if self.form == "keywords":
                given = {"prompt": prompt, "response": response}
                args: tuple = ()
                extra |= {name: given[name] for name in self.calling.passed}
            else:
                args = (response,) if self.form == "response" else (prompt, response)
            try:
                value = self.function(*args, **extra)
            except Exception as exc:
                raise RewardError(f"{self._source} raised on row {row}: {type(exc).__name__}: {exc}") from exc
            rewards.append(_as_reward(value, self._source, row))
        return rewards

    def _score_batch(
        self, prompts: Sequence[Text], responses: Sequence[str], columns: dict[str, Sequence[Any]]
    ) -> list[float]:
        given = {"prompts": list(prompts), "responses": list(responses)}
        keywords = self.calling.arguments({name: list(values) for name, values in columns.items()}, self._source)
        passed = ("prompts", "responses") if self.calling.all_columns else self.calling.passed
        keywords |= {name: given[name] for name in passed}
        try:
            values = self.function(**keywords)
        except Exception as exc:
            raise RewardError(
                f"{self._source} raised on a batch of {len(responses)}: {type(exc).__name__}: {exc}"
            ) from exc
        if hasattr(values, "tolist"):  # numpy arrays, tensors
            values = values.tolist()
        if not isinstance(values, list | tuple):
            raise RewardError(
                f"{self._source} returned {_excerpt(values, 100)} ({type(values).__name__}); "
                "a batched reward function returns a list of numbers, one per response"
            )
        if len(values) != len(responses):
            raise RewardError(f"{self._source} returned {len(values)} rewards for {len(responses)} responses")
        return [_as_reward(value, self._source, row) for row, value in enumerate(values)]


# --- HTTP endpoints ---


class HTTPReward:
    """A remote reward endpoint speaking the JSON protocol of the module docstring.

    An answer is read up to ``max_response_bytes`` (more is a :class:`RewardError`: a reward
    list is a few bytes per response), and a call the caller gave up on (its deadline passed)
    closes its connection at the next bytes that arrive, or at httpx's own read timeout,
    instead of reading on.
    """

    def __init__(self, url: str, max_response_bytes: int = MAX_RESPONSE_BYTES) -> None:
        import httpx

        try:
            parsed = httpx.URL(url)
        except httpx.InvalidURL as exc:
            raise RewardError(f"config key 'reward': {_without_credentials(url)!r} is not a valid URL: {exc}") from None
        if parsed.scheme not in ("http", "https") or not parsed.host:
            raise RewardError(f"config key 'reward': {_without_credentials(url)!r} is not an http(s) URL with a host")
        self.url = url
        self.max_response_bytes = max_response_bytes
        self._shown = str(parsed.copy_with(userinfo=b"", query=None))  # errors never print credentials
        self._source = f"reward endpoint {self._shown}"
        self._client = httpx.Client()

    def __repr__(self) -> str:
        return f"HTTPReward({self._shown!r})"

    def close(self) -> None:
        """Close the connection pool."""
        self._client.close()

    def score(
        self,
        prompts: Sequence[Text],
        responses: Sequence[str],
        timeout_s: float = DEFAULT_TIMEOUT_S,
        columns: Mapping[str, Sequence[Any]] | None = None,
    ) -> list[float]:
        """POST the batch; the rewards, or a RewardError within ``timeout_s`` (plus a few milliseconds)."""
        _check_batch(prompts, responses, columns)
        if not responses:
            return []
        batch: dict[str, Any] = {"prompts": list(prompts), "responses": list(responses)}
        if columns:
            batch["columns"] = {name: list(values) for name, values in columns.items()}
        try:
            body = json.dumps(batch, default=_json_value)
        except (TypeError, ValueError) as exc:
            raise RewardError(f"the batch for {self._source} cannot be sent as JSON: {exc}") from None
        response, content = self._post(body, timeout_s)
        return self._rewards(response, content, len(responses))

    def _post(self, body: str, timeout_s: float) -> tuple[httpx.Response, bytes]:
        """One POST under a hard deadline; the response (its status and headers) and its body.

        httpx's timeouts bound each phase (connect, write, every read) separately, so a server that
        trickles its answer could take longer; the request runs in a thread, abandoned at the
        deadline, which then stops reading and closes its connection itself.
        """
        import httpx

        outcome: dict[str, Any] = {}
        done = threading.Event()
        deadline = time.monotonic() + timeout_s

        def post() -> None:
            try:
                headers = {"Content-Type": "application/json"}
                with self._client.stream("POST", self.url, content=body, headers=headers, timeout=timeout_s) as answer:
                    outcome["content"] = self._read(answer, deadline)
                    outcome["response"] = answer
            except Exception as exc:
                outcome["error"] = exc
            finally:
                done.set()

        threading.Thread(target=post, name="rlhf-http-reward", daemon=True).start()
        if not done.wait(timeout_s) or isinstance(outcome.get("error"), httpx.TimeoutException | _Abandoned):
            raise RewardTimeoutError(
                f"{self._source} gave no answer within the timeout of {timeout_s:g} s "
                "(a server that is down or overloaded, or a batch too slow to score)"
            )
        error = outcome.get("error")
        if isinstance(error, RewardError):
            raise error
        if isinstance(error, httpx.ConnectError):
            raise RewardError(f"{self._source} is not reachable ({error}); is the reward server running?") from None
        if isinstance(error, httpx.HTTPError):
            raise RewardError(f"request to {self._source} failed: {type(error).__name__}: {error}") from None
        if error is not None:
            raise RewardError(f"request to {self._source} failed: {type(error).__name__}: {error}") from error
        return outcome["response"], outcome["content"]

    def _read(self, answer: httpx.Response, deadline: float) -> bytes:
        """The body of ``answer``, read until it ends, passes ``max_response_bytes`` or outlives ``deadline``."""
        chunks, size = [], 0
        for chunk in answer.iter_bytes():
            size += len(chunk)
            if size > self.max_response_bytes:
                raise RewardError(
                    f"{self._source} answered with more than {self.max_response_bytes} bytes (HTTP "
                    f"{answer.status_code}); a reward list is a few bytes per response"
                )
            if time.monotonic() > deadline:
                raise _Abandoned  # the caller has given up: leaving the stream closes the connection
            chunks.append(chunk)
        return b"".join(chunks)

    def _rewards(self, response: httpx.Response, content: bytes, expected: int) -> list[float]:
        text = content.decode("utf-8", errors="replace")
        if not response.is_success:
            moved = f" (to {response.headers.get('location')})" if response.is_redirect else ""
            raise RewardError(
                f"{self._source} answered HTTP {response.status_code} {response.reason_phrase}{moved}: {_excerpt(text)}"
            )
        try:
            answer = json.loads(content)
        except ValueError:
            raise RewardError(f"{self._source} answered with a body that is not JSON: {_excerpt(text)}") from None
        rewards = answer.get("rewards") if isinstance(answer, dict) else None
        if not isinstance(rewards, list):
            raise RewardError(
                f'{self._source} answered {_excerpt(answer)}; expected {{"rewards": [one number per response]}}'
            )
        if len(rewards) != expected:
            raise RewardError(f"{self._source} returned {len(rewards)} rewards for {expected} responses")
        return [_as_reward(value, self._source, row) for row, value in enumerate(rewards)]


def _json_value(value: Any) -> Any:
    """Numpy scalars and arrays (as datasets hand them out) as JSON values; anything else is refused."""
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"a {type(value).__name__} is not JSON serializable")


class _Abandoned(Exception):
    """Raised in an HTTP reward's request thread once its caller's deadline has passed."""


def _without_credentials(url: str) -> str:
    """``url`` without a ``user:password@`` part or a query (which may carry a key), for messages."""
    return re.sub(r"(//)[^/?#]*@", r"\1", url).split("?", 1)[0]


# --- reward models ---


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
        config = AutoConfig.from_pretrained(str(directory))
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
        self.model = model.to(device)
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


# --- several sources, weighted ---


class WeightedReward:
    """The weighted sum of several reward sources, each kept for logging (``PPOConfig.rewards``).

    Args:
        terms: ``(name, source, weight)`` per component, names unique.
    """

    def __init__(self, terms: Sequence[tuple[str, RewardSource, float]]) -> None:
        if not terms:
            raise RewardError("config key 'rewards': give at least one reward source")
        names = [name for name, _, _ in terms]
        if len(set(names)) != len(names):
            raise RewardError(f"config key 'rewards': names must be unique, got {names}")
        self.terms = list(terms)

    def __repr__(self) -> str:
        return " + ".join(f"{weight:g} * {source!r}" for _, source, weight in self.terms)

    def score_parts(
        self,
        prompts: Sequence[Text],
        responses: Sequence[str],
        timeout_s: float = DEFAULT_TIMEOUT_S,
        columns: Mapping[str, Sequence[Any]] | None = None,
    ) -> tuple[list[float], dict[str, list[float]]]:
        """The weighted sums and each component's own (unweighted) rewards, by name."""
        parts = {name: source.score(prompts, responses, timeout_s, columns) for name, source, _ in self.terms}
        totals = [sum(weight * parts[name][row] for name, _, weight in self.terms) for row in range(len(responses))]
        return totals, parts

    def score(
        self,
        prompts: Sequence[Text],
        responses: Sequence[str],
        timeout_s: float = DEFAULT_TIMEOUT_S,
        columns: Mapping[str, Sequence[Any]] | None = None,
    ) -> list[float]:
        """The weighted sums."""
        return self.score_parts(prompts, responses, timeout_s, columns)[0]


def make_weighted(terms: Sequence[Mapping[str, Any]], *, device: str = "cpu") -> WeightedReward:
    """A :class:`WeightedReward` of ``terms``, each ``{"name", "source", "weight"}`` (:func:`rlhf.config.reward_terms`)."""
    return WeightedReward([(t["name"], make_reward(t["source"], device=device), float(t["weight"])) for t in terms])


def term_name(spec: str) -> str:
    """A short name for the reward source ``spec``, for logs: a function's name, a directory's, a URL's host."""
    if spec.lower().startswith(("http://", "https://")):
        return re.sub(r"^https?://(?:[^/@]*@)?([^/:?#]*).*$", r"\1", spec, flags=re.IGNORECASE) or "http"
    if ":" in spec and "/" not in spec:
        return spec.rsplit(":", 1)[1].rsplit(".", 1)[-1]
    path = Path(spec)
    return path.parent.name if path.name == "final" and path.parent.name else path.name or spec


# --- from the config string ---


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
