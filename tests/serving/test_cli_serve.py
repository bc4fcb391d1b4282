"""``rlhf serve`` as a user runs it: its own embedded Ray cluster, the banner, a request, then a clean stop."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import openai
import psutil
import pytest

from cluster.connect import free_port


def _read_until(
    process: subprocess.Popen, lines: queue.Queue, marker: str, timeout_s: float, stderr: Path | None = None
) -> str:
    """stdout of ``process`` up to the line containing ``marker`` (fails on timeout or exit, quoting stderr)."""
    seen: list[str] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=1)
        except queue.Empty:
            if process.poll() is not None:
                break
            continue
        seen.append(line)
        if marker in line:
            return "".join(seen)
    errors = stderr.read_text(errors="replace")[-3000:] if stderr is not None and stderr.exists() else ""
    raise AssertionError(
        f"no {marker!r} within {timeout_s} s (exit status {process.poll()}); output so far:\n{''.join(seen)[-3000:]}"
        f"\nstderr:\n{errors}"
    )


def _pump(stream: object, lines: queue.Queue) -> None:
    for line in stream:
        lines.put(line)


def _listener(port: int) -> str:
    """The name of the process listening on 127.0.0.1:``port``."""
    for connection in psutil.net_connections(kind="tcp"):
        if connection.status == psutil.CONN_LISTEN and connection.laddr.port == port and connection.pid:
            return psutil.Process(connection.pid).name()
    raise AssertionError(f"nothing listens on port {port}")


# SIGTERM only: Ctrl-C (SIGINT) sets the same event through the same handler (serving.server.serve_forever), and
# each case costs a cluster and an engine of its own (about 110 s). Each proxy: what listens on the port.
@pytest.mark.parametrize("stop_signal", [signal.SIGTERM], ids=["SIGTERM"])
@pytest.mark.parametrize("proxy", ["serve", "haproxy"])
def test_rlhf_serve_prints_how_to_reach_it_and_stops_cleanly(
    tiny_model_dir: Path, stop_signal: int, proxy: str, tmp_path: Path
) -> None:
    port = free_port()
    command = [
        sys.executable, "-m", "rlhf.cli", "serve", "--model", str(tiny_model_dir), "--port", str(port),
        "--api-key", "cli-key", "max_model_len=256", "max_tokens_limit=16", f"proxy={proxy}",
    ]  # fmt: skip
    env = {**os.environ, "RAY_ADDRESS": "", "PYTHONUNBUFFERED": "1"}
    stderr = tmp_path / "stderr.txt"
    with stderr.open("w") as sink:
        process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=sink, text=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=_pump, args=(process.stdout, lines), daemon=True).start()
    descendants: list[psutil.Process] = []
    try:
        banner = _read_until(process, lines, "Ctrl-C stops the endpoint", timeout_s=600, stderr=stderr)
        url = f"http://127.0.0.1:{port}"
        assert f"serving at {url}/v1" in banner
        assert f"models: {tiny_model_dir.name}" in banner
        assert f"curl {url}/v1/chat/completions" in banner and "Authorization: Bearer" in banner

        client = openai.OpenAI(base_url=f"{url}/v1", api_key="cli-key", max_retries=0, timeout=120)
        answer = client.chat.completions.create(
            model=tiny_model_dir.name, messages=[{"role": "user", "content": "hi"}], max_tokens=4
        )
        assert answer.choices[0].message.content is not None
        # Serve's proxy is a Ray actor process; HAProxy hands the request to the replica's own HTTP server, which
        # runs the same guarded app: a streamed answer, and a request without the key refused there
        assert _listener(port) == ("haproxy" if proxy == "haproxy" else "ray::ProxyActor")
        stream = client.completions.create(model=tiny_model_dir.name, prompt="hi", max_tokens=4, stream=True)
        assert len([chunk for chunk in stream if chunk.choices]) >= 1
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0, timeout=30).models.list()

        descendants = psutil.Process(process.pid).children(recursive=True)
        process.send_signal(stop_signal)
        assert process.wait(timeout=120) == 0
        time.sleep(1)  # let the reader thread drain the pipe
        rest = "".join(lines.get() for _ in range(lines.qsize()))
        assert "shutting down" in rest
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=30)
    # the embedded cluster, the replicas and their vLLM engines went with it
    _, alive = psutil.wait_procs(descendants, timeout=60)
    assert not alive, [p.info if hasattr(p, "info") else p.pid for p in alive]
    with pytest.raises(openai.APIConnectionError):
        openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="cli-key", max_retries=0, timeout=5).models.list()


def test_haproxy_is_refused_on_a_cluster_not_started_for_it(ray_cluster: None, tiny_model_dir: Path) -> None:
    """The session's cluster was started without Serve's HAProxy mode: deploying would silently serve through Serve's
    proxy (its processes read the flag when they start), so ``proxy=haproxy`` is refused, naming what to set."""
    from serving.app import ServeError
    from serving.config import ServeConfig
    from serving.server import start

    config = ServeConfig(model=str(tiny_model_dir), port=free_port(), proxy="haproxy")
    with pytest.raises(ServeError, match=r"proxy=haproxy: this Ray cluster was started without RAY_SERVE_ENABLE_HA"):
        start(config, timeout_s=30)
    assert "RAY_SERVE_ENABLE_HA_PROXY" not in os.environ
