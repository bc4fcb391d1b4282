"""Rollouts from the serving replicas, and new policy weights pushed into every replica.

RLHF samples its rollouts from the same Ray Serve + vLLM replicas that serve the model
(:mod:`serving.app`) and, after each policy update, loads the new weights into them.
:func:`deploy` starts (or finds) the replicas for a run, and the :class:`RolloutDeployment` it returns undoes that;
:class:`RolloutClient` is the building block that uses them:

* :meth:`RolloutClient.generate` samples ``n`` completions per prompt and returns, per
  sample, the prompt and response token ids, vLLM's log-prob of every sampled token and
  the finish reason.
* :meth:`RolloutClient.sync_weights` makes every replica reload the weights saved in a
  directory (safetensors in the layout ``save_pretrained`` writes) and drop its prefix
  cache before it returns. :mod:`serving.weight_transfer` sends a trainer's weights from
  its memory instead, driving the replicas through a :class:`ReplicaSet`.

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

The log-probs are those of the distribution the tokens were sampled from: :func:`deploy`
starts the engines with ``logprobs_mode="processed_logprobs"`` (the log-softmax of the
logits after temperature, top-k and top-p), so at temperature ``T`` they are what a
trainer computes from its own logits divided by ``T`` (with ``top_p=1``). vLLM's default,
``raw_logprobs``, would give the temperature-1 distribution whatever the sampling
temperature. Prompt log-probs (:meth:`RolloutClient.sequence_logprobs`) are raw in both
modes: the model's own distribution at temperature 1.

**The weight sync** must reach every replica, while a handle call reaches one.
``ray.llm``'s internal ``broadcast`` helper reaches all of them but waits without a
timeout and cannot say which replica failed; ``DeploymentHandle.broadcast`` (alpha) has
a timeout but returns anonymous results. So :meth:`RolloutClient.sync_weights` lists the
RUNNING replicas from the Serve controller and calls each replica's actor directly (the
way ``broadcast`` does), waiting for all of them with what is left of one deadline:

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

Ray internals used here and nowhere else (``tests/serving/test_rollout.py::
test_ray_internals_this_module_relies_on`` fails loudly when a Ray release moves them):
the Serve controller's instance details (``ray.serve.context._get_global_client``),
``ray.serve._private.common.RequestMetadata`` and the replica actor's ``handle_request``
and ``handle_request_streaming`` entry points.
"""

from __future__ import annotations

import asyncio
import logging
import os
import pickle
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from cluster.errors import UserError

log = logging.getLogger(__name__)

APP_NAME = "rlhf"
"""The application name ``rlhf serve`` deploys (:data:`serving.server.APP_NAME`)."""

RPC_GRACE_S = 30.0
"""Added to vLLM's timeout of a ``collective_rpc`` beyond the caller's deadline (see :meth:`ReplicaSet.rpc_each`)."""

RESUME_GRACE_S = 10.0
"""Time allowed for ``resume`` after a sync that ran out of time, so no replica stays paused."""


class RolloutError(UserError, RuntimeError):
    """A rollout or a weight sync that failed or timed out; the message names the deployment or replicas."""


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


@dataclass(frozen=True)
class Replica:
    """One running replica of the LLMServer deployment."""

    replica_id: str
    actor_name: str
    pid: int | None = None
    node_ip: str | None = None

    def __str__(self) -> str:
        return f"replica {self.replica_id} (pid {self.pid} on {self.node_ip})"


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
        prompts: Sequence[Sequence[int]] | Sequence[str],
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
        prompts: Sequence[Sequence[int]] | Sequence[str],
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

    async def _complete_all(self, requests: list[Any], timeout_s: float, replica: Replica | None, what: str) -> list:
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
        failed = [task for task in done if not task.cancelled() and task.exception() is not None]
        if failed:
            raise failed[0].exception()
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
                responses = self._handle.completions.remote(request)
            else:
                responses = _call_replica(replica, self.app_name, "completions", (request,), stream=True)
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
        from ray.serve.context import _get_global_client

        details = _get_global_client().get_serve_details()
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
            return _actor(replica).__ray_call__.remote(_weights_problem, weights)

        problems = replicas.on_each(check, f"checking {weights}", deadline, timeout_s)
        if unreadable := [f"{replica}: {problem}" for replica, problem in problems.items() if problem]:
            raise RolloutError(f"cannot sync weights from {weights}: " + "; ".join(unreadable))
        try:
            replicas.call_each("pause", {"mode": "wait", "clear_cache": True}, deadline, timeout_s)
            reload = {"method": "reload_weights", "kwargs": {"weights_path": weights}}
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


@dataclass(frozen=True)
class ReplicaSet:
    """Calls to every one of a fixed set of replicas at once, each set of calls with one deadline.

    Picklable, so the trainer's rank 0 can drive the replicas itself during a weight
    transfer (:class:`ReplicaWeightSync`). A replica that fails or does not answer in time
    is named in the :class:`RolloutError`; pending calls are cancelled.
    """

    app_name: str
    where: str
    replicas: tuple[Replica, ...]
    timeout_s: float

    def deadline(self, timeout_s: float | None = None) -> float:
        """The monotonic time ``timeout_s`` (default: the set's timeout) from now."""
        return time.monotonic() + (self.timeout_s if timeout_s is None else timeout_s)

    def call_each(
        self, method: str, kwargs: dict, deadline: float | None = None, timeout_s: float | None = None
    ) -> dict[Replica, Any]:
        """``LLMServer.<method>(**kwargs)`` on every replica at once; their results by replica."""
        return self.on_each(
            lambda replica: _call_replica(replica, self.app_name, method, kwargs=kwargs), method, deadline, timeout_s
        )

    def rpc_each(self, method: str, kwargs_per_replica: list[dict] | dict | None = None) -> None:
        """vLLM's ``collective_rpc(method, kwargs)`` on every worker of every replica, within the timeout.

        ``kwargs_per_replica`` is one dict for all or a list with one per replica.
        """
        deadline = self.deadline()
        per = (
            kwargs_per_replica
            if isinstance(kwargs_per_replica, list)
            else [kwargs_per_replica or {}] * len(self.replicas)
        )
        calls = dict(zip(self.replicas, per, strict=True))

        def send(replica: Replica) -> Any:
            # vLLM's own timeout comes after ours and after the workers' (which they are given as the same
            # timeout): if it fired while a worker was still busy, the worker's late answer would be taken for
            # the answer to the engine's next call
            timeout = max(1.0, deadline - time.monotonic()) + RPC_GRACE_S
            rpc = {"method": method, "kwargs": calls[replica], "timeout": timeout}
            return _call_replica(replica, self.app_name, "collective_rpc", kwargs=rpc)

        self.on_each(send, method, deadline, self.timeout_s)

    def resume(self, deadline: float) -> None:
        """Resume every replica (given a few seconds even when the deadline has passed)."""
        deadline = max(deadline, time.monotonic() + RESUME_GRACE_S)
        self.call_each("resume", {}, deadline, deadline - time.monotonic())

    def resume_quietly(self, deadline: float | None = None) -> None:
        """:meth:`resume` after a failure: logs what goes wrong instead of hiding the first error."""
        try:
            self.resume(self.deadline(0.0) if deadline is None else deadline)
        except RolloutError as exc:
            log.error("%s", exc)

    def on_each(
        self,
        send: Callable[[Replica], Any],
        what: str,
        deadline: float | None = None,
        timeout_s: float | None = None,
    ) -> dict[Replica, Any]:
        """Send one call to every replica and wait for all answers until ``deadline``; name the failures."""
        import ray

        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        deadline = self.deadline(timeout_s) if deadline is None else deadline
        calls: dict[Any, Replica] = {}
        failures = []
        for replica in self.replicas:
            try:
                calls[send(replica)] = replica
            except ValueError as exc:  # ray.get_actor: the replica's actor is gone
                failures.append(f"{replica}: {exc}")
        ready, pending = [], []
        if calls:
            remaining = max(0.0, deadline - time.monotonic())
            ready, pending = ray.wait(list(calls), num_returns=len(calls), timeout=remaining)
        for ref in pending:
            ray.cancel(ref)
            failures.append(f"{calls[ref]}: no answer within the {timeout_s:.1f} s timeout")
        results = {}
        for ref in ready:
            try:
                results[calls[ref]] = ray.get(ref)
            except Exception as exc:
                failures.append(f"{calls[ref]}: {_reason(exc)}")
        if failures:
            raise RolloutError(
                f"{what} failed on {len(failures)} of {len(self.replicas)} replicas of {self.where}: "
                + "; ".join(failures)
            )
        return results


def _llm_deployment(app_name: str, model: str) -> str:
    """The name of the deployment serving ``model`` in ``app_name`` (``LLMServer:<model id>``)."""
    from ray import serve

    applications = serve.status().applications
    if app_name not in applications:
        raise RolloutError(f"no Serve application {app_name!r} is running (running: {sorted(applications)})")
    names = list(applications[app_name].deployments)
    suffix = ":" + model.replace("/", "--").replace(".", "_")  # how ray.serve.llm names the deployment
    matches = [name for name in names if name.endswith(suffix)]
    if len(matches) != 1:
        raise RolloutError(f"application {app_name!r} has no single deployment for model {model!r} (has {names})")
    return matches[0]


def _prompt(prompt: Sequence[int] | str, index: int) -> list[int] | str:
    if isinstance(prompt, str):
        if not prompt:
            raise ValueError(f"prompt {index} is empty")
        return prompt
    token_ids = [int(token) for token in prompt]
    if not token_ids:
        raise ValueError(f"prompt {index} is empty")
    return token_ids


def _prompt_logprobs(sequence: list[int], entries: list | None) -> list[float]:
    """``log p(sequence[t+1] | ...)`` for each t, from vLLM's per-position ``{token_id: Logprob}`` entries."""
    if not entries or len(entries) != len(sequence):
        raise RolloutError(f"expected {len(sequence)} prompt log-prob entries, got {len(entries or [])}")
    values = []
    for token, entry in zip(sequence[1:], entries[1:], strict=True):
        logprob = entry[token]
        values.append(float(logprob["logprob"] if isinstance(logprob, dict) else logprob.logprob))
    return values


def _weights_problem(_actor: Any, directory: str) -> str | None:
    """Run on a replica's node (through ``__ray_call__``): why it cannot reload weights from ``directory``, or None."""
    path = Path(directory)
    if not path.is_dir():
        return f"{directory} does not exist or is not a directory on this node"
    if not os.access(path, os.R_OK | os.X_OK):
        return f"{directory} is not readable"
    if not any(path.glob("*.safetensors")):
        return f"{directory} holds no *.safetensors files"
    return None


def _actor(replica: Replica) -> Any:
    import ray

    return ray.get_actor(replica.actor_name, namespace="serve")


def _call_replica(
    replica: Replica, app_name: str, method: str, args: tuple = (), kwargs: dict | None = None, stream: bool = False
) -> Any:
    """Call ``LLMServer.<method>(*args, **kwargs)`` on this replica, bypassing the router (as ``broadcast`` does).

    Returns an ObjectRef, or for ``stream=True`` (methods that return a generator) an
    ObjectRefGenerator.
    """
    from ray.serve._private.common import RequestMetadata

    request_id = f"rollout-{uuid.uuid4()}"
    metadata = RequestMetadata(
        request_id=request_id,
        internal_request_id=request_id,
        call_method=method,
        app_name=app_name,
        is_streaming=stream,
    )
    actor = _actor(replica)
    entry = actor.handle_request_streaming.options(num_returns="streaming") if stream else actor.handle_request
    return entry.remote(pickle.dumps(metadata), *args, **(kwargs or {}))


def _cancel(responses: Any) -> None:
    """Cancel a handle response generator or an ObjectRefGenerator, best effort."""
    import ray

    try:
        if hasattr(responses, "cancel"):
            responses.cancel()
        else:
            ray.cancel(responses)
    except Exception as exc:  # cancelling is a courtesy to the replica; the caller's error is what matters
        log.debug("could not cancel a request: %s", exc)


def _reason(exc: BaseException) -> str:
    """One line saying why: a RayTaskError's text ends with the replica's own ``Type: message``."""
    import ray

    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    return lines[-1] if isinstance(exc, ray.exceptions.RayTaskError) else f"{type(exc).__name__}: {lines[-1]}"


@dataclass(frozen=True)
class RolloutDeployment:
    """A rollout application as :func:`deploy` left it running; :meth:`release` undoes what it did.

    ``how`` is ``"reused"`` (an application of that name was running already: it is used as it is,
    the caller syncs its weights before generating), ``"deployed"`` (on the running Serve instance)
    or ``"started"`` (Serve itself was started for it, without HTTP proxies: rollouts go through the
    deployment handle). ``transfer_backend`` is the weight-transfer backend of the device the
    replicas run on (``nccl`` on GPUs, ``gloo`` on CPUs), decided once here.
    """

    app_name: str
    how: Literal["reused", "deployed", "started"]
    transfer_backend: str

    def release(self, wait: bool = True) -> None:
        """Delete the application if :func:`deploy` deployed it (``"reused"``: nothing).

        When :func:`deploy` started Serve for it, Serve is shut down too, unless other applications
        (another run's) run on it now. ``wait=False`` (a run that failed or is being stopped) only
        has the deletion accepted by Serve's controller, which carries it out on its own: a stopped
        driver may be killed a few seconds later.
        """
        from ray import serve

        if self.how == "reused":
            return
        serve.delete(self.app_name, _blocking=wait)
        others = serve.status().applications  # also makes sure the controller has the deletion before we go on
        if wait and self.how == "started" and not set(others) - {self.app_name}:
            serve.shutdown()


def deploy(config: Any, app_name: str, timeout_s: float = 600.0, weight_transfer: bool = False) -> RolloutDeployment:
    """Make sure ``app_name`` runs the LLMServer replicas of ``config`` (a ``ServeConfig``).

    Only the model deployment is deployed, without the OpenAI ingress or an HTTP route.
    ``weight_transfer`` starts the engines with vLLM's weight-transfer backend
    (:mod:`serving.weight_transfer`). Call :meth:`RolloutDeployment.release` at the end. Raises
    :class:`RolloutError` when the application fails to deploy or is not running within
    ``timeout_s``.
    """
    from ray import serve
    from ray.llm._internal.serve.core.server.builder import build_llm_deployment
    from ray.serve.context import _get_global_client

    from serving.app import llm_config, validate
    from serving.backends import backend, on_gpu

    validate(config)
    gpu = on_gpu()
    deployment = RolloutDeployment(app_name, "deployed", backend(gpu))
    if _get_global_client(raise_if_no_controller_running=False) is None:
        serve.start(proxy_location="Disabled")
        deployment = RolloutDeployment(app_name, "started", backend(gpu))
    elif app_name in serve.status().applications:
        return RolloutDeployment(app_name, "reused", backend(gpu))
    llm = llm_config(config, gpu=gpu, weight_transfer=weight_transfer)
    # the sampled tokens' log-probs in the distribution they were sampled from (temperature applied), which is what
    # the trainer's log-probs are compared with and corrected towards
    llm.engine_kwargs["logprobs_mode"] = "processed_logprobs"
    # a step sends hundreds of requests: no access-log line per request
    llm.deployment_config["logging_config"] = {"enable_access_log": False}
    try:
        serve.run(build_llm_deployment(llm), name=app_name, route_prefix=None, blocking=False)
        deadline = time.monotonic() + timeout_s
        status = None
        while time.monotonic() < deadline:
            status = serve.status().applications.get(app_name)
            if status is not None and status.status == "RUNNING":
                return deployment
            if status is not None and status.status in ("DEPLOY_FAILED", "UNHEALTHY"):
                message = (status.message or "").strip().splitlines()
                raise RolloutError(
                    f"rollout application {app_name!r} failed to deploy: {message[-1] if message else '?'}"
                )
            time.sleep(1.0)
        raise RolloutError(
            f"rollout application {app_name!r} was not running within {timeout_s:.0f} s "
            f"(last status: {getattr(status, 'status', 'not deployed')})"
        )
    except BaseException:  # a failure, or a stop (SIGTERM, Ctrl-C) while the replicas start: nothing is left behind
        deployment.release(wait=False)
        raise
