"""HTTP reward endpoints: the JSON protocol of the package docstring, under a hard deadline per call."""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from rlhf.data.formats import Text
from rlhf.rl.rewards.base import (
    DEFAULT_TIMEOUT_S,
    MAX_RESPONSE_BYTES,
    RewardError,
    RewardTimeoutError,
    _as_reward,
    _check_batch,
    _excerpt,
)

if TYPE_CHECKING:
    import httpx


class HTTPReward:
    """A remote reward endpoint speaking the JSON protocol of the package docstring.

    An answer is read up to ``max_response_bytes`` (more is a :class:`RewardError`: a reward
    list is a few bytes per response), and a call the caller gave up on (its deadline passed)
    closes its connection at the next bytes that arrive, or at httpx's own read timeout,
    instead of reading on.
    """

    def __init__(self, url: str, max_response_bytes: int = MAX_RESPONSE_BYTES) -> None:
        import httpx

        try:
            parsed = httpx.URL(url)
        except httpx.InvalidURL as exc:
            raise RewardError(f"config key 'reward': {_without_credentials(url)!r} is not a valid URL: {exc}") from None
        if parsed.scheme not in ("http", "https") or not parsed.host:
            raise RewardError(f"config key 'reward': {_without_credentials(url)!r} is not an http(s) URL with a host")
        self.url = url
        self.max_response_bytes = max_response_bytes
        self._shown = str(parsed.copy_with(userinfo=b"", query=None))  # errors never print credentials
        self._source = f"reward endpoint {self._shown}"
        self._client = httpx.Client()

    def __repr__(self) -> str:
        return f"HTTPReward({self._shown!r})"

    def close(self) -> None:
        """Close the connection pool."""
        self._client.close()

    def score(
        self,
        prompts: Sequence[Text],
        responses: Sequence[str],
        timeout_s: float = DEFAULT_TIMEOUT_S,
        columns: Mapping[str, Sequence[Any]] | None = None,
    ) -> list[float]:
        """POST the batch; the rewards, or a RewardError within ``timeout_s`` (plus a few milliseconds)."""
        _check_batch(prompts, responses, columns)
        if not responses:
            return []
        batch: dict[str, Any] = {"prompts": list(prompts), "responses": list(responses)}
        if columns:
            batch["columns"] = {name: list(values) for name, values in columns.items()}
        try:
            body = json.dumps(batch, default=_json_value)
        except (TypeError, ValueError) as exc:
            raise RewardError(f"the batch for {self._source} cannot be sent as JSON: {exc}") from None
        response, content = self._post(body, timeout_s)
        return self._rewards(response, content, len(responses))

    def _post(self, body: str, timeout_s: float) -> tuple[httpx.Response, bytes]:
        """One POST under a hard deadline; the response (its status and headers) and its body.

        httpx's timeouts bound each phase (connect, write, every read) separately, so a server that
        trickles its answer could take longer; the request runs in a thread, abandoned at the
        deadline, which then stops reading and closes its connection itself.
        """
        import httpx

        outcome: dict[str, Any] = {}
        done = threading.Event()
        deadline = time.monotonic() + timeout_s

        def post() -> None:
            try:
                headers = {"Content-Type": "application/json"}
                with self._client.stream("POST", self.url, content=body, headers=headers, timeout=timeout_s) as answer:
                    outcome["content"] = self._read(answer, deadline)
                    outcome["response"] = answer
            except Exception as exc:
                outcome["error"] = exc
            finally:
                done.set()

        threading.Thread(target=post, name="rlhf-http-reward", daemon=True).start()
        if not done.wait(timeout_s) or isinstance(outcome.get("error"), httpx.TimeoutException | _Abandoned):
            raise RewardTimeoutError(
                f"{self._source} gave no answer within the timeout of {timeout_s:g} s "
                "(a server that is down or overloaded, or a batch too slow to score)"
            )
        error = outcome.get("error")
        if isinstance(error, RewardError):
            raise error
        if isinstance(error, httpx.ConnectError):
            raise RewardError(f"{self._source} is not reachable ({error}); is the reward server running?") from None
        if isinstance(error, httpx.HTTPError):
            raise RewardError(f"request to {self._source} failed: {type(error).__name__}: {error}") from None
        if error is not None:
            raise RewardError(f"request to {self._source} failed: {type(error).__name__}: {error}") from error
        return outcome["response"], outcome["content"]

    def _read(self, answer: httpx.Response, deadline: float) -> bytes:
        """The body of ``answer``, read until it ends, passes ``max_response_bytes`` or outlives ``deadline``."""
        chunks, size = [], 0
        for chunk in answer.iter_bytes():
            size += len(chunk)
            if size > self.max_response_bytes:
                raise RewardError(
                    f"{self._source} answered with more than {self.max_response_bytes} bytes (HTTP "
                    f"{answer.status_code}); a reward list is a few bytes per response"
                )
            if time.monotonic() > deadline:
                raise _Abandoned  # the caller has given up: leaving the stream closes the connection
            chunks.append(chunk)
        return b"".join(chunks)

    def _rewards(self, response: httpx.Response, content: bytes, expected: int) -> list[float]:
        text = content.decode("utf-8", errors="replace")
        if not response.is_success:
            moved = f" (to {response.headers.get('location')})" if response.is_redirect else ""
            raise RewardError(
                f"{self._source} answered HTTP {response.status_code} {response.reason_phrase}{moved}: {_excerpt(text)}"
            )
        try:
            answer = json.loads(content)
        except ValueError:
            raise RewardError(f"{self._source} answered with a body that is not JSON: {_excerpt(text)}") from None
        rewards = answer.get("rewards") if isinstance(answer, dict) else None
        if not isinstance(rewards, list):
            raise RewardError(
                f'{self._source} answered {_excerpt(answer)}; expected {{"rewards": [one number per response]}}'
            )
        if len(rewards) != expected:
            raise RewardError(f"{self._source} returned {len(rewards)} rewards for {expected} responses")
        return [_as_reward(value, self._source, row) for row, value in enumerate(rewards)]


def _json_value(value: Any) -> Any:
    """Numpy scalars and arrays (as datasets hand them out) as JSON values; anything else is refused."""
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"a {type(value).__name__} is not JSON serializable")


class _Abandoned(Exception):
    """Raised in an HTTP reward's request thread once its caller's deadline has passed."""


def _without_credentials(url: str) -> str:
    """``url`` without a ``user:password@`` part or a query (which may carry a key), for messages."""
    return re.sub(r"(//)[^/?#]*@", r"\1", url).split("?", 1)[0]
