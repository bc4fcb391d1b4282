"""``ray.serve.llm``'s OpenAI ingress, with LoRA adapters addressed and listed by their own names.

Ray's ingress names adapters ``<base>:<adapter>`` and loads them per request from cloud
storage (multiplexing). Here every replica loads its adapters at start from directories
(vLLM's static LoRA modules), so a request for ``model="my-adapter"`` goes to any replica
of the base model (:class:`serving.ray_internals.AdapterRouting`), and ``/v1/models`` lists
the adapters next to it. A chat message whose ``content`` fails validation is a 400 here (Ray's
ingress answers it with a 500).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ray.serve.llm.ingress import OpenAiIngress
from ray.serve.llm.openai_api_models import ChatCompletionRequest
from starlette.requests import Request
from starlette.responses import Response

from serving.ray_internals import AdapterRouting, openai_http_error, sanitize_chat_request

if TYPE_CHECKING:
    from ray.serve.handle import DeploymentHandle


class Ingress(AdapterRouting, OpenAiIngress):
    """The OpenAI ingress of one base model and its named adapters."""

    def __init__(
        self,
        llm_deployments: dict[str, DeploymentHandle[Any]],
        model_cards: dict[str, Any],
        adapters: dict[str, str],
    ) -> None:
        """``model_cards`` are Ray's ``ModelCard``; ``adapters`` maps each adapter's name to its base model's id."""
        self.adapter_bases = adapters
        super().__init__(llm_deployments, model_cards)

    # FastAPI parses the body into the annotated class: ray.serve.llm's public subclass of Ray's own
    async def chat(self, body: ChatCompletionRequest, request: Request) -> Response:  # type: ignore[override]
        """Ray's chat route, with message contents that fail validation refused as a 400 (Ray answers 500)."""
        try:  # what Ray does first (pydantic validates list contents lazily), so its error is ours to word
            body = sanitize_chat_request(body)
        except ValueError as exc:
            raise openai_http_error(400, str(exc), "invalid_request_error") from None
        return await super().chat(body, request)

    async def model(self, model_id: str) -> Any:
        """The card of a base model or adapter, None if unknown."""
        if model_id in self.adapter_bases:
            base = self.adapter_bases[model_id]
            card = self.base_card(base)
            metadata = {**card.metadata, "base_model": base, "adapter": model_id}
            return type(card)(id=model_id, object="model", owned_by=card.owned_by, permission=[], metadata=metadata)
        return await super().model(model_id)

    async def models(self) -> Any:
        """The base model and its adapters."""
        listing = await super().models()
        listing.data.extend([await self.model(name) for name in self.adapter_bases])
        return listing
