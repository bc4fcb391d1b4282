"""``rlhf submit`` and ``rlhf jobs``: run rlhf commands on a Ray cluster through the Ray Jobs API.

A job is an ``rlhf`` command line run as the entrypoint ``python -m rlhf.cli ...`` by the
cluster's job server (``python`` as the head node's environment finds it: the cluster image's
Python, with this project's dependencies installed), with a runtime environment:

* ``working_dir``: this project's source tree (by default the directory holding the
  ``rlhf`` package), uploaded to the cluster so the job runs the same code; caches, virtual
  environments, run directories and git metadata are left out;
* ``pip``: extra requirements to install on the cluster for the job (e.g. ``rlhf[gpu]`` or
  a wheel URL), when the cluster's image does not have them;
* ``env_vars``: ``KEY=VALUE`` pairs (``HF_TOKEN``, ``HF_HUB_OFFLINE``, ...).

The address is the cluster's Jobs API (its dashboard, ``http://HEAD:8265``), from
``--address``, else ``RAY_API_SERVER_ADDRESS``, else ``RAY_ADDRESS`` when it is an http(s)
URL. Ray's token authentication: the token Ray itself would use (``RAY_AUTH_TOKEN``, else the
file named by ``RAY_AUTH_TOKEN_PATH``, else ``~/.ray/auth_token``) is sent as a bearer token
unless ``RAY_AUTH_MODE=disabled``; a cluster that refuses it is reported as such. (Ray's
client sends it only once ``RAY_AUTH_MODE=token`` is set in the submitting process, while
``ray start`` enables token authentication by default.)

``ray job submit --address URL --working-dir . -- python -m rlhf.cli sft --config ...`` does
the same with Ray's own CLI.
"""

from __future__ import annotations

import os
import shlex
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict, TypeVar

from cluster.errors import UserError

if TYPE_CHECKING:
    from ray.job_submission import JobSubmissionClient

R = TypeVar("R")


class JobStatus(TypedDict):
    """A job's status, as :func:`status` reads it."""

    id: str
    status: str
    message: str
    entrypoint: str


DEFAULT_ADDRESS = "http://127.0.0.1:8265"
PROJECT_ROOT = Path(__file__).resolve().parents[1]
EXCLUDES = [".git", ".venv", ".cache", "runs", "**/__pycache__", "*.egg-info", ".pytest_cache", ".ruff_cache"]
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


AGENT_WAIT_S = 60.0
"""How long ``submit`` retries while the cluster answers that it has no job agent yet."""
NO_AGENT = "No available agent to submit job"


class JobsError(UserError, RuntimeError):
    """A Jobs API call that failed; the message names the address and the job."""


def address(given: str | None) -> str:
    """The Jobs API address: ``given``, ``RAY_API_SERVER_ADDRESS``, an http(s) ``RAY_ADDRESS``, or the local default."""
    if given:
        return given
    if os.environ.get("RAY_API_SERVER_ADDRESS"):
        return os.environ["RAY_API_SERVER_ADDRESS"]
    ray_address = os.environ.get("RAY_ADDRESS", "")
    if ray_address.startswith(("http://", "https://")):
        return ray_address
    return DEFAULT_ADDRESS


def auth_token() -> str | None:
    """The Ray authentication token of this machine, looked up where Ray looks, or None."""
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        return None
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"].strip()
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token").expanduser()
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def client(given_address: str | None) -> JobSubmissionClient:
    """A ``JobSubmissionClient`` for the cluster, or :class:`JobsError` naming the address when it does not answer."""
    from ray.job_submission import JobSubmissionClient

    url = address(given_address)
    token = auth_token()
    try:
        return JobSubmissionClient(url, headers={"Authorization": f"Bearer {token}"} if token else None)
    except Exception as exc:  # ConnectionError, or an authentication refusal
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise JobsError(f"cannot reach the Ray Jobs API at {url}: {reason}") from None


def parse_env(pairs: Sequence[str]) -> dict[str, str]:
    """``["KEY=VALUE", ...]`` as a dict; a pair without ``=`` is refused, naming it."""
    env = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise JobsError(f"--env {pair!r}: expected KEY=VALUE")
        env[key] = value
    return env


def runtime_env(working_dir: Path | None, env: dict[str, str], pip: Sequence[str]) -> dict[str, Any]:
    """The job's runtime environment (see the module docstring)."""
    root = Path(working_dir or PROJECT_ROOT).resolve()
    if not root.is_dir():
        raise JobsError(f"--working-dir {root} is not a directory")
    spec: dict[str, Any] = {"working_dir": str(root), "excludes": EXCLUDES}
    if env:
        spec["env_vars"] = env
    if pip:
        spec["pip"] = list(pip)
    return spec


def entrypoint(command: Sequence[str]) -> str:
    """The shell command the job server runs for an rlhf command line (``sft --config ...``)."""
    args = list(command)
    if args and args[0] == "--":
        args = args[1:]
    if args and args[0] == "rlhf":
        args = args[1:]
    if not args:
        raise JobsError("nothing to submit: give an rlhf command after --, e.g. rlhf submit -- sft --config FILE")
    return shlex.join(["python", "-m", "rlhf.cli", *args])


def submit(
    command: Sequence[str],
    given_address: str | None = None,
    working_dir: Path | None = None,
    env: dict[str, str] | None = None,
    pip: Sequence[str] = (),
    submission_id: str | None = None,
) -> str:
    """Submit ``command`` (an rlhf command line) as a Ray job; return its id."""
    command_line = entrypoint(command)
    environment = runtime_env(working_dir, env or {}, pip)
    jobs = client(given_address)
    deadline = time.monotonic() + AGENT_WAIT_S
    while True:
        try:
            return jobs.submit_job(
                entrypoint=command_line, runtime_env=environment, submission_id=submission_id, metadata={"rlhf": "1"}
            )
        except Exception as exc:
            # a head node answers this until its job agent has started (seconds after `ray start` on a busy machine)
            if NO_AGENT in str(exc) and time.monotonic() < deadline:
                time.sleep(1.0)
                continue
            raise JobsError(f"{address(given_address)} refused the job: {_reason(exc)}") from None


def _reason(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[-1] if text else type(exc).__name__


def _call(given_address: str | None, what: str, job_id: str | None, fn: Callable[[JobSubmissionClient], R]) -> R:
    jobs = client(given_address)
    try:
        return fn(jobs)
    except Exception as exc:
        subject = f"job {job_id}" if job_id else "the jobs"
        raise JobsError(f"{what} {subject} at {address(given_address)}: {_reason(exc)}") from None


def list_jobs(given_address: str | None = None) -> list[dict[str, Any]]:
    """Every job of the cluster, newest first: id, status, entrypoint, start time."""
    details = _call(given_address, "listing", None, lambda jobs: jobs.list_jobs())
    rows = [
        {
            "id": job.submission_id or job.job_id,
            "status": str(getattr(job.status, "value", job.status)),
            "entrypoint": job.entrypoint,
            "start_time": job.start_time,
        }
        for job in details
        if job.submission_id  # drivers that were not submitted (plain ray.init) have none
    ]
    return sorted(rows, key=lambda row: row["start_time"] or 0, reverse=True)


def status(job_id: str, given_address: str | None = None) -> JobStatus:
    """A job's status and message."""
    info = _call(given_address, "reading", job_id, lambda jobs: jobs.get_job_info(job_id))
    return {
        "id": job_id,
        "status": str(getattr(info.status, "value", info.status)),
        "message": info.message or "",
        "entrypoint": info.entrypoint,
    }


def logs(job_id: str, given_address: str | None = None) -> str:
    """Everything the job has printed so far."""
    return _call(given_address, "reading the logs of", job_id, lambda jobs: jobs.get_job_logs(job_id))


def stop(job_id: str, given_address: str | None = None) -> bool:
    """Ask the cluster to stop a job; True if it was running."""
    return _call(given_address, "stopping", job_id, lambda jobs: jobs.stop_job(job_id))


def wait(job_id: str, given_address: str | None = None, timeout_s: float = 3600.0, poll_s: float = 1.0) -> str:
    """Wait until the job is SUCCEEDED, FAILED or STOPPED; return that status (JobsError after ``timeout_s``)."""
    deadline = time.monotonic() + timeout_s
    while True:
        current = status(job_id, given_address)["status"]
        if current in TERMINAL:
            return current
        if time.monotonic() > deadline:
            raise JobsError(f"job {job_id} is still {current} after {timeout_s:.0f} s")
        time.sleep(poll_s)
