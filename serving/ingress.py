"""The endpoint's replicas are its ingress: each serves vLLM's own OpenAI app behind the guard.

Serve's HTTP proxy sends a request straight to a model replica (``LLMServer``, one vLLM engine),
whose ASGI app is the one ``vllm serve`` runs (built by Ray's engine once the engine has started,
``LLMServer.__serve_build_asgi_app__``), with what :func:`guard_app` adds. There is no ingress
deployment in between: one process and one hop less per request than an ingress replica that
forwards to the model replicas through a deployment handle (SmolLM2 on 2 CPU cores at 32 clients:
9.0 requests/s against 6.5 through such an ingress, and 10.6 from ``vllm serve``; ``benchmarks/RESULTS.md``).

vLLM's app does the protocol: adapters (vLLM's static LoRA modules, loaded by every replica at
start) are addressed and listed by their own names, a request without ``model`` goes to the base
model, and its errors are OpenAI error bodies. :func:`guard_app` keeps only the routes a generation
model serves, adds ``GET /v1/models/{model}`` (vLLM's app lists models but has no route for one), and
puts the guard (:mod:`serving.guard`: the API key on every route, the body cap, request limits)
outside everything, so it sees every request first.
"""

from __future__ import annotations

from typing import Any

from fastapi import HTTPException, Request
from ray.serve.llm import LLMServer
from starlette.exceptions import HTTPException as StarletteHTTPException

from serving.guard import Guard, Limits, http_error

ROUTES = frozenset(
    {
        ("GET", "/v1/models"),
        ("POST", "/v1/completions"),
        ("POST", "/v1/chat/completions"),
        ("POST", "/tokenize"),
        ("POST", "/detokenize"),
        # FastAPI's docs of the routes above
        ("GET", "/openapi.json"),
        ("GET", "/docs"),
        ("GET", "/docs/oauth2-redirect"),
        ("GET", "/redoc"),
    }
)
"""(method, path) of the routes of vLLM's app the endpoint keeps. Left out: the rest of what ``vllm serve``
registers (``/v1/responses``, ``/v1/embeddings``, ``/pooling``, ``/invocations``, ``/health``, ``/metrics``,
``/version``, ...), which are either not a generation model's or would bypass the guard's request limits."""

MODEL_ROUTE = "/v1/models/{model:path}"


def _kept(route: Any) -> bool:
    methods = getattr(route, "methods", None) or {"GET"}
    return any((method, route.path) in ROUTES for method in methods)


def guard_app(app: Any, keys: tuple[str, ...], limits: Limits) -> Any:
    """vLLM's OpenAI FastAPI ``app`` as the endpoint serves it: its generation routes, one model's card, the guard.

    ``app`` may have built its middleware stack already (vLLM's ``build_app`` does); it is rebuilt on the next
    request with the guard outermost.
    """
    app.router.routes = [route for route in app.router.routes if _kept(route)]

    # FastAPI reads the annotations by name from this module's globals; `app` is vLLM's (untyped here)
    @app.get(MODEL_ROUTE)  # type: ignore[untyped-decorator]
    async def model_card(model: str, request: Request) -> Any:
        """The card of the base model or an adapter, as ``/v1/models`` lists it."""
        listing = await request.app.state.openai_serving_models.show_available_models()
        for card in listing.data:
            if card.id == model:
                return card
        raise HTTPException(status_code=404, detail=f"The model '{model}' does not exist")

    app.openapi_schema = None  # the schema of the kept routes, rebuilt on its next request
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.middleware_stack = None  # Starlette refuses middleware once the stack is built; it rebuilds lazily
    app.add_middleware(Guard, keys=keys, limits=limits)
    return app


class GuardedLLMServer(LLMServer):
    """``ray.serve.llm``'s model replica, serving vLLM's OpenAI app behind the guard as the Serve ingress.

    Wrapped with ``serve.ingress()`` (no app: Serve asks :meth:`__serve_build_asgi_app__` for it once the
    replica's constructor, which starts the engine, has returned).
    """

    async def __init__(  # type: ignore[misc]  # LLMServer's constructor is async; Serve awaits it
        self, llm_config: Any, *, keys: tuple[str, ...], limits: Limits, **kwargs: Any
    ) -> None:
        """``keys`` and ``limits`` are the guard's; ``kwargs`` go to ``LLMServer`` (the engine class)."""
        self.guard_keys, self.guard_limits = keys, limits
        await super().__init__(llm_config, **kwargs)

    async def __serve_build_asgi_app__(self) -> Any:
        """vLLM's OpenAI app of this replica's engine, guarded (:func:`guard_app`)."""
        assert self.engine is not None, "LLMServer's constructor starts the engine before Serve asks for the app"
        return guard_app(await self.engine.build_asgi_app(), self.guard_keys, self.guard_limits)
