"""``ray.serve.llm``'s OpenAI ingress, with LoRA adapters addressed and listed by their own names.

Ray's ingress names adapters ``<base>:<adapter>`` and loads them per request from cloud
storage (multiplexing). Here every replica loads its adapters at start from directories
(vLLM's static LoRA modules), so a request for ``model="my-adapter"`` goes to any replica
of the base model, and ``/v1/models`` lists the adapters next to it. A chat message whose
``content`` fails validation is a 400 here (Ray's ingress answers it with a 500). Imports Ray
internals: see :mod:`serving.app`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ray.llm._internal.serve.core.configs.openai_api_models import (
    ChatCompletionRequest,
    ModelCard,
    OpenAIHTTPException,
)
from ray.llm._internal.serve.core.ingress.ingress import OpenAiIngress
from ray.llm._internal.serve.core.ingress.utils import _sanitize_chat_completion_request
from starlette.requests import Request
from starlette.responses import Response

if TYPE_CHECKING:
    from ray.serve.handle import DeploymentHandle


class Ingress(OpenAiIngress):
    """The OpenAI ingress of one base model and its named adapters."""

    def __init__(
        self,
        llm_deployments: dict[str, DeploymentHandle[Any]],
        model_cards: dict[str, ModelCard],
        adapters: dict[str, str],
    ) -> None:
        super().__init__(llm_deployments, model_cards)
        self._adapters = adapters  # adapter name -> base model id

    def _get_configured_serve_handle(self, model_id: str) -> Any:
        if model_id in self._adapters:  # every replica holds every adapter: plain load-balanced routing
            model_id = self._adapters[model_id]
        return super()._get_configured_serve_handle(model_id)

    async def _get_model_id(self, model: str | None) -> str:
        if model in self._adapters:
            return model
        return await super()._get_model_id(model)

    async def chat(self, body: ChatCompletionRequest, request: Request) -> Response:
        """Ray's chat route, with message contents that fail validation refused as a 400 (Ray answers 500)."""
        try:  # what Ray does first (pydantic validates list contents lazily), so its error is ours to word
            body = _sanitize_chat_completion_request(body)
        except ValueError as exc:
            raise OpenAIHTTPException(status_code=400, message=str(exc), type="invalid_request_error") from None
        return await super().chat(body, request)

    async def model(self, model_id: str) -> Any:
        """The card of a base model or adapter, None if unknown."""
        if model_id in self._adapters:
            base = self._adapters[model_id]
            card = self._model_cards[base]
            metadata = {**card.metadata, "base_model": base, "adapter": model_id}
            return ModelCard(id=model_id, object="model", owned_by=card.owned_by, permission=[], metadata=metadata)
        return await super().model(model_id)

    async def models(self) -> Any:
        """The base model and its adapters."""
        listing = await super().models()
        listing.data.extend([await self.model(name) for name in self._adapters])
        return listing
