"""The hand-rolled baseline of the serving benchmark: FastAPI + uvicorn around transformers' ``generate()``.

This is the server people commonly write before reaching for a serving engine, kept as
plain as that: the model loaded with ``from_pretrained`` in the dtype it was saved in, one
``POST /v1/completions`` route answering in the OpenAI shape, and ``model.generate()`` on
one prompt per call. The async route hands each request to a single-thread executor, so
the event loop keeps accepting connections while requests wait in FIFO order and exactly
one ``generate()`` runs at a time (a torch model is not safe to call from several threads,
and two concurrent calls would only fight over the same cores). No batching across
requests, no KV-cache sharing: that is what the benchmark measures ``serving/`` against.

Run: ``python -m benchmarks.baseline_server --model DIR --port PORT`` (listens on 127.0.0.1).
"""

from __future__ import annotations

import argparse
import asyncio
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel


class CompletionRequest(BaseModel):
    """The subset of OpenAI's completion request the benchmark sends (plus vLLM's ``min_tokens``/``ignore_eos``)."""

    model: str
    prompt: str
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    min_tokens: int = 0
    ignore_eos: bool = False


def build_app(model_dir: str, model_name: str) -> FastAPI:
    """The baseline application serving the causal LM in ``model_dir`` as ``model_name``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    executor = ThreadPoolExecutor(max_workers=1)  # one generate() at a time, FIFO
    app = FastAPI()

    def generate(request: CompletionRequest) -> tuple[str, int, int]:
        inputs = tokenizer(request.prompt, return_tensors="pt")
        # ignore_eos means "always produce max_tokens", which generate() expresses as a minimum length
        minimum = request.max_tokens if request.ignore_eos else min(request.min_tokens, request.max_tokens)
        sampling: dict[str, Any] = {"do_sample": False}
        if request.temperature > 0:
            sampling = {"do_sample": True, "temperature": request.temperature, "top_p": request.top_p}
        with torch.inference_mode():
            output = model.generate(
                **inputs,
                max_new_tokens=request.max_tokens,
                min_new_tokens=minimum,
                pad_token_id=tokenizer.pad_token_id,
                **sampling,
            )
        prompt_tokens = inputs["input_ids"].shape[1]
        completion = output[0, prompt_tokens:]
        return tokenizer.decode(completion, skip_special_tokens=True), prompt_tokens, len(completion)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/v1/completions")
    async def completions(request: CompletionRequest) -> dict[str, Any]:
        text, prompt_tokens, completion_tokens = await asyncio.get_running_loop().run_in_executor(
            executor, generate, request
        )
        return {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": model_name,
            "choices": [
                {
                    "index": 0,
                    "text": text,
                    "logprobs": None,
                    "finish_reason": "length" if completion_tokens == request.max_tokens else "stop",
                }
            ],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        }

    return app


def main() -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", required=True, help="model directory")
    parser.add_argument("--model-name", default="tiny", help="the name clients pass as model")
    parser.add_argument("--port", type=int, required=True)
    options = parser.parse_args()
    app = build_app(options.model, options.model_name)
    uvicorn.run(app, host="127.0.0.1", port=options.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
