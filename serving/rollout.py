"""Rollouts from the serving replicas, and new policy weights pushed into every replica.

RLHF samples its rollouts from the same Ray Serve + vLLM replicas that serve the model
(:mod:`serving.app`) and, after each policy update, loads the new weights into them.
The replicas are started (or found) by :func:`serving.deploy.deploy`, and the
:class:`~serving.deploy.RolloutDeployment` it returns undoes that; :class:`RolloutClient`
is the building block that uses them:

* :meth:`RolloutClient.generate` samples ``n`` completions per prompt and returns, per
  sample, the prompt and response token ids, vLLM's log-prob of every sampled token and
  the finish reason.
* :meth:`RolloutClient.sync_weights` makes every replica reload the weights saved in a
  directory (safetensors in the layout ``save_pretrained`` writes) and drop its prefix
  cache before it returns. :mod:`serving.weight_transfer` sends a trainer's weights from
  its memory instead, driving the replicas through a :class:`~serving.replicas.ReplicaSet`.

**Generation** goes through the ``LLMServer`` deployment's handle
(``serve.get_deployment_handle``, the call the OpenAI ingress itself makes, with
``ray.serve.llm``'s ``CompletionRequest``), not through HTTP: the RLHF driver is a Ray
driver already, so this needs no URL or API key, skips the JSON round trip and the public
endpoint's request limits (``max_tokens_limit``), and Serve still load-balances the
requests over the replicas next to production traffic. One request per prompt carries
its ``n`` samples (vLLM's parallel sampling; with ``seed`` the samples of prompt ``i``
get seeds ``seed + i*n + j``, so a call is reproducible and no two samples share one);
up to ``max_concurrency`` requests are in flight at once. vLLM's own completion fields
``return_token_ids`` and ``logprobs=0`` return the token ids and the sampled tokens'
log-probs.

The log-probs are those of the distribution the tokens were sampled from:
:func:`~serving.deploy.deploy` starts the engines with ``logprobs_mode="processed_logprobs"``
(the log-softmax of the logits after temperature, top-k and top-p), so at temperature
``T`` they are what a trainer computes from its own logits divided by ``T`` (with
``top_p=1``). vLLM's default, ``raw_logprobs``, would give the temperature-1 distribution
whatever the sampling temperature. Prompt log-probs (:meth:`RolloutClient.sequence_logprobs`)
are raw in both modes: the model's own distribution at temperature 1.

**The weight sync** must reach every replica, while a handle call reaches one, so
:meth:`RolloutClient.sync_weights` lists the RUNNING replicas from the Serve controller and
calls each of them through a :class:`~serving.replicas.ReplicaSet` (each replica's actor
directly, with what is left of one deadline):

1. every replica checks, on its own node, that the directory holds safetensors (a
   missing path would otherwise be taken for a hub id, and a failed reload leaves the
   engine's model half-loaded);
2. ``pause`` (in-flight requests finish first, new ones wait), ``collective_rpc
   ("reload_weights", weights_path=DIR)`` (vLLM's in-place reload, every TP/PP worker),
   ``collective_rpc("refresh_tied_weights")`` (a tied output layer follows its embeddings:
   :mod:`serving.vllm_worker`), ``reset_prefix_cache`` (cached prefixes hold the old
   weights' keys and values);
3. ``resume``, also after a failure.

A replica that fails or does not answer in time is named (id, pid, node) in the
:class:`RolloutError`; pending calls are cancelled. A failed sync can leave replicas on
different weights: sync again (to the new or the previous directory).

The directory is read by each replica on its own node: on one machine any local
directory works; on a multi-node cluster it must sit at the same path on a shared
filesystem (NFS, a mounted bucket). A replica that Serve starts after a sync (a
replacement, or autoscaling) loads the deployment's original model: compare
:meth:`RolloutClient.replicas` with the list :meth:`~RolloutClient.sync_weights`
returned, and sync again when it changed.

The Serve controller's replica list, the call to one replica and the check run in a replica's
process are Ray internals, in :mod:`serving.ray_internals` (:func:`~serving.ray_internals.serve_instance_details`,
:func:`~serving.ray_internals.call_replica`, :func:`~serving.ray_internals.run_on_replica_actor`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from serving.deploy import _llm_deployment
from serving.ray_internals import call_replica, run_on_replica_actor, serve_instance_details
from serving.replicas import RPC_GRACE_S, Replica, ReplicaSet, RolloutError, _cancel, _reason

if TYPE_CHECKING:
    from ray.serve.handle import DeploymentResponseGenerator

log = logging.getLogger(__name__)

APP_NAME = "rlhf"
"""The application name ``rlhf serve`` deploys (:data:`serving.server.APP_NAME`)."""


@dataclass(frozen=True)
class Sample:
    """One sampled completion of one prompt."""

    prompt_index: int
    sample_index: int
    prompt_token_ids: list[int]
    token_ids: list[int]
    """The response's token ids, the EOS token included when the sample ended on it."""
    logprobs: list[float]
    """vLLM's log-prob of each of ``token_ids`` under the served weights, in the sampling distribution (the
    temperature, top-k and top-p applied; see the module docstring)."""
    finish_reason: str
    """``"stop"`` (EOS, a stop token or string), ``"length"`` (``max_tokens`` reached) or ``"abort"``."""
    text: str


class RolloutClient:
    """Rollouts from, and weight syncs to, the LLMServer replicas of a running serving application.

    Use it from a process connected to the Ray cluster that runs the application (the RLHF
    driver). ``model`` is the base model's name in the application (its ``model_name``).
    """

    def __init__(self, model: str, app_name: str = APP_NAME, max_concurrency: int = 256) -> None:
        import ray
        from ray import serve

        if not ray.is_initialized():
            raise RolloutError("this process is not connected to a Ray cluster: call cluster.connect.connect first")
        self.model = model
        self.app_name = app_name
        self.max_concurrency = max_concurrency
        self.deployment = _llm_deployment(app_name, model)
        self._handle = serve.get_deployment_handle(self.deployment, app_name=app_name).options(stream=True)

    def __repr__(self) -> str:
        return f"RolloutClient(model={self.model!r}, app_name={self.app_name!r})"

    @property
    def _where(self) -> str:
        return f"deployment {self.deployment} of application {self.app_name!r}"

    # ---- generation -------------------------------------------------------------------

    def generate(
        self,
        prompts: Sequence[Sequence[int] | str],
        n: int = 1,
        max_tokens: int = 16,
        temperature: float = 1.0,
        seed: int | None = None,
        timeout_s: float = 120.0,
        top_p: float = 1.0,
        replica: Replica | None = None,
    ) -> list[Sample]:
        """``n`` samples per prompt, prompt-major: element ``i*n + j`` is sample ``j`` of prompt ``i``.

        ``prompts`` are token-id lists (used as given) or strings (tokenized by the
        server, special tokens added). ``replica`` pins every request to one replica
        (checks, debugging); by default Serve balances them. Raises :class:`RolloutError`
        when the server refuses a request, fails, or has not answered them all within
        ``timeout_s``. Not from inside a running event loop: use :meth:`agenerate` there.
        """
        return asyncio.run(self.agenerate(prompts, n, max_tokens, temperature, seed, timeout_s, top_p, replica))

    async def agenerate(
        self,
        prompts: Sequence[Sequence[int] | str],
        n: int = 1,
        max_tokens: int = 16,
        temperature: float = 1.0,
        seed: int | None = None,
        timeout_s: float = 120.0,
        top_p: float = 1.0,
        replica: Replica | None = None,
    ) -> list[Sample]:
        """:meth:`generate` as a coroutine."""
        requests = [
            self._request(
                _prompt(prompt, i),
                n=n,
                max_tokens=max_tokens,
                temperature=temperature,
                top_p=top_p,
                seed=None if seed is None else seed + i * n,
                logprobs=0,
            )
            for i, prompt in enumerate(prompts)
        ]
        responses = await self._complete_all(requests, timeout_s, replica, "generate")
        return [sample for i, response in enumerate(responses) for sample in self._samples(i, response, n)]

    def sequence_logprobs(
        self, sequences: Sequence[Sequence[int]], timeout_s: float = 60.0, replica: Replica | None = None
    ) -> list[list[float]]:
        """The served model's log-prob of each token of each sequence given the tokens before it.

        Element ``[i][t]`` is ``log p(sequences[i][t+1] | sequences[i][:t+1])`` (vLLM's
        prompt log-probs, raw logits), so each list is one shorter than its sequence.
        """
        return asyncio.run(self.asequence_logprobs(sequences, timeout_s, replica))

    async def asequence_logprobs(
        self, sequences: Sequence[Sequence[int]], timeout_s: float = 60.0, replica: Replica | None = None
    ) -> list[list[float]]:
        """:meth:`sequence_logprobs` as a coroutine."""
        for i, sequence in enumerate(sequences):
            if len(_prompt(sequence, i)) < 2:
                raise ValueError(f"sequence {i} has fewer than 2 tokens: nothing to score")
        requests = [self._request(list(s), max_tokens=1, temperature=0.0, prompt_logprobs=0) for s in sequences]
        responses = await self._complete_all(requests, timeout_s, replica, "sequence_logprobs")
        return [
            _prompt_logprobs(list(s), r.choices[0].prompt_logprobs) for s, r in zip(sequences, responses, strict=True)
        ]

    def _request(self, prompt: list[int] | str, **fields: Any) -> Any:
        from ray.serve.llm.openai_api_models import CompletionRequest

        return CompletionRequest(model=self.model, prompt=prompt, return_token_ids=True, stream=False, **fields)

    async def _complete_all(
        self, requests: list[Any], timeout_s: float, replica: Replica | None, what: str
    ) -> list[Any]:
        """The responses to ``requests`` in order; the first failure, or a timeout, cancels the rest."""
        gate = asyncio.Semaphore(self.max_concurrency)

        async def one(request: Any) -> Any:
            async with gate:
                return await self._complete(request, replica)

        tasks = [asyncio.ensure_future(one(request)) for request in requests]
        if not tasks:
            return []
        done, pending = await asyncio.wait(tasks, timeout=timeout_s, return_when=asyncio.FIRST_EXCEPTION)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending)
        failed = [error for task in done if not task.cancelled() and (error := task.exception()) is not None]
        if failed:
            raise failed[0]
        if pending:
            waiting = [i for i, task in enumerate(tasks) if task in pending]
            where = str(replica) if replica else self._where
            raise RolloutError(
                f"{what}: {len(waiting)} of {len(tasks)} requests got no answer from {where} within "
                f"{timeout_s:.1f} s (prompts {waiting[:8]}{' ...' if len(waiting) > 8 else ''}); they were cancelled"
            )
        return [task.result() for task in tasks]

    async def _complete(self, request: Any, replica: Replica | None) -> Any:
        """The one response to a non-streaming completion request, from the deployment or from ``replica``."""
        import ray

        where = str(replica) if replica else self._where
        responses = None
        try:
            if replica is None:
                # the handle streams (options(stream=True)), which Ray's types cannot tell
                responses = cast("DeploymentResponseGenerator[Any]", self._handle.completions.remote(request))
            else:
                responses = call_replica(replica.actor_name, self.app_name, "completions", (request,), stream=True)
            response = await responses.__anext__()
            if isinstance(response, ray.ObjectRef):
                response = await response
        except asyncio.CancelledError:
            if responses is not None:
                _cancel(responses)
            raise
        except StopAsyncIteration:
            raise RolloutError(f"{where} returned no response") from None
        except Exception as exc:
            raise RolloutError(f"{where} failed: {_reason(exc)}") from exc
        if not hasattr(response, "choices"):
            error = getattr(response, "error", response)
            message = getattr(error, "message", error)
            raise RolloutError(f"{where} refused the request: {message} (code {getattr(error, 'code', '?')})")
        return response

    def _samples(self, prompt_index: int, response: Any, n: int) -> list[Sample]:
        choices = sorted(response.choices, key=lambda choice: choice.index)
        if len(choices) != n:
            raise RolloutError(f"{self._where} returned {len(choices)} samples for prompt {prompt_index}, not {n}")
        samples = []
        for choice in choices:
            token_ids = list(choice.token_ids or [])
            logprobs = [float(lp) for lp in choice.logprobs.token_logprobs] if choice.logprobs else []
            if len(logprobs) != len(token_ids):
                raise RolloutError(
                    f"{self._where} returned {len(token_ids)} tokens but {len(logprobs)} log-probs "
                    f"for prompt {prompt_index} sample {choice.index}"
                )
            samples.append(
                Sample(
                    prompt_index=prompt_index,
                    sample_index=choice.index,
                    prompt_token_ids=list(choice.prompt_token_ids or []),
                    token_ids=token_ids,
                    logprobs=logprobs,
                    finish_reason=choice.finish_reason or "",
                    text=choice.text,
                )
            )
        return samples

    # ---- replicas and weights ---------------------------------------------------------

    def replicas(self) -> list[Replica]:
        """The deployment's RUNNING replicas, as the Serve controller sees them now."""
        details = serve_instance_details()
        if details is None:
            raise RolloutError(f"{self._where}: Serve is not running in this Ray cluster")
        try:
            replicas = details["applications"][self.app_name]["deployments"][self.deployment]["replicas"]
        except KeyError:
            raise RolloutError(f"{self._where} is not deployed any more") from None
        running = [r for r in replicas if r.get("state") == "RUNNING"]
        return sorted(
            (Replica(r["replica_id"], r["actor_name"], r.get("pid"), r.get("node_ip")) for r in running),
            key=lambda replica: replica.replica_id,
        )

    def sync_weights(self, directory: str | Path, timeout_s: float = 120.0) -> list[Replica]:
        """Make every running replica serve the weights in ``directory``; return the replicas synced.

        ``directory`` holds safetensors as ``save_pretrained`` writes them (the model's
        architecture and parameter names unchanged) at a path every replica's node can
        read. When this returns, every replica has reloaded them and dropped its prefix
        cache. Raises :class:`RolloutError`, naming the replicas, when one cannot read the
        directory, fails, or does not answer within ``timeout_s`` (all steps together).
        """
        weights = str(Path(directory).expanduser().absolute())
        started = time.monotonic()
        replicas = self.replica_set(timeout_s)
        deadline = replicas.deadline(timeout_s)

        def check(replica: Replica) -> Any:
            return run_on_replica_actor(replica.actor_name, _weights_problem, weights)

        problems = replicas.on_each(check, f"checking {weights}", deadline, timeout_s)
        if unreadable := [f"{replica}: {problem}" for replica, problem in problems.items() if problem]:
            raise RolloutError(f"cannot sync weights from {weights}: " + "; ".join(unreadable))
        try:
            replicas.call_each("pause", {"mode": "wait", "clear_cache": True}, deadline, timeout_s)
            reload: dict[str, Any] = {"method": "reload_weights", "kwargs": {"weights_path": weights}}
            reload["timeout"] = max(1.0, deadline - time.monotonic()) + RPC_GRACE_S
            replicas.call_each("collective_rpc", reload, deadline, timeout_s)
            # a tied output layer is not reloaded with its embeddings (serving.vllm_worker)
            refresh = {"method": "refresh_tied_weights", "timeout": max(1.0, deadline - time.monotonic()) + RPC_GRACE_S}
            replicas.call_each("collective_rpc", refresh, deadline, timeout_s)
            replicas.call_each("reset_prefix_cache", {}, deadline, timeout_s)
        except BaseException:
            replicas.resume_quietly(deadline)
            raise
        replicas.resume(deadline)
        log.info("synced %d replicas to %s in %.2f s", len(replicas.replicas), weights, time.monotonic() - started)
        return list(replicas.replicas)

    def replica_set(self, timeout_s: float) -> ReplicaSet:
        """The running replicas as a :class:`ReplicaSet` (picklable: it may travel to another actor)."""
        replicas = self.replicas()
        if not replicas:
            raise RolloutError(f"{self._where} has no running replica")
        return ReplicaSet(self.app_name, self._where, tuple(replicas), timeout_s)


def _prompt(prompt: Sequence[int] | str, index: int) -> list[int] | str:
    if isinstance(prompt, str):
        if not prompt:
            raise ValueError(f"prompt {index} is empty")
        return prompt
    token_ids = [int(token) for token in prompt]
    if not token_ids:
        raise ValueError(f"prompt {index} is empty")
    return token_ids


def _prompt_logprobs(sequence: list[int], entries: list[Any] | None) -> list[float]:
    """``log p(sequence[t+1] | ...)`` for each t, from vLLM's per-position ``{token_id: Logprob}`` entries."""
    if not entries or len(entries) != len(sequence):
        raise RolloutError(f"expected {len(sequence)} prompt log-prob entries, got {len(entries or [])}")
    values = []
    for token, entry in zip(sequence[1:], entries[1:], strict=True):
        logprob = entry[token]
        values.append(float(logprob["logprob"] if isinstance(logprob, dict) else logprob.logprob))
    return values


def _weights_problem(_actor: Any, directory: str) -> str | None:
    """Run in a replica's process, on its node: why it cannot reload weights from ``directory``, or None."""
    path = Path(directory)
    if not path.is_dir():
        return f"{directory} does not exist or is not a directory on this node"
    if not os.access(path, os.R_OK | os.X_OK):
        return f"{directory} is not readable"
    if not any(path.glob("*.safetensors")):
        return f"{directory} holds no *.safetensors files"
    return None
