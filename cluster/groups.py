"""Role actor groups: N Ray actors of one role, placed together, each a rank of the group's own process group.

``rlhf ppo`` runs one group per role (policy, reference, reward, value)::

    placement = Placement.create(num_bundles=2, cpus_per_bundle=1)        # or gpus_per_bundle=1
    policy = ActorGroup("policy", PolicyWorker, placement, num_cpus_per_actor=0.5)
    reference = ActorGroup("reference", ReferenceWorker, placement, num_cpus_per_actor=0.5)  # colocated
    losses = policy.call(PolicyWorker.train_step, timeout_s=300)            # one result per rank
    logprobs = reference.call_sharded(ReferenceWorker.logprobs, shards, timeout_s=60)

The bundles are a :class:`~cluster.placement.Placement`, the workers subclass
:class:`~cluster.rank_worker.RankWorker`, and a failed call raises a
:class:`~cluster.group_errors.GroupError`.

Each actor is a process of its own, so each has its own default ``torch.distributed``
group: rank 0's node address and a free port are found first, then every rank sets
``MASTER_ADDR``/``MASTER_PORT``/``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` and calls
:func:`cluster.process_group.init_process_group` (gloo on CPU, nccl on GPU). A
:class:`~rlhf.engine.TrainingEngine` built inside the actor therefore works unchanged.
Groups on the same node do not interfere: their rendezvous ports differ, and DeepSpeed's
shared-memory all-reduce (keyed by address and port) is only enabled when ``LOCAL_SIZE``
is set, which neither this module nor :mod:`cluster.rank_worker` does.

No call can hang: every call has a deadline, and a timeout, a dead actor or an exception
raised in a method becomes a :class:`GroupError` naming the role, the rank(s), the method
and the root cause in one line. After a timeout or a death the group is marked broken
(a rank may still be stuck in a collective) and refuses further calls: kill it and build
a new one, e.g. from the last checkpoint.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, cast

from cluster.group_errors import GroupError, _death_reason, _innermost, _rebuilt, _root_cause
from cluster.placement import Placement
from cluster.rank_worker import RankWorker

if TYPE_CHECKING:
    from ray.actor import ActorHandle

DEFAULT_CALL_TIMEOUT_S = 600.0
# After one rank fails, how long the other ranks' outcomes are awaited so that the root
# cause (a dead rank) is reported rather than a peer's "connection closed" in a collective.
FAILURE_GRACE_S = 2.0


@dataclass
class _Failure:
    rank: int
    kind: Literal["died", "error"]
    cause: str
    exception: BaseException | None = None


@dataclass
class PendingCall:
    """A method running on every rank of a group; :meth:`result` gathers it or raises :class:`GroupError`."""

    group: ActorGroup
    method: str
    refs: list[Any]
    timeout_s: float
    deadline: float = -1.0  # absolute (time.monotonic); default: timeout_s from now

    def __post_init__(self) -> None:
        if self.deadline < 0:
            self.deadline = time.monotonic() + self.timeout_s

    def result(self) -> list[Any]:
        """Results in rank order; waits at most until the call's deadline (set when it was submitted)."""
        import ray

        pending = {ref: rank for rank, ref in enumerate(self.refs)}
        results: list[Any] = [None] * len(self.refs)
        failures: list[_Failure] = []
        while pending and not failures:
            remaining = self.deadline - time.monotonic()
            if remaining <= 0:
                break
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=remaining)
            for ref in ready:
                self._collect(ref, pending.pop(ref), results, failures)
        if failures and pending and all(f.kind == "error" for f in failures):
            grace = min(FAILURE_GRACE_S, max(self.deadline - time.monotonic(), 0.0))
            ready, _ = ray.wait(list(pending), num_returns=len(pending), timeout=grace)
            for ref in ready:
                self._collect(ref, pending.pop(ref), results, failures)
        if failures:
            raise self._failure_error(failures, still_running=sorted(pending.values()))
        if pending:
            raise self._timeout_error(sorted(pending.values()))
        return results

    def _collect(self, ref: Any, rank: int, results: list[Any], failures: list[_Failure]) -> None:
        import ray
        from ray.exceptions import RayActorError

        try:
            results[rank] = ray.get(ref)
        except RayActorError as error:
            failures.append(_Failure(rank, "died", _death_reason(error)))
        except Exception as error:
            raised = _innermost(error)
            failures.append(_Failure(rank, "error", _root_cause(raised), _rebuilt(raised)))

    def _failure_error(self, failures: list[_Failure], still_running: list[int]) -> GroupError:
        group = self.group
        deaths = [f for f in failures if f.kind == "died"]
        primary = min(deaths or failures, key=lambda f: f.rank)
        where = f"{group.role} rank {primary.rank} ({group.describe_rank(primary.rank)})"
        if primary.kind == "died":
            message = f"{where}: actor died during {self.method}: {primary.cause}"
            group.mark_broken(message)
        else:
            message = f"{where}: {self.method} raised {primary.cause}"
        others = [f"rank {f.rank}: {f.cause}" for f in sorted(failures, key=lambda f: f.rank) if f is not primary]
        if others:
            message += f" (also {'; '.join(others)})"
        if still_running and primary.kind == "error":
            # the others may wait for the failed rank in a collective until the collective timeout
            group.mark_broken(f"{message}; ranks {still_running} were still running {self.method}")
        return GroupError(
            message, group.role, self.method, [primary.rank], primary.kind, primary.cause, primary.exception
        )

    def _timeout_error(self, ranks: list[int]) -> GroupError:
        group = self.group
        names = ", ".join(f"{r} ({group.describe_rank(r)})" for r in ranks)
        label = "rank" if len(ranks) == 1 else "ranks"
        message = f"{group.role} {label} {names}: {self.method} did not finish within {self.timeout_s:g} s"
        group.mark_broken(message)
        return GroupError(message, group.role, self.method, ranks, "timeout", f"timeout after {self.timeout_s:g} s")


class ActorGroup:
    """``num_actors`` Ray actors of ``worker_cls`` (a :class:`RankWorker`), one process group among them.

    ``placement``: the bundles to place the actors on, possibly shared with other groups
    (colocation; give each group a fraction of each bundle through ``num_cpus_per_actor``
    and ``num_gpus_per_actor``). Without one, the group reserves its own placement of one
    bundle per actor (and removes it in :meth:`kill`). Contiguous ranks share a bundle
    when there are more actors than bundles. ``num_actors`` defaults to one per bundle.

    The constructor returns once every rank has joined the process group (or raises
    :class:`GroupError` within ``setup_timeout_s``, having killed what it created).
    """

    def __init__(
        self,
        role: str,
        worker_cls: type[RankWorker],
        placement: Placement | None = None,
        *,
        num_actors: int | None = None,
        num_cpus_per_actor: float = 1.0,
        num_gpus_per_actor: float = 0.0,
        init_args: tuple[Any, ...] = (),
        init_kwargs: dict[str, Any] | None = None,
        runtime_env: dict[str, Any] | None = None,
        setup_timeout_s: float = 300.0,
        collective_timeout_s: float = 600.0,
        call_timeout_s: float = DEFAULT_CALL_TIMEOUT_S,
    ) -> None:
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        deadline = time.monotonic() + setup_timeout_s
        if not issubclass(worker_cls, RankWorker):
            raise TypeError(f"worker_cls must subclass RankWorker, got {worker_cls!r}")
        if num_actors is not None and num_actors < 1:
            raise ValueError(f"{role}: num_actors must be at least 1, got {num_actors}")
        self.role = role
        self.worker_cls = worker_cls
        self.call_timeout_s = call_timeout_s
        self.broken: str | None = None
        self._owns_placement = placement is None
        if placement is None:
            if num_actors is None:
                raise ValueError(f"{role}: give a placement, num_actors, or both")
            placement = Placement.create(num_actors, num_cpus_per_actor, num_gpus_per_actor, timeout_s=setup_timeout_s)
        self.placement = placement
        self.world_size = num_actors or self.placement.num_bundles
        self.bundle_indices = self._bundle_indices(num_cpus_per_actor, num_gpus_per_actor)
        self.pids: list[int | None] = [None] * self.world_size
        self.node_ips: list[str | None] = [None] * self.world_size
        self.actors: list[ActorHandle[RankWorker]] = []
        remote_cls = ray.remote(worker_cls)
        try:
            for bundle in self.bundle_indices:
                strategy = PlacementGroupSchedulingStrategy(
                    placement_group=self.placement.group, placement_group_bundle_index=bundle
                )
                options = remote_cls.options(
                    num_cpus=num_cpus_per_actor,
                    num_gpus=num_gpus_per_actor,
                    runtime_env=runtime_env,
                    scheduling_strategy=strategy,
                )
                # Ray types .remote() as "handle or the class itself" so that method calls type-check
                actor = cast("ActorHandle[RankWorker]", options.remote(*init_args, **(init_kwargs or {})))
                self.actors.append(actor)
            self._setup(setup_timeout_s, deadline, collective_timeout_s)
        except BaseException:
            self.kill()
            raise

    def _bundle_indices(self, cpus: float, gpus: float) -> list[int]:
        """Rank -> bundle, contiguous ranks sharing a bundle; refuses actors that cannot fit their bundle."""
        per_bundle = -(-self.world_size // self.placement.num_bundles)
        indices = [rank // per_bundle for rank in range(self.world_size)]
        for bundle, spec in enumerate(self.placement.bundles):
            count = indices.count(bundle)
            for resource, each in (("CPU", cpus), ("GPU", gpus)):
                if count and count * each > spec.get(resource, 0.0) + 1e-9:
                    raise ValueError(
                        f"{self.role}: {count} actors x {each:g} {resource} do not fit bundle {bundle} {spec}"
                    )
        return indices

    def _setup(self, timeout_s: float, deadline: float, collective_timeout_s: float) -> None:
        """Find rank 0's address, then have every rank join the process group, all before ``deadline``."""
        no_args: list[tuple[tuple[Any, ...], dict[str, Any]]] = [((), {})] * self.world_size
        addresses_call = self._submit("node_ip_and_free_port", no_args, timeout_s, deadline)
        pids_call = self._submit("pid", no_args, timeout_s, deadline)
        try:
            addresses = addresses_call.result()
        except GroupError as error:
            if error.kind != "timeout":
                raise
            hint = "; the actors did not start: is there room on the placement's bundles (other groups may hold it)?"
            raise GroupError(
                str(error) + hint, self.role, error.method, error.ranks, error.kind, error.cause, error.exception
            ) from None
        self.node_ips = [ip for ip, _ in addresses]
        self.pids = pids_call.result()
        master_addr, master_port = addresses[0]
        per_rank = []
        for rank, ip in enumerate(self.node_ips):
            local_rank = self.node_ips[:rank].count(ip)
            args = (master_addr, master_port, rank, self.world_size, collective_timeout_s)
            per_rank.append((args, {"local_rank": local_rank, "local_world_size": self.node_ips.count(ip)}))
        self._submit("setup_distributed", per_rank, timeout_s, deadline).result()

    def describe_rank(self, rank: int) -> str:
        """Where a rank runs, for error messages: its pid and node, as far as known."""
        pid, ip = self.pids[rank], self.node_ips[rank]
        if pid is None:
            return "pid unknown"
        return f"pid {pid} on {ip}"

    def mark_broken(self, reason: str) -> None:
        """Refuse further calls: a rank timed out or died, so the ranks may be out of step."""
        self.broken = self.broken or reason

    def _method_name(self, method: Callable[..., Any]) -> str:
        """The name of ``method``, a public method of the group's worker class given by reference, never by name:
        a reader and a type checker can then follow every call to its definition."""
        if isinstance(method, str):
            raise TypeError(
                f"{self.role}: call a worker method by reference ({self.worker_cls.__name__}.{method}), not by name"
            )
        name = getattr(method, "__name__", "")
        if name.startswith("_") or getattr(self.worker_cls, name, None) is not method:
            raise AttributeError(
                f"{self.role}: {getattr(method, '__qualname__', method)!r} is not a public method of "
                f"{self.worker_cls.__name__}"
            )
        return name

    def _submit(
        self,
        name: str,
        per_rank: list[tuple[tuple[Any, ...], dict[str, Any]]],
        timeout_s: float,
        deadline: float = -1.0,
    ) -> PendingCall:
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s}")
        if self.broken is not None:
            raise GroupError(
                f"{self.role}: cannot call {name}, the group is unusable after: {self.broken}",
                self.role,
                name,
                list(range(self.world_size)),
                "broken",
                self.broken,
            )
        refs = [
            getattr(actor, name).remote(*args, **kwargs)
            for actor, (args, kwargs) in zip(self.actors, per_rank, strict=True)
        ]
        return PendingCall(self, name, refs, timeout_s, deadline)

    def submit(
        self, method: Callable[..., Any], *args: Any, timeout_s: float | None = None, **kwargs: Any
    ) -> PendingCall:
        """Start ``method(*args, **kwargs)`` on every rank without waiting; the deadline starts now."""
        name = self._method_name(method)
        return self._submit(
            name, [(args, kwargs)] * self.world_size, self.call_timeout_s if timeout_s is None else timeout_s
        )

    def submit_sharded(
        self,
        method: Callable[..., Any],
        shards: list[Any],
        *args: Any,
        timeout_s: float | None = None,
        **kwargs: Any,
    ) -> PendingCall:
        """Start ``method(shards[rank], *args, **kwargs)`` on every rank without waiting."""
        name = self._method_name(method)
        if len(shards) != self.world_size:
            raise ValueError(f"{self.role}: {len(shards)} shards for {self.world_size} ranks")
        per_rank = [((shard, *args), kwargs) for shard in shards]
        return self._submit(name, per_rank, self.call_timeout_s if timeout_s is None else timeout_s)

    def call(self, method: Callable[..., Any], *args: Any, timeout_s: float | None = None, **kwargs: Any) -> list[Any]:
        """Run ``method(*args, **kwargs)`` on every rank; results in rank order, or :class:`GroupError`.

        ``method`` is the worker class's method, by reference (``PolicyWorker.train_step``).
        ``timeout_s`` (default: the group's ``call_timeout_s``) bounds the whole call; it is
        never passed on, so a method's own ``timeout_s`` parameter must be given positionally.
        """
        return self.submit(method, *args, timeout_s=timeout_s, **kwargs).result()

    def call_sharded(
        self,
        method: Callable[..., Any],
        shards: list[Any],
        *args: Any,
        timeout_s: float | None = None,
        **kwargs: Any,
    ) -> list[Any]:
        """Run ``method(shards[rank], *args, **kwargs)`` on every rank; results in rank order."""
        return self.submit_sharded(method, shards, *args, timeout_s=timeout_s, **kwargs).result()

    def kill(self) -> None:
        """Kill the actors (at once, even mid-call) and remove the placement if this group reserved it."""
        import ray

        for actor in self.actors:
            with contextlib.suppress(Exception):  # already dead, or Ray is shutting down
                ray.kill(actor, no_restart=True)
        self.actors = []
        self.mark_broken("the group was killed")
        if self._owns_placement:
            self._owns_placement = False
            self.placement.remove()

    def __enter__(self) -> ActorGroup:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.kill()
