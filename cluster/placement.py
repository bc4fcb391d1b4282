"""Placement: a Ray placement group whose bundles one or several actor groups (:mod:`cluster.groups`) share."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from cluster.group_errors import GroupError

if TYPE_CHECKING:
    from ray.util.placement_group import PlacementGroup


@dataclass
class Placement:
    """A Ray placement group whose bundles one or several actor groups share.

    Create one with :meth:`create`, or wrap an existing ``PlacementGroup``. Groups given a
    placement do not remove it; whoever created it calls :meth:`remove`.
    """

    group: PlacementGroup

    @classmethod
    def create(
        cls,
        num_bundles: int,
        cpus_per_bundle: float = 1.0,
        gpus_per_bundle: float = 0.0,
        strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK",
        timeout_s: float = 60.0,
    ) -> Placement:
        """Reserve ``num_bundles`` bundles of ``{"CPU": cpus, "GPU": gpus}``; GroupError if not granted in time."""
        import ray
        from ray.util.placement_group import placement_group, remove_placement_group

        if num_bundles < 1:
            raise ValueError(f"num_bundles must be at least 1, got {num_bundles}")
        bundle: dict[str, float] = {"CPU": cpus_per_bundle}
        if gpus_per_bundle:
            bundle["GPU"] = gpus_per_bundle
        group = placement_group([dict(bundle) for _ in range(num_bundles)], strategy=strategy)
        ready, _ = ray.wait([group.ready()], timeout=timeout_s)
        if not ready:
            remove_placement_group(group)
            message = (
                f"placement of {num_bundles} x {bundle} ({strategy}) not granted within {timeout_s:g} s; "
                f"the cluster has {ray.available_resources()} available"
            )
            raise GroupError(message, role="placement", method="create", ranks=[], kind="placement")
        return cls(group)

    @property
    def bundles(self) -> list[dict[str, float]]:
        """The resources of each bundle."""
        return self.group.bundle_specs

    @property
    def num_bundles(self) -> int:
        """How many bundles the placement group holds."""
        return len(self.group.bundle_specs)

    def remove(self) -> None:
        """Release the bundles (actors still placed on them are killed by Ray)."""
        from ray.util.placement_group import remove_placement_group

        remove_placement_group(self.group)
