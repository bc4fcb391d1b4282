"""The private pieces of Ray that ``rlhf``, ``serving`` and ``cluster`` rely on, each behind one small function.

No other module of the three packages imports from ``ray._private``, ``ray.serve._private`` or
``ray.llm._internal``, imports a ``_``-prefixed name from Ray, passes a Ray function a ``_``-prefixed
argument, overrides a private member of a Ray class or calls ``__ray_call__``
(``tests/unit/test_ray_internals.py::test_only_serving_ray_internals_touches_private_ray_names``).
What has a public counterpart is used through it where it is needed: ``ray.serve.llm.build_llm_deployment``,
``ray.serve.llm.LLMServer``, ``serve.ingress``.
``tests/unit/test_ray_internals.py`` checks every internal below (names, signatures, fields, what Ray does with
them) without a Ray cluster, so a Ray release that moves one fails there rather than in a live deployment: the
replicas' in ``test_the_serve_replica_internals_it_relies_on`` and
``test_llm_deployment_id_is_how_build_llm_deployment_names_the_deployment``, the ingress's in
``test_the_replica_app_internals_it_relies_on``.

Serve's replicas (:mod:`serving.replicas`, :mod:`serving.rollout`, :mod:`serving.deploy`):

* :func:`call_replica`: ``ray.serve._private.common.RequestMetadata``, pickled by hand, and the replica
  actor's ``handle_request`` / ``handle_request_streaming`` (``ray.serve._private.replica.ReplicaActor``).
  A weight sync must reach every replica, each named when it fails, within one deadline: a handle call
  reaches one replica the router picks, ``DeploymentHandle.broadcast`` (alpha) returns anonymous results,
  and ``ray.llm``'s internal ``broadcast`` waits without a timeout (and calls the actors the same way).
* :func:`replica_actor`: Serve's actor namespace (``ray.serve._private.constants.SERVE_NAMESPACE``), in
  which the replica actors Serve lists by name live; ``ray.get_actor`` needs it and no public API names it.
* :func:`run_on_replica_actor`: the actor method ``__ray_call__`` (a DeveloperAPI, not public), which runs a function
  in the replica's process: a weight sync first checks the directory on each replica's own node, which no
  ``LLMServer`` method does.
* :func:`serve_controller_running` and :func:`serve_instance_details`:
  ``ray.serve.context._get_global_client``, the Serve controller's client. ``serve.status()`` lists no
  replicas and answers the same whether no controller runs or one runs with no application; the
  controller's instance details (the public schema ``ray.serve.schema.ServeInstanceDetails``) list each
  replica's id, actor name, state, pid and node, and otherwise only the dashboard's REST API serves them.
* :func:`delete_application`: ``serve.delete``'s private ``_blocking`` argument; the public call waits
  until the application is gone, which a stopped driver about to be killed cannot.
* :func:`llm_deployment_id`: ``ray.llm._internal.serve.core.server.builder._get_deployment_name``, how
  ``build_llm_deployment`` names a model's deployment (``<server class>:<this>``); a rollout client finds
  the deployment of its model in a running application by it, and no public API maps the two.

* :func:`engine_class`: a subclass of ``ray.llm._internal.serve.engines.vllm.vllm_engine.VLLMEngine``,
  handed to ``build_llm_deployment``'s public ``bind_kwargs`` as ``engine_cls``. It changes two things Ray
  does when a replica starts, each of which cost a process and its imports of vLLM (measured on the 2-core
  CI machine, a replica of the tiny model: 79 s from deployment to running, 19 s of them in the first and 17 s
  in the second; 43 s without them):
  Ray runs a task on every node of the replica to fetch the model, which only does anything for an
  ``s3://``/``gs://`` source (a hub id is fetched by vLLM itself, a directory needs nothing), so it is
  skipped for other sources (``CallbackCtx.run_init_node``); and on CPUs Ray sets vLLM's executor to
  ``mp``, which starts one more process for the one worker of a single-process engine, where vLLM's
  ``uni`` executor runs that worker in the engine's own process. On CPUs it also gives the engine process the
  threads of ``engine_threads`` before it starts (:func:`serving.backends.use_cpu_engine_threads`).

The endpoint's ingress (:mod:`serving.ingress`) subclasses the public ``ray.serve.llm.LLMServer`` and relies on
two things of the engine that replica runs which ``ray.serve.llm`` does not document: its ``engine`` attribute
and that engine's ``build_asgi_app()``, vLLM's own OpenAI app over the running engine (what Ray's direct-streaming
mode serves); ``tests/unit/test_ray_internals.py::test_the_replica_app_internals_it_relies_on`` checks both.
"""

from __future__ import annotations

import functools
import os
import pickle
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ray import ObjectRef
    from ray.actor import ActorHandle


# ---- Serve's replicas -----------------------------------------------------------------------------------------------


def replica_actor(actor_name: str) -> ActorHandle[Any]:
    """The actor of the Serve replica named ``actor_name`` (as the controller lists it); ValueError when it is gone."""
    import ray
    from ray.serve._private.constants import SERVE_NAMESPACE

    return ray.get_actor(actor_name, namespace=SERVE_NAMESPACE)


def call_replica(
    actor_name: str,
    app_name: str,
    method: str,
    args: tuple[Any, ...] = (),
    kwargs: dict[str, Any] | None = None,
    stream: bool = False,
) -> Any:
    """Call ``<deployment class>.<method>(*args, **kwargs)`` on one replica, bypassing the router.

    Returns an ObjectRef, or for ``stream=True`` (methods that return a generator) an
    ObjectRefGenerator. Raises ValueError when the replica's actor is gone.
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
    actor = replica_actor(actor_name)
    entry: Any = actor.handle_request_streaming.options(num_returns="streaming") if stream else actor.handle_request
    return entry.remote(pickle.dumps(metadata), *args, **(kwargs or {}))


def run_on_replica_actor(actor_name: str, function: Callable[..., Any], *args: Any) -> ObjectRef[Any]:
    """Run ``function(replica_actor_instance, *args)`` in the replica's process; the ObjectRef of its result."""
    return replica_actor(actor_name).__ray_call__.remote(function, *args)


def serve_controller_running() -> bool:
    """Whether a Serve controller runs in the connected Ray cluster."""
    from ray.serve.context import _get_global_client

    return _get_global_client(raise_if_no_controller_running=False) is not None


def serve_instance_details() -> dict[str, Any] | None:
    """The Serve controller's account of every application, deployment and replica; None when no controller runs.

    The JSON form of ``ray.serve.schema.ServeInstanceDetails``: ``["applications"][app]["deployments"]
    [deployment]["replicas"]`` is a list of ``ReplicaDetails`` (``replica_id``, ``actor_name``, ``state``,
    ``pid``, ``node_ip``, ...).
    """
    from ray.serve.context import _get_global_client

    client = _get_global_client(raise_if_no_controller_running=False)
    return None if client is None else client.get_serve_details()


def delete_application(app_name: str, wait: bool) -> None:
    """Delete a Serve application; ``wait=False`` only has the deletion accepted by the controller."""
    from ray import serve

    serve.delete(app_name, _blocking=wait)


def llm_deployment_id(model_id: str) -> str:
    """The part of the deployment's name ``build_llm_deployment`` derives from ``model_id``.

    The deployment is named ``<server class>:<this>`` (``LLMServer:org--model_v1`` for ``org/model.v1``).
    """
    from ray.llm._internal.serve.core.server.builder import _get_deployment_name
    from ray.serve.llm import LLMConfig

    return _get_deployment_name(LLMConfig(model_loading_config={"model_id": model_id}))


@functools.cache
def engine_class() -> type[Any]:
    """The vLLM engine class a replica of the project's deployments runs (see the module docstring)."""
    import torch
    from ray.llm._internal.common.utils.cloud_utils import is_remote_path
    from ray.llm._internal.serve.engines.vllm.vllm_engine import VLLMEngine

    from serving.backends import use_cpu_engine_threads

    class LeanVLLMEngine(VLLMEngine):
        """Ray's vLLM engine without the node task for local sources and, on CPUs, with one process computing on
        the configured threads."""

        async def start(self) -> None:
            engine_config: Any = self.llm_config.get_engine_config()
            callback: Any = self.llm_config.get_or_create_callback()
            if not is_remote_path(engine_config.actual_hf_model_id):  # Ray's task would return it unchanged
                callback.ctx.run_init_node = False
                # the one other thing that task does, for torch on GPUs
                os.makedirs(Path(torch.hub.get_dir()).parent / "kernels", exist_ok=True)
            await super().start()

        def _prepare_engine_config(self, callback_ctx: Any) -> Any:
            engine_args, frontend_args, vllm_config = super()._prepare_engine_config(callback_ctx)
            parallel = vllm_config.parallel_config
            if vllm_config.device_config.device_type == "cpu":
                use_cpu_engine_threads()
                if parallel.world_size == 1:
                    parallel.distributed_executor_backend = "uni"
            return engine_args, frontend_args, vllm_config

    # pickled by reference (replicas import it from this module, through __getattr__ below)
    LeanVLLMEngine.__module__, LeanVLLMEngine.__qualname__ = __name__, "LeanVLLMEngine"
    return LeanVLLMEngine


def __getattr__(name: str) -> Any:  # the engine class by name, for pickle, without importing vLLM at import time
    if name == "LeanVLLMEngine":
        return engine_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
