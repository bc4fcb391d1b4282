"""Python reward functions (``package.module:function``): importing one, reading how it is called, calling it."""

from __future__ import annotations

import difflib
import importlib
import inspect
import pkgutil
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Literal

from rlhf.data.formats import Text
from rlhf.rl.rewards.base import DEFAULT_TIMEOUT_S, RewardError, _as_reward, _check_batch, _excerpt

_DOTTED = r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*"
_FUNCTION_SPEC = re.compile(rf"({_DOTTED}):({_DOTTED})")


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


def _import_module(name: str, spec: str) -> ModuleType:
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
    target: object = _import_module(module_name, spec)
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
    """How a reward function is called (package docstring), read once from its signature."""

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
    """How to call ``function`` (see the package docstring)."""
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
        """How the function is called (package docstring)."""
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
        """Call the function per row or once per batch; ``timeout_s`` is not enforced here (package docstring)."""
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
                args: tuple[Any, ...] = ()
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
