"""``rlhf submit`` while the head node's job agent is still starting.

Before: a job submitted in the seconds after ``ray start`` (on the CI machine, while another Ray cluster started
beside it) was refused with Ray's "No available agent to submit job, please try again later", which
``cluster.jobs.submit`` passed on as a failure: five tests of tests/cluster/test_jobs.py failed so on
3 December 2026. Now ``submit`` tries again, for up to ``AGENT_WAIT_S``, on that answer only.

The Jobs API here is a stand-in HTTP server on 127.0.0.1 that answers as a head node without its agent does
(the race with a real head node cannot be timed from a test); the real API is in tests/cluster/test_jobs.py.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

NO_AGENT_BODY = "No available agent to submit job, please try again later."


def stand_in_jobs_api(refusals: int, body: str = NO_AGENT_BODY) -> tuple[ThreadingHTTPServer, list[str]]:
    """A Jobs API that refuses the first ``refusals`` submissions with a 500 and ``body``, then accepts."""
    import ray

    posts: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def _answer(self, status: int, payload: object) -> None:
            data = payload.encode() if isinstance(payload, str) else json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:  # the client's version check; a package that is there already
            version = {"ray_version": ray.__version__, "version": "4", "ray_commit": "", "session_name": "s"}
            self._answer(200, version if self.path == "/api/version" else {})

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            posts.append(self.path)
            if len(posts) <= refusals:
                self._answer(500, body)
            else:
                self._answer(200, {"submission_id": "raysubmit_1", "job_id": None})

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, posts


@pytest.fixture
def no_token(monkeypatch: pytest.MonkeyPatch, tmp_path) -> Iterator[None]:
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "none"))
    yield


def test_a_submission_waits_for_the_job_agent(no_token, tmp_path) -> None:
    from cluster.jobs import submit

    server, posts = stand_in_jobs_api(refusals=2)
    try:
        job = submit(["sft", "--config", "x.yaml"], f"http://127.0.0.1:{server.server_port}", working_dir=tmp_path)
    finally:
        server.shutdown()
    assert job == "raysubmit_1"
    assert len(posts) == 3


def test_another_refusal_fails_at_once_naming_the_reason(no_token, tmp_path) -> None:
    from cluster.jobs import JobsError, submit

    server, posts = stand_in_jobs_api(refusals=5, body="runtime_env: pip is not allowed")
    try:
        with pytest.raises(JobsError, match="refused the job: .*pip is not allowed"):
            submit(["sft"], f"http://127.0.0.1:{server.server_port}", working_dir=tmp_path)
    finally:
        server.shutdown()
    assert len(posts) == 1


def test_an_agent_that_never_comes_fails_after_the_wait(no_token, tmp_path, monkeypatch) -> None:
    from cluster import jobs

    monkeypatch.setattr(jobs, "AGENT_WAIT_S", 2.0)
    server, posts = stand_in_jobs_api(refusals=100)
    try:
        with pytest.raises(jobs.JobsError, match="refused the job: .*No available agent"):
            jobs.submit(["sft"], f"http://127.0.0.1:{server.server_port}", working_dir=tmp_path)
    finally:
        server.shutdown()
    assert 2 <= len(posts) <= 4
