"""Serving throughput and latency: rlhf's endpoint against a hand-rolled FastAPI + ``generate()`` server.

Same model (the tiny one, then a larger one: :data:`SMALL`), same 32 prompts (the first of the bundled ``prompts`` test split, sent in
the same order), greedy decoding and exactly TOKENS generated tokens per request on both
sides: every request carries vLLM's ``min_tokens`` and ``ignore_eos``, which the baseline
turns into ``min_new_tokens = max_new_tokens``; a response whose ``usage.completion_tokens``
is not TOKENS counts as an error.

* rlhf: ``serving.server.start`` on an embedded Ray cluster, ONE vLLM (CPU) replica behind
  the OpenAI-compatible ingress with its auth/limits middleware, as ``rlhf serve`` runs it.
  vLLM serves the fp32 checkpoint in bf16 (its ``dtype="auto"`` on CPU).
* baseline: :mod:`benchmarks.baseline_server`, one uvicorn process on 127.0.0.1 whose
  route runs ``model.generate()`` for one request at a time (a single-thread executor),
  fp32 as saved.

Both are measured by the same client: the official async ``openai`` client (retries off),
one coroutine per concurrent client, each sending its next request when the previous one
is answered. Each side first runs a warm-up (WARMUP_REQUESTS requests from WARMUP_CLIENTS
clients, not counted: vLLM compiles its kernels on the first batches), then each
concurrency level for SECONDS (or MAX_REQUESTS requests, whichever comes first); requests
in flight at the deadline are waited for and counted, and the level's wall time runs
until the last one is answered. Each side runs in a fresh process, one after the other,
on this machine's CPU (where the client competes with the server for the same cores, on
both sides alike).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import statistics
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.common import describe_model, small_model
from cluster.connect import free_port

CLIENTS = (1, 8, 32)
SECONDS = 15.0  # per concurrency level
MAX_REQUESTS = 5000  # per concurrency level
WARMUP_CLIENTS, WARMUP_REQUESTS = 8, 16
TOKENS = 32  # generated tokens per request
PROMPTS = 32
MAX_MODEL_LEN = 256
MODEL_NAME = "tiny"
READY_TIMEOUT_S = 600.0


@dataclass
class Level:
    """What one concurrency level measured."""

    clients: int
    seconds: float
    latencies: list[float] = field(default_factory=list)  # of the successful requests
    tokens: int = 0  # generated tokens of the successful requests
    errors: list[str] = field(default_factory=list)

    @property
    def requests_per_second(self) -> float:
        return len(self.latencies) / self.seconds

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds

    def percentile(self, q: int) -> float:
        if len(self.latencies) < 2:
            return self.latencies[0] if self.latencies else float("nan")
        return statistics.quantiles(self.latencies, n=100, method="inclusive")[q - 1]


@dataclass
class Side:
    """One server's measurements."""

    name: str
    startup_seconds: float
    levels: list[Level]
    warmup_errors: list[str]


def prompts() -> list[str]:
    """The fixed prompts both sides answer, in order."""
    from rlhf.data.bundled import bundled_path

    lines = bundled_path("prompts", "test").read_text().splitlines()
    return [json.loads(line)["prompt"] for line in lines[:PROMPTS]]


async def _client(client, texts, until: float, budget: list[int], level: Level) -> None:
    import openai

    while time.monotonic() < until and budget[0] > 0:
        budget[0] -= 1
        started = time.monotonic()
        try:
            response = await client.completions.create(
                model=MODEL_NAME,
                prompt=next(texts),
                max_tokens=TOKENS,
                temperature=0.0,
                extra_body={"min_tokens": TOKENS, "ignore_eos": True},
            )
        except openai.APIStatusError as exc:
            level.errors.append(f"HTTP {exc.status_code}")
            continue
        except openai.APIError as exc:
            level.errors.append(type(exc).__name__)
            continue
        generated = response.usage.completion_tokens if response.usage else 0
        if generated != TOKENS:
            level.errors.append(f"{generated} tokens generated instead of {TOKENS}")
            continue
        level.latencies.append(time.monotonic() - started)
        level.tokens += generated


async def _level(url: str, clients: int, seconds: float, max_requests: int) -> Level:
    """``clients`` concurrent clients for ``seconds`` (at most ``max_requests`` requests in all)."""
    import openai

    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=120)
    texts = itertools.cycle(prompts())
    level = Level(clients, seconds=0.0)
    budget = [max_requests]
    started = time.monotonic()
    await asyncio.gather(*(_client(client, texts, started + seconds, budget, level) for _ in range(clients)))
    level.seconds = time.monotonic() - started
    await client.close()
    return level


def measure(url: str, seconds: float, max_requests: int = MAX_REQUESTS) -> tuple[list[Level], list[str]]:
    """The warm-up (its errors returned), then every level of CLIENTS against the endpoint at ``url``."""
    import logging

    for name in ("httpx", "httpx2"):  # the openai client's; Serve's driver logging would log every request
        logging.getLogger(name).setLevel(logging.WARNING)
    warmup = asyncio.run(_level(url, WARMUP_CLIENTS, READY_TIMEOUT_S, WARMUP_REQUESTS))
    levels = [asyncio.run(_level(url, clients, seconds, max_requests)) for clients in CLIENTS]
    return levels, warmup.errors


def run_rlhf(model_dir: str, seconds: float) -> Side:
    """rlhf's endpoint: one vLLM replica on an embedded Ray cluster, started, measured and stopped."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    import ray

    from serving import server
    from serving.config import ServeConfig

    config = ServeConfig(
        model=model_dir,
        model_name=MODEL_NAME,
        port=free_port(),
        max_model_len=MAX_MODEL_LEN,
        max_tokens_limit=TOKENS,
        min_replicas=1,
        max_replicas=1,
    )
    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False)
    try:
        started = time.monotonic()
        try:
            url = server.start(config, timeout_s=READY_TIMEOUT_S)
            startup = time.monotonic() - started
            levels, warmup_errors = measure(url, seconds)
        finally:
            server.stop()
    finally:
        ray.shutdown()
    return Side("rlhf (Ray Serve + vLLM, 1 replica)", startup, levels, warmup_errors)


def _wait_for(url: str, process: subprocess.Popen, timeout_s: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the baseline server exited with code {process.returncode} before answering")
        try:
            if httpx.get(url, timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"the baseline server at {url} did not answer in {timeout_s:.0f} s")


def run_baseline(model_dir: str, seconds: float) -> Side:
    """The hand-rolled baseline in its own uvicorn process, started, measured and stopped."""
    port = free_port()
    command = [sys.executable, "-m", "benchmarks.baseline_server", "--model", model_dir, "--port", str(port)]
    command += ["--model-name", MODEL_NAME]
    started = time.monotonic()
    process = subprocess.Popen(command, cwd=Path(__file__).resolve().parent.parent)
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_for(f"{url}/health", process, READY_TIMEOUT_S)
        startup = time.monotonic() - started
        levels, warmup_errors = measure(url, seconds)
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return Side("baseline (FastAPI + generate())", startup, levels, warmup_errors)


def _errors(side: Side) -> str:
    counts = Counter(side.warmup_errors)
    for level in side.levels:
        counts.update(level.errors)
    if not counts:
        return f"{side.name}: none"
    return f"{side.name}: " + ", ".join(f"{count} x {kind}" for kind, count in counts.most_common())


def report(model_dir: str, peak_flops: float, seconds: float = SECONDS) -> str:
    """Both sides on the tiny model and on a larger one; the markdown section (``peak_flops`` is unused)."""
    small_dir, small = small_model()
    tables = []
    for title, directory in (
        (f"Tiny model, {describe_model(model_dir)}", model_dir),
        (f"Small model, {small}", small_dir),
    ):
        tables += ["", f"### {title}", "", *_table(directory, seconds)]
    return "\n".join(
        [
            "## Serving throughput and latency: rlhf vs a FastAPI server calling transformers generate()",
            "",
            f"The same {PROMPTS} bundled prompts in the same order, greedy, exactly {TOKENS} generated "
            "tokens per request on both sides (`min_tokens`/`ignore_eos`; the baseline uses `min_new_tokens = "
            "max_new_tokens`), `/v1/completions` through the async `openai` client with retries off. rlhf: "
            "`serving.server.start` with one vLLM (CPU) replica behind the guarded ingress on Ray Serve (vLLM "
            "runs the fp32 checkpoint in bf16, its CPU default). Baseline: one uvicorn process whose route runs "
            "`model.generate()` for one request at a time (single-thread executor, requests wait FIFO), fp32. "
            f"Each level runs {seconds:.0f} s (at most {MAX_REQUESTS} requests; requests in flight at the "
            f"deadline are waited for and counted) after a warm-up of {WARMUP_REQUESTS} requests from "
            f"{WARMUP_CLIENTS} clients that is not counted. Clients and servers share this machine's cores. "
            "Ratio rows: throughput rlhf / baseline; latency baseline / rlhf (above 1: rlhf answers sooner). "
            "Two models: the tiny one of the tests, whose steps are so cheap that vLLM's fixed cost per "
            "decoding step dominates, and a larger one where the work per token does, as with real models.",
            *tables,
        ]
    )


def _table(model_dir: str, seconds: float) -> list[str]:
    """Both sides on one model: the table rows, the start-up times and the errors."""
    from benchmarks.common import isolated

    ours = isolated(run_rlhf, model_dir, seconds)
    theirs = isolated(run_baseline, model_dir, seconds)
    rows = []
    for mine, base in zip(ours.levels, theirs.levels, strict=True):
        for side, m in ((ours, mine), (theirs, base)):
            rows.append(
                f"| {m.clients} | {side.name} | {len(m.latencies)} | {len(m.errors)} | {m.seconds:.1f} | "
                f"{m.requests_per_second:,.1f} | {m.tokens_per_second:,.0f} | "
                f"{m.percentile(50) * 1000:,.0f} | {m.percentile(99) * 1000:,.0f} |"
            )
        throughput = mine.requests_per_second / base.requests_per_second if base.latencies else float("nan")
        p50, p99 = (base.percentile(q) / mine.percentile(q) if mine.latencies else float("nan") for q in (50, 99))
        rows.append(
            f"| {mine.clients} | **ratio rlhf / baseline** | | | | **{throughput:.2f}x** | **{throughput:.2f}x** | "
            f"{p50:.2f}x | {p99:.2f}x |"
        )
    return [
        f"Start until the endpoint answers: rlhf {ours.startup_seconds:.0f} s, baseline {theirs.startup_seconds:.0f} s.",
        "",
        "| clients | server | requests | errors | seconds | requests/s | generated tokens/s | p50 ms | p99 ms |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
        *rows,
        "",
        f"Errors (must be none): {_errors(ours)}; {_errors(theirs)}.",
    ]
