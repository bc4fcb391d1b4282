"""Calls to every running replica of a rollout deployment at once, each set of calls with one deadline.

A weight sync (:meth:`serving.rollout.RolloutClient.sync_weights`, and the transfer of
:mod:`serving.weight_transfer`) must reach every replica, while a deployment handle's call
reaches one. ``ray.llm``'s internal ``broadcast`` helper reaches all of them but waits
without a timeout and cannot say which replica failed; ``DeploymentHandle.broadcast``
(alpha) has a timeout but returns anonymous results. So a :class:`ReplicaSet` holds the
RUNNING replicas (:class:`Replica`, as the Serve controller listed them) and calls each
replica's actor directly (the way ``broadcast`` does), waiting for all of them with what is
left of one deadline. A replica that fails or does not answer in time is named (id, pid,
node) in the :class:`RolloutError`; pending calls are cancelled. The call to one replica's actor is
Ray internals: :func:`serving.ray_internals.call_replica`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from cluster.errors import UserError
from serving.ray_internals import call_replica

if TYPE_CHECKING:
    from ray import ObjectRef

log = logging.getLogger(__name__)

RPC_GRACE_S = 30.0
"""Added to vLLM's timeout of a ``collective_rpc`` beyond the caller's deadline (see :meth:`ReplicaSet.rpc_each`)."""

RESUME_GRACE_S = 10.0
"""Time allowed for ``resume`` after a sync that ran out of time, so no replica stays paused."""


class RolloutError(UserError, RuntimeError):
    """A rollout or a weight sync that failed or timed out; the message names the deployment or replicas."""


@dataclass(frozen=True)
class Replica:
    """One running replica of the LLMServer deployment."""

    replica_id: str
    actor_name: str
    pid: int | None = None
    node_ip: str | None = None

    def __str__(self) -> str:
        return f"replica {self.replica_id} (pid {self.pid} on {self.node_ip})"


@dataclass(frozen=True)
class ReplicaSet:
    """Calls to every one of a fixed set of replicas at once, each set of calls with one deadline.

    Picklable, so the trainer's rank 0 can drive the replicas itself during a weight
    transfer (:class:`~serving.weight_transfer.ReplicaWeightSync`). A replica that fails or
    does not answer in time is named in the :class:`RolloutError`; pending calls are cancelled.
    """

    app_name: str
    where: str
    replicas: tuple[Replica, ...]
    timeout_s: float

    def deadline(self, timeout_s: float | None = None) -> float:
        """The monotonic time ``timeout_s`` (default: the set's timeout) from now."""
        return time.monotonic() + (self.timeout_s if timeout_s is None else timeout_s)

    def call_each(
        self, method: str, kwargs: dict[str, Any], deadline: float | None = None, timeout_s: float | None = None
    ) -> dict[Replica, Any]:
        """``LLMServer.<method>(**kwargs)`` on every replica at once; their results by replica."""
        return self.on_each(
            lambda replica: call_replica(replica.actor_name, self.app_name, method, kwargs=kwargs),
            method,
            deadline,
            timeout_s,
        )

    def rpc_each(self, method: str, kwargs_per_replica: list[dict[str, Any]] | dict[str, Any] | None = None) -> None:
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
            return call_replica(replica.actor_name, self.app_name, "collective_rpc", kwargs=rpc)

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
        ready: list[ObjectRef[Any]] = []
        pending: list[ObjectRef[Any]] = []
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
