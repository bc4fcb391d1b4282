"""An RL run's rollout replicas: their deployment on Ray Serve, and bringing them to the policy's weights."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rlhf.rl.config import PPOConfig
    from rlhf.rl.roles import Roles
    from serving.deploy import RolloutDeployment
    from serving.replicas import Replica
    from serving.rollout import RolloutClient

POLICY_MODEL_NAME = "policy"
"""The model name the replicas serve the policy under."""


def deploy_rollouts(config: PPOConfig, app_name: str) -> RolloutDeployment:
    """Deploy (or, with a name the user gave, find) the policy's rollout replicas as the Serve application
    ``app_name``; the :class:`serving.deploy.RolloutDeployment` to release at the end."""
    from rlhf.models.loading import resolve
    from serving.config import ServeConfig
    from serving.deploy import deploy

    r = config.rollout
    serve_config = ServeConfig(
        model=resolve(config.policy.name_or_path),  # the tiny model is built, a GGUF file converted, once
        model_name=POLICY_MODEL_NAME,
        min_replicas=r.num_replicas,
        max_replicas=r.num_replicas,
        max_model_len=r.max_model_len,
        max_tokens_limit=r.max_model_len,
        compilation=r.compilation,
        dtype=r.dtype,
        engine_threads=r.engine_threads,
    )
    weight_transfer = r.weight_sync == "transfer"
    return deploy(serve_config, app_name, timeout_s=config.roles.call_timeout_s, weight_transfer=weight_transfer)


def sync_weights(
    roles: Roles, rollout: RolloutClient, deployment: RolloutDeployment, weights_dir: Path, config: PPOConfig
) -> list[Replica]:
    """Bring every rollout replica to the policy's weights; return the replicas synced.

    ``rollout.weight_sync=transfer`` sends them from the policy's memory through vLLM's
    weight-transfer API over the backend the replicas were deployed with (the transfer is opened
    on first use and again when the replicas change); ``files`` writes them to ``weights_dir``
    for every replica to reload.
    """
    from cluster.group_errors import GroupError
    from serving.replicas import RolloutError
    from serving.weight_transfer import ReplicaWeightSync

    r = config.rollout
    if r.weight_sync == "files":
        roles.policy.export(weights_dir, config.roles.call_timeout_s)
        return rollout.sync_weights(weights_dir, timeout_s=r.sync_timeout_s)
    replicas = rollout.replica_set(r.sync_timeout_s)
    # the policy's call waits a little longer than the replicas' deadline, so the replica's failure is the one told
    wait = r.sync_timeout_s + 30
    try:
        if roles.transfer_to != replicas.replicas:
            roles.transfer_to = None
            sync = ReplicaWeightSync(replicas)
            roles.policy.open_weight_transfer(sync, deployment.transfer_backend, r.sync_timeout_s, wait)
            roles.transfer_to = replicas.replicas
        roles.policy.send_weights(wait)
    except GroupError as error:
        roles.transfer_to = None  # the group may be half-used: open a new one next time
        replicas.resume_quietly()
        if isinstance(error.exception, RolloutError):  # a replica's failure, told by the policy's call
            raise error.exception from None
        raise
    return list(replicas.replicas)
