"""The LLMServer replicas a run samples its rollouts from: :func:`deploy` starts (or finds) them.

:func:`deploy` deploys only the model deployment of a ``ServeConfig`` (built as
:mod:`serving.app` builds it), without the OpenAI ingress or an HTTP route: rollouts go
through the deployment handle (:class:`serving.rollout.RolloutClient`, which finds the
model's deployment in the application with ``_llm_deployment``). It starts the engines
with ``logprobs_mode="processed_logprobs"``, so the sampled tokens' log-probs are those of
the distribution they were sampled from (see :mod:`serving.rollout`), and, when asked,
with vLLM's weight-transfer backend (:mod:`serving.weight_transfer`). The
:class:`RolloutDeployment` it returns undoes what it did.

Whether Serve runs, the non-blocking deletion of an application and the deployment name
``build_llm_deployment`` derives from a model are Ray internals, in :mod:`serving.ray_internals`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Literal

from serving.ray_internals import delete_application, llm_deployment_id, serve_controller_running
from serving.replicas import RolloutError


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
        delete_application(self.app_name, wait)
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

    from serving.app import llm_config, llm_deployment, validate
    from serving.backends import backend, on_gpu

    validate(config)
    gpu = on_gpu()
    deployment = RolloutDeployment(app_name, "deployed", backend(gpu))
    if not serve_controller_running():
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
        serve.run(llm_deployment(llm), name=app_name, route_prefix=None, blocking=False)
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


def _llm_deployment(app_name: str, model: str) -> str:
    """The name of the deployment serving ``model`` in ``app_name`` (``LLMServer:<model id>``)."""
    from ray import serve

    applications = serve.status().applications
    if app_name not in applications:
        raise RolloutError(f"no Serve application {app_name!r} is running (running: {sorted(applications)})")
    names = list(applications[app_name].deployments)
    suffix = ":" + llm_deployment_id(model)
    matches = [name for name in names if name.endswith(suffix)]
    if len(matches) != 1:
        raise RolloutError(f"application {app_name!r} has no single deployment for model {model!r} (has {names})")
    return matches[0]
