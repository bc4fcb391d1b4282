"""vLLM's OpenAI app as a serving replica builds it, without an engine: every route ``vllm serve`` registers."""

from __future__ import annotations

import re
from typing import Any


def vllm_app() -> Any:
    """A new FastAPI app of vLLM's OpenAI server for a generation model (no engine behind it)."""
    from vllm.entrypoints.launchers.app import build_app
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    return build_app(make_arg_parser(FlexibleArgumentParser()).parse_args([]), supported_tasks=("generate",))


def walk(app: Any) -> list[tuple[str, str]]:
    """(method, path) of every route of ``app``, HEAD left out."""
    routes = [(sorted(getattr(route, "methods", None) or {"GET"}), route.path) for route in app.routes]
    return [(method, path) for methods, path in routes for method in methods if method != "HEAD"]


def concrete(path: str) -> str:
    """A request path for a route template: each ``{param}`` or ``{param:path}`` filled with ``tiny``."""
    return re.sub(r"\{[^}]+\}", "tiny", path)
