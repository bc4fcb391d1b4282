"""Reward sources of RLHF: Python functions, a real HTTP endpoint on 127.0.0.1, a tiny local reward model."""

from __future__ import annotations

import json
import math
import socket
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from rlhf.rl.config import PPOConfig
from rlhf.rl.rewards import (
    FunctionReward,
    HTTPReward,
    ModelReward,
    RewardError,
    RewardSource,
    RewardTimeoutError,
    make_reward,
)

PROMPTS = ["Describe the cat.", "Describe the dog.", "Tell me about the river."]
RESPONSES = ["The cat is warm and kind.", "The dog is cold and sad.", "The river is old and wide."]

# --- Python functions ---

USER_REWARDS = """
import numpy as np

def by_prompt(prompt, response):
    return len(prompt) - len(response)

def echo_prompt_kind(prompt, response):
    return 1.0 if isinstance(prompt, list) else 0.0

def batched(prompts, responses):
    return np.arange(len(responses), dtype=np.float32)

def responses_only(responses, **kwargs):
    assert set(kwargs) == {"prompts"}
    return [float(len(r)) for r in responses]

def wrong_length(prompts, responses):
    return [1.0]

def not_a_list(prompts, responses):
    return 1.0

def not_a_number(response):
    return "high" if "dog" in response else 1.0

def not_finite(response):
    return float("nan")

def boolean(response, scale=2.0):
    return "cat" in response

def raises(response):
    raise KeyError("answer")

def three(a, b, c):
    return 0.0

def star(*args):
    return 0.0

class Scorer:
    @staticmethod
    def length(response):
        return len(response)
"""


@pytest.fixture(scope="module")
def user_module(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A user's reward module, importable as ``user_rewards`` (and a broken one, ``broken_rewards``)."""
    directory = tmp_path_factory.mktemp("user_code")
    (directory / "user_rewards.py").write_text(USER_REWARDS)
    (directory / "broken_rewards.py").write_text("import not_installed_dependency_xyz\n")
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(directory))
        yield "user_rewards"
    for name in ("user_rewards", "broken_rewards"):
        sys.modules.pop(name, None)


def test_default_reward_is_the_bundled_function_and_scores_positive_words() -> None:
    source = make_reward(PPOConfig().reward)
    assert isinstance(source, FunctionReward) and isinstance(source, RewardSource)
    assert source.form == "keywords"  # its parameter is named response
    assert source.score(PROMPTS, RESPONSES, timeout_s=1) == [1.0, -1.0, 0.0]
    assert source.score([], []) == []


def test_function_calling_conventions(user_module: str) -> None:
    def score(name: str, prompts: list = PROMPTS) -> list[float]:
        return make_reward(f"{user_module}:{name}").score(prompts, RESPONSES)

    assert score("by_prompt") == [float(len(p) - len(r)) for p, r in zip(PROMPTS, RESPONSES, strict=True)]
    assert score("batched") == [0.0, 1.0, 2.0]  # a numpy array is accepted
    assert score("responses_only") == [float(len(r)) for r in RESPONSES]
    assert score("boolean") == [1.0, 0.0, 0.0]  # defaulted parameters do not count
    assert score("Scorer.length") == [float(len(r)) for r in RESPONSES]
    chat = [[{"role": "user", "content": p}] for p in PROMPTS]
    assert score("echo_prompt_kind", chat) == [1.0, 1.0, 1.0]  # conversational prompts reach it as messages


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        (
            "rlhf.data.bundld:positive_word_reward",
            r"no module named 'rlhf.data.bundld'.*did you mean 'rlhf.data.bundled'",
        ),
        ("rhlf.data.bundled:positive_word_reward", r"no module named 'rhlf'.*did you mean 'rlhf'"),
        ("rlhf.data.bundled:positive_word_rewrd", r"has no attribute 'positive_word_rewrd'.*'positive_word_reward'"),
        ("rlhf.data.bundled:zzz", r"has no attribute 'zzz'.*its functions: .*positive_word_reward"),
        ("rlhf.data.bundled:POSITIVE", r"'rlhf.data.bundled:POSITIVE' is a list, not a function"),
        ("rlhf.data.bundled:", r"not of the form package.module:function"),
        ("user_rewards:three", r"takes \(a, b, c\); a reward function takes \(response\), \(prompt, response\)"),
        ("user_rewards:star", r"takes \(\*args\)"),
        ("user_rewards:Scorer.lenght", r"'user_rewards:Scorer' has no attribute 'lenght'.*did you mean 'length'"),
        ("broken_rewards:f", r"importing module 'broken_rewards' failed: .*not_installed_dependency_xyz"),
    ],
)
def test_wrong_function_specs_are_refused_naming_the_key_and_the_nearest_name(
    user_module: str, spec: str, expected: str
) -> None:
    with pytest.raises(RewardError, match=r"config key 'reward': .*" + expected):
        make_reward(spec)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("not_a_number", r"reward function 'user_rewards:not_a_number' gave 'high' \(str\) for row 1: not a number"),
        ("not_finite", r"gave nan for row 0: a reward must be finite"),
        ("raises", r"'user_rewards:raises' raised on row 0: KeyError: 'answer'"),
        ("wrong_length", r"'user_rewards:wrong_length' returned 1 rewards for 3 responses"),
        ("not_a_list", r"returned 1.0 \(float\); a batched reward function returns a list of numbers"),
    ],
)
def test_bad_function_results_name_the_function_and_the_row(user_module: str, name: str, expected: str) -> None:
    source = FunctionReward(f"{user_module}:{name}")
    with pytest.raises(RewardError, match=expected):
        source.score(PROMPTS, RESPONSES)


def test_batches_are_checked_before_scoring() -> None:
    source = make_reward("rlhf.data.bundled:positive_word_reward")
    with pytest.raises(RewardError, match="2 prompts but 3 responses"):
        source.score(PROMPTS[:2], RESPONSES)
    with pytest.raises(RewardError, match="response of row 1 is a NoneType, not a string"):
        source.score(PROMPTS[:2], ["The cat is kind.", None])


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("positive_word_reward", r"'positive_word_reward' is not one of the accepted forms"),
        ("./no/such/reward_model", r"directory ./no/such/reward_model does not exist"),
        ("ftp://example.com/reward", r"is a URL but not http\(s\)"),
        ("http://", r"not an http\(s\) URL with a host"),
    ],
)
def test_make_reward_refuses_other_forms_listing_the_accepted_ones(spec: str, expected: str) -> None:
    with pytest.raises(RewardError, match=r"config key 'reward': .*" + expected) as info:
        make_reward(spec)
    if "URL with a host" not in expected:
        assert all(form in str(info.value) for form in ("http(s) URL", "reward-model directory", "module:function"))


# --- a real HTTP reward endpoint on 127.0.0.1 ---

SLOW_S = 2.0


class RewardHandler(BaseHTTPRequestHandler):
    """A reward endpoint whose path picks its behaviour."""

    def do_POST(self) -> None:
        request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.requests.append(request)
        lengths = [float(len(r)) for r in request["responses"]]
        if self.path == "/slow":
            time.sleep(SLOW_S)
        if self.path == "/error":
            return self._answer(500, "reward model crashed: CUDA out of memory", "text/plain")
        answers = {
            "/short": {"rewards": lengths[:1]},
            "/missing": {"scores": lengths},
            "/null": {"rewards": [None] * len(lengths)},
        }
        if self.path == "/html":
            return self._answer(200, "<html>maintenance</html>", "text/html")
        return self._answer(200, json.dumps(answers.get(self.path, {"rewards": lengths})), "application/json")

    def _answer(self, status: int, body: str, content_type: str) -> None:
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


class QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # the client of /slow has gone when the answer is written


@pytest.fixture(scope="module")
def endpoint() -> Iterator[tuple[str, list]]:
    server = QuietServer(("127.0.0.1", 0), RewardHandler)
    server.requests = []
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", server.requests
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


@pytest.fixture
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _score_http(url: str, timeout_s: float = 5.0, prompts: list = PROMPTS) -> list[float]:
    source = make_reward(url)
    assert isinstance(source, HTTPReward)
    try:
        return source.score(prompts, RESPONSES, timeout_s=timeout_s)
    finally:
        source.close()


def test_http_reward_posts_the_batch_and_reads_the_rewards(endpoint: tuple[str, list]) -> None:
    url, requests = endpoint
    chat = [[{"role": "user", "content": p}] for p in PROMPTS]
    assert _score_http(f"{url}/reward", prompts=chat) == [float(len(r)) for r in RESPONSES]
    assert requests[-1] == {"prompts": chat, "responses": RESPONSES}


def test_http_reward_endpoint_down_fails_at_once(free_port: int) -> None:
    start = time.monotonic()
    with pytest.raises(RewardError, match=rf"reward endpoint http://127.0.0.1:{free_port}/r is not reachable") as info:
        _score_http(f"http://user:secret@127.0.0.1:{free_port}/r?key=token", timeout_s=3)
    assert time.monotonic() - start < 3
    assert "secret" not in str(info.value) and "token" not in str(info.value)


def test_http_reward_that_never_answers_fails_within_the_timeout() -> None:
    with socket.socket() as sock:  # accepts connections (the kernel does) and never answers
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        url = f"http://127.0.0.1:{sock.getsockname()[1]}/r"
        start = time.monotonic()
        with pytest.raises(RewardTimeoutError, match=r"gave no answer within the timeout of 0.5 s"):
            _score_http(url, timeout_s=0.5)
        assert 0.45 <= time.monotonic() - start < 1.5


def test_slow_http_reward_fails_within_the_timeout(endpoint: tuple[str, list]) -> None:
    start = time.monotonic()
    with pytest.raises(TimeoutError, match=r"reward endpoint .*/slow gave no answer within the timeout of 0.5 s"):
        _score_http(f"{endpoint[0]}/slow", timeout_s=0.5)
    assert 0.45 <= time.monotonic() - start < 1.5 < SLOW_S


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/error", r"answered HTTP 500 Internal Server Error: reward model crashed: CUDA out of memory"),
        ("/short", r"returned 1 rewards for 3 responses"),
        ("/html", r"answered with a body that is not JSON: <html>maintenance</html>"),
        ("/missing", r"""answered \{'scores': .*; expected \{"rewards": \[one number per response\]\}"""),
        ("/null", r"gave None \(NoneType\) for row 0: not a number"),
    ],
)
def test_bad_http_answers_are_reported_with_the_url(endpoint: tuple[str, list], path: str, expected: str) -> None:
    with pytest.raises(RewardError, match=rf"reward endpoint {endpoint[0]}{path} " + expected):
        _score_http(f"{endpoint[0]}{path}")


MAX_RESPONSE_BYTES = 8 << 20  # the documented cap on an endpoint's answer (rlhf.rl.rewards.MAX_RESPONSE_BYTES)


class StreamingHandler(BaseHTTPRequestHandler):
    """``/huge``: a valid answer padded past the size cap, at once; ``/trickle``: an endless body, one byte at a
    time. The server counts the requests whose connection is still open."""

    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        with self.server.lock:
            self.server.open += 1
        try:
            if self.path == "/huge":
                body = json.dumps({"rewards": [1.0, 2.0, 3.0], "padding": "x" * (2 * MAX_RESPONSE_BYTES)}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                return
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(1 << 30))
            self.end_headers()
            self.wfile.write(b'{"rewards": [')
            deadline = time.monotonic() + 30  # an abandoned client that read on would keep this going
            while time.monotonic() < deadline:
                self.wfile.write(b" ")
                self.wfile.flush()
                time.sleep(0.05)
        except OSError:
            pass  # the client closed the connection
        finally:
            with self.server.lock:
                self.server.open -= 1

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def streaming_endpoint() -> Iterator[tuple[str, QuietServer]]:
    server = QuietServer(("127.0.0.1", 0), StreamingHandler)
    server.open, server.lock = 0, threading.Lock()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", server
    server.shutdown()
    server.server_close()


def test_an_http_answer_larger_than_the_cap_is_refused(streaming_endpoint: tuple[str, QuietServer]) -> None:
    """An endpoint's answer was read whole into memory, whatever its size (here twice the 8 MiB cap)."""
    url, _ = streaming_endpoint
    with pytest.raises(RewardError, match=rf"reward endpoint {url}/huge answered with more than {MAX_RESPONSE_BYTES}"):
        _score_http(f"{url}/huge", timeout_s=30)


def test_an_abandoned_http_call_closes_its_connection(streaming_endpoint: tuple[str, QuietServer]) -> None:
    """A call given up at its deadline went on reading a trickling answer in its thread, keeping the connection
    (and the thread) for as long as the server kept sending."""
    url, server = streaming_endpoint
    source = make_reward(f"{url}/trickle")
    try:
        for _ in range(3):
            with pytest.raises(RewardTimeoutError, match="within the timeout of 0.3 s"):
                source.score(PROMPTS, RESPONSES, timeout_s=0.3)
        deadline = time.monotonic() + 5
        while server.open and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server.open == 0, f"{server.open} abandoned connections still open"
        assert not [t for t in threading.enumerate() if t.name == "rlhf-http-reward"]
    finally:
        source.close()


# --- a tiny reward model ---


@pytest.fixture(scope="module")
def reward_model_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with a randomly initialised scalar head, saved as `rlhf rm` saves one."""
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    config = AutoConfig.from_pretrained(tiny_model_dir, num_labels=1)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(config)
    model.score.weight.data.normal_(0.0, 1.0)  # rewards far enough apart to rank
    directory = tmp_path_factory.mktemp("rm") / "final"
    model.save_pretrained(directory)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def model_reward(reward_model_dir: Path) -> ModelReward:
    source = make_reward(str(reward_model_dir))
    assert isinstance(source, ModelReward) and isinstance(source, RewardSource)
    return source


def test_model_reward_scores_each_pair_as_rlhf_rm_trained_it(model_reward: ModelReward) -> None:
    from rlhf.data.collate import preference_batch
    from rlhf.data.encode import LengthLimits, encode_preference
    from rlhf.data.formats import PreferenceExample

    chat = [[{"role": "user", "content": p}] for p in PROMPTS]
    for prompts, as_response in ((PROMPTS, lambda r: r), (chat, lambda r: [{"role": "assistant", "content": r}])):
        # the reward model's own training path: preference pairs, one padded [2B, T] batch, the head's logits
        pairs = [
            PreferenceExample(p, as_response(chosen), as_response(rejected))
            for p, chosen, rejected in zip(prompts, RESPONSES, RESPONSES[1:] + RESPONSES[:1], strict=True)
        ]
        examples = [encode_preference(pair, model_reward.tokenizer, LengthLimits(512)) for pair in pairs]
        batch = preference_batch(examples, model_reward.tokenizer.pad_token_id)
        with torch.no_grad():
            logits = model_reward.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        chosen = logits.squeeze(-1).chunk(2)[0]
        scores = model_reward.score(prompts, RESPONSES)
        assert all(math.isfinite(s) for s in scores)
        torch.testing.assert_close(torch.tensor(scores), chosen, rtol=0, atol=1e-5)


def test_model_reward_is_deterministic_and_independent_of_batching(
    model_reward: ModelReward, reward_model_dir: Path
) -> None:
    prompts, responses = PROMPTS * 2, [*RESPONSES, "The cat is.", "The dog is lovely, bright and calm.", "Hi"]
    scores = model_reward.score(prompts, responses)
    assert len(set(scores)) == len(scores)
    reloaded = ModelReward(reward_model_dir, batch_size=2)
    assert reloaded.score(prompts, responses) == pytest.approx(scores, abs=1e-5)
    one_by_one = [model_reward.score([p], [r])[0] for p, r in zip(prompts, responses, strict=True)]
    assert one_by_one == pytest.approx(scores, abs=1e-5)
    ranking = sorted(range(len(scores)), key=scores.__getitem__)
    assert sorted(range(len(scores)), key=reloaded.score(prompts, responses).__getitem__) == ranking


def test_model_reward_refuses_a_prompt_longer_than_max_length(reward_model_dir: Path) -> None:
    source = ModelReward(reward_model_dir, max_length=8)
    long = "Describe the cat and the dog and the river and the forest."
    with pytest.raises(RewardError, match=r"reward model .* cannot encode row 1: .*prompt leaves no room"):
        source.score(["Hi.", long], ["The cat is kind.", "It is kind."])


def test_directories_that_hold_no_reward_model_are_refused(
    tiny_model_dir: Path, reward_model_dir: Path, tmp_path: Path
) -> None:
    from transformers import AutoConfig

    with pytest.raises(RewardError, match=r"holds LlamaForCausalLM, not a reward model"):
        make_reward(str(tiny_model_dir))
    classifier = AutoConfig.from_pretrained(tiny_model_dir, num_labels=2)
    classifier.architectures = ["LlamaForSequenceClassification"]
    classifier.save_pretrained(tmp_path / "classifier")
    with pytest.raises(RewardError, match=r"holds a classifier with 2 labels, not a reward model"):
        make_reward(str(tmp_path / "classifier"))
    with pytest.raises(RewardError, match=rf"it looks like a run directory: the trained model is {reward_model_dir}"):
        make_reward(str(reward_model_dir.parent))
    (tmp_path / "empty").mkdir()
    with pytest.raises(RewardError, match=r"config key 'reward': .*empty is not a model directory \(no config.json\)"):
        make_reward(str(tmp_path / "empty"))


def test_a_reward_spec_is_parsed_once_into_its_kind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from rlhf.rl.rewards import RewardError, RewardSpec, parse_reward

    monkeypatch.chdir(tmp_path)
    (tmp_path / "rm").mkdir()
    assert parse_reward("https://user:pw@host/score") == RewardSpec("http", "https://user:pw@host/score")
    assert parse_reward("rm") == RewardSpec("model", str((tmp_path / "rm").resolve()))  # resolved: one name per model
    assert parse_reward("rlhf.data.bundled:positive_word_reward").kind == "function"
    assert "pw" not in repr(parse_reward("https://user:pw@host/score"))
    with pytest.raises(RewardError, match="directory ./missing does not exist"):
        parse_reward("./missing")
