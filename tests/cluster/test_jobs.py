"""``rlhf submit`` and ``rlhf jobs`` against a real head node (``ray start --head`` on 127.0.0.1, with its
dashboard's Jobs API and Ray's token authentication on, as the cluster files start it).

The head is started with ``RAY_AUTH_MODE=token`` and a token file of its own, which the tests' clients
find through ``RAY_AUTH_TOKEN_PATH``. (Left to its defaults, ``ray start`` turns token authentication on
only where ``~/.ray/auth_token`` exists already, which a machine's first ``ray.init()`` writes: on a
fresh machine, where this module runs before any other starts Ray, the head ran without
authentication and the two tests of it failed.)

The head node is a cluster of its own, next to the session's embedded one: its own ports and
temp directory, and at the end its own process tree is killed (never ``ray stop``, which
would stop every Ray process on the machine).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cluster.connect import free_port

RLHF = [sys.executable, "-m", "rlhf.cli"]


@pytest.fixture(scope="module")
def head() -> Iterator[str]:
    """A Ray head node with the Jobs API on 127.0.0.1 and token authentication on; yields the API's URL.

    While the module runs, ``RAY_AUTH_TOKEN_PATH`` names the head's token, for the clients in this process
    and in the subprocesses the tests start.
    """
    import secrets

    import psutil

    from cluster.jobs import NO_AGENT, client

    port, dashboard = free_port(), free_port()
    temp_dir = tempfile.mkdtemp(prefix="rh", dir="/tmp")  # short: Ray's unix sockets live under it
    token = Path(temp_dir) / "auth_token"
    token.write_text(secrets.token_hex(32))
    saved = os.environ.get("RAY_AUTH_TOKEN_PATH")
    os.environ["RAY_AUTH_TOKEN_PATH"] = str(token)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    env["RAY_AUTH_MODE"] = "token"
    # the cluster's `python` (what a job's entrypoint runs) is this environment's, as on a cluster built from an
    # image with rlhf installed
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    process = subprocess.Popen(
        [
            sys.executable, "-m", "ray.scripts.scripts", "start", "--head", f"--port={port}",
            "--node-ip-address=127.0.0.1", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard}", "--num-cpus=4", f"--temp-dir={temp_dir}", "--disable-usage-stats",
            "--block",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"http://127.0.0.1:{dashboard}"
    deadline = time.monotonic() + 180
    try:
        while True:
            try:
                client(url).list_jobs()
                break
            except Exception:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise
                time.sleep(1)
        # the head lists jobs before its job agent runs, and Ray's own `ray job submit` (one test below) does not
        # wait for the agent as `rlhf submit` does: a first job, accepted once the agent is there
        while True:
            try:
                client(url).submit_job(entrypoint="true", submission_id="agent-ready")
                break
            except RuntimeError as exc:
                if NO_AGENT not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(1)
        yield url
    finally:
        tree = [*psutil.Process(process.pid).children(recursive=True), psutil.Process(process.pid)]
        for child in tree:
            with contextlib.suppress(psutil.NoSuchProcess):
                child.kill()
        psutil.wait_procs(tree, timeout=30)
        shutil.rmtree(temp_dir, ignore_errors=True)
        if saved is None:
            os.environ.pop("RAY_AUTH_TOKEN_PATH", None)
        else:
            os.environ["RAY_AUTH_TOKEN_PATH"] = saved


def rlhf(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    return subprocess.run([*RLHF, *args], capture_output=True, text=True, timeout=timeout, env=env)


def job_env() -> list[str]:
    """What the jobs need from this machine's set-up: offline hub, the shared caches."""
    pairs = ["HF_HUB_OFFLINE=1", "TOKENIZERS_PARALLELISM=false"]
    pairs += [f"{key}={os.environ[key]}" for key in ("RLHF_CACHE", "TORCH_EXTENSIONS_DIR") if key in os.environ]
    return [arg for pair in pairs for arg in ("--env", pair)]


def test_a_submitted_sft_job_succeeds_and_writes_its_model(head: str, tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "sft"
    result = rlhf(
        "submit", "--address", head, *job_env(), "--wait", "--",
        "sft", "--config", "rlhf/configs/sft.yaml",  # relative to the uploaded working directory
        f"model.name_or_path={tiny_model_dir}", f"train.output_dir={out}", "train.max_steps=2",
        "cluster.num_workers=1", "data.eval_split=null",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:] + result.stdout[-3000:]
    job_id = result.stdout.splitlines()[0]
    assert f"job {job_id}: SUCCEEDED" in result.stderr
    assert "final_model:" in result.stdout  # the job's own summary, from its logs
    assert (out / "final" / "model.safetensors").is_file()
    status = rlhf("jobs", "status", job_id, "--address", head)
    assert status.returncode == 0 and "SUCCEEDED" in status.stdout
    listing = rlhf("jobs", "list", "--address", head)
    assert job_id in listing.stdout and "python -m rlhf.cli sft" in listing.stdout


def test_a_failing_job_reports_failed_and_its_logs_say_why(head: str, tmp_path: Path) -> None:
    from cluster.jobs import wait

    submitted = rlhf("submit", "--address", head, *job_env(), "--", "sft", "engine.zero_stag=2")
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip()
    assert wait(job_id, head, timeout_s=300) == "FAILED"
    logs = rlhf("jobs", "logs", job_id, "--address", head)
    assert "unknown config key 'engine.zero_stag'" in logs.stdout and "did you mean 'engine.zero_stage'" in logs.stdout


def test_a_running_job_can_be_stopped(head: str, tiny_model_dir: Path, tmp_path: Path) -> None:
    from cluster.jobs import status, wait

    submitted = rlhf(
        "submit", "--address", head, *job_env(), "--",
        "sft", f"model.name_or_path={tiny_model_dir}", f"train.output_dir={tmp_path / 'long'}",
        "train.max_steps=100000", "cluster.num_workers=1",
    )  # fmt: skip
    job_id = submitted.stdout.strip()
    deadline = time.monotonic() + 120
    while status(job_id, head)["status"] != "RUNNING" and time.monotonic() < deadline:
        time.sleep(0.5)
    stopped = rlhf("jobs", "stop", job_id, "--address", head)
    assert stopped.returncode == 0 and "stop requested" in stopped.stdout
    assert wait(job_id, head, timeout_s=120) == "STOPPED"


def test_an_address_with_no_cluster_is_a_clear_error() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    result = rlhf("jobs", "list", "--address", url, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"cannot reach the Ray Jobs API at {url}" in result.stderr.strip().splitlines()[-1]


def test_a_wrong_auth_token_is_refused_clearly(head: str) -> None:
    env = {**os.environ, "RAY_AUTH_TOKEN": "not-the-token"}
    env.pop("RAY_ADDRESS", None)
    result = subprocess.run([*RLHF, "jobs", "list", "--address", head], capture_output=True, text=True, env=env)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "Authentication failed" in result.stderr, result.stderr[-2000:]


def test_submit_without_a_command_says_what_to_give() -> None:
    result = rlhf("submit", "--address", "http://127.0.0.1:1", timeout=120)
    assert result.returncode == 2 and "give an rlhf command after --" in result.stderr


def test_rays_own_job_cli_runs_an_rlhf_command_as_the_docs_say(head: str) -> None:
    """``ray job submit --working-dir . -- python -m rlhf.cli ...`` (cluster/README.md), with Ray's token mode on."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    env["RAY_AUTH_MODE"] = "token"  # Ray's CLI sends the cluster's token only in this mode
    command = [
        sys.executable, "-m", "ray.scripts.scripts", "job", "submit", "--address", head, "--working-dir", ".",
        "--", "python", "-m", "rlhf.cli", "plan", "sft", "--config", "rlhf/configs/sft.yaml", "--nodes", "1",
        "--gpus-per-node", "8", "--gpu-memory", "80GB",
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:] + result.stdout[-3000:]
    assert "rlhf sft on 1 x 8 GPUs of 80GB" in result.stdout and "succeeded" in result.stdout.lower()


def test_pip_requirements_are_installed_for_the_job(head: str, tmp_path: Path) -> None:
    """``--pip`` installs a requirement into the job's environment: a local wheel (no index reachable here) whose
    module the job then imports as its judge; without ``--pip`` the same job cannot import it."""
    source = tmp_path / "probe"
    (source / "rlhf_pip_probe").mkdir(parents=True)
    (source / "rlhf_pip_probe" / "__init__.py").write_text("def reward(response):\n    return 1.0\n")
    (source / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["setuptools"]\nbuild-backend = "setuptools.build_meta"\n'
        '[project]\nname = "rlhf-pip-probe"\nversion = "0.1"\n'
    )
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), str(source)],
        capture_output=True,
        text=True,
    )
    assert built.returncode == 0, built.stderr[-2000:]
    (wheel,) = tmp_path.glob("rlhf_pip_probe-0.1-*.whl")
    # the judge is imported first; the template error after it proves the import worked, before any replica starts
    command = ["--", "synth", "judge.reward=rlhf_pip_probe:reward", "template.template={nope}"]
    outcomes = {}
    for name, extra in (("with", ["--pip", str(wheel)]), ("without", [])):
        result = rlhf("submit", "--address", head, *job_env(), *extra, "--wait", *command)
        outcomes[name] = result.stdout + result.stderr
    assert "its columns: prompt" in outcomes["with"] and "no module named" not in outcomes["with"], outcomes["with"][
        -3000:
    ]
    assert "no module named 'rlhf_pip_probe'" in outcomes["without"], outcomes["without"][-3000:]
