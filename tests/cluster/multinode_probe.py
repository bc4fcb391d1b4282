"""Build the rlhf ppo role groups on a 3-node Ray cluster on this machine and print where each rank landed.

Run as ``python -m tests.cluster.multinode_probe MODEL_DIR`` (a process of its own: a test process is
already connected to the session's cluster). Prints one JSON object: each role's node ids by rank
(each group with its own placement strategy), and the worker nodes' ids.
"""

from __future__ import annotations

import json
import sys


def main(model_dir: str) -> None:
    """Start the cluster, place the roles with each strategy, print the placements."""
    import ray
    from ray.cluster_utils import Cluster

    from cluster import configtree
    from cluster.rank_worker import RankWorker
    from rlhf.rl.config import PPOConfig
    from rlhf.rl.roles import build_roles

    # room for every group at once (6 ranks of 1 CPU on 12 CPUs), so no strategy is met only for want of room
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    workers = [cluster.add_node(num_cpus=4) for _ in range(3)]
    ray.init(address=cluster.address, log_to_driver=False)
    result: dict = {"worker_nodes": [node.node_id for node in workers], "head_node": cluster.head_node.node_id}
    try:
        # one build, one strategy per group: the policy packed on one node, the value spread, the reward on two
        config = configtree.load(
            PPOConfig,
            None,
            [
                f"policy.name_or_path={model_dir}",
                "algorithm.estimator=ppo",
                "kl.coefficient=0",
                "roles.policy_workers=2",
                "roles.policy_strategy=STRICT_PACK",
                "roles.value_workers=2",
                "roles.value_strategy=SPREAD",
                "roles.reward_workers=2",
                "roles.reward_strategy=STRICT_SPREAD",
                "roles.call_timeout_s=120",
            ],
        )
        roles = build_roles(config)
        try:
            # build_roles returned: each group's process group (and DeepSpeed engine) spans its nodes
            result["placed"] = {
                role: group.group.call(RankWorker.node_id)
                for role, group in (("policy", roles.policy), ("value", roles.value), ("reward", roles.reward))
            }
        finally:
            roles.kill()
    finally:
        ray.shutdown()
        cluster.shutdown()
    print("PLACEMENT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
