"""Connect to a Ray cluster, or start an embedded local one."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

from cluster.config import ClusterConfig

log = logging.getLogger(__name__)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` right now ("" for every interface)."""
    import socket

    with socket.socket() as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]  # typeshed types the address as Any
        return port


def connect(config: ClusterConfig, local_env: Mapping[str, str] | None = None) -> str:
    """Make sure this process is connected to Ray; return ``"existing"``, ``"remote"`` or ``"local"``.

    Order: an already initialised Ray; ``config.address``; ``RAY_ADDRESS``; otherwise an
    embedded local cluster with ``config.local_num_cpus`` logical CPUs (more than the
    physical cores is fine: actors, Serve replicas and the trainer controller must fit).
    ``local_env``: environment variables of an embedded cluster's processes (its raylet and
    every worker it starts inherit them; this process's environment is left as it was).
    """
    import ray

    if ray.is_initialized():
        return "existing"
    address = config.address or os.environ.get("RAY_ADDRESS")
    if address:
        log.info("connecting to the Ray cluster at %s", address)
        ray.init(address=address, log_to_driver=True)
        return "remote"
    log.info("starting an embedded local Ray cluster (%d logical CPUs)", config.local_num_cpus)
    saved = {name: os.environ.get(name) for name in local_env or {}}
    os.environ.update(local_env or {})
    try:
        ray.init(num_cpus=config.local_num_cpus, include_dashboard=False, log_to_driver=True)
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    return "local"
