"""Small datasets bundled with the project, one per data format, with a learnable signal.

Every dataset is generated here from a fixed seed, so the files under
``rlhf/data/bundled/`` can be regenerated and checked (``python -m rlhf.data.bundled``).
They describe one toy world that every stage of the pipeline can learn:

* prompts ask to describe a thing (``"Describe the cat."``);
* good responses use *positive* adjectives, bad ones *negative* adjectives;
* SFT data teaches the response template; preference data prefers positive words;
  the rule-based reward (:func:`positive_word_reward`) scores the share of positive words.

A tiny model learns the template within a few dozen steps, and a reward model learns
to separate positive from negative words, so loss curves and accuracies move visibly
on a CPU in minutes.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path

BUNDLED_DIR = Path(__file__).parent / "bundled"

THINGS = [
    "cat",
    "dog",
    "garden",
    "river",
    "city",
    "forest",
    "song",
    "book",
    "house",
    "morning",
    "mountain",
    "ocean",
    "bridge",
    "market",
    "teacher",
    "friend",
    "train",
    "window",
    "lamp",
    "storm",
]
POSITIVE = [
    "bright",
    "kind",
    "lovely",
    "warm",
    "happy",
    "calm",
    "gentle",
    "wonderful",
    "cheerful",
    "friendly",
]
NEGATIVE = [
    "dull",
    "cruel",
    "ugly",
    "cold",
    "sad",
    "noisy",
    "harsh",
    "awful",
    "gloomy",
    "hostile",
]
NEUTRAL = ["old", "large", "small", "quiet", "round", "tall", "long", "young", "plain", "wide"]

SYSTEM_PROMPT = "You are a helpful assistant."

# name -> (file name, what the rows look like)
DATASETS: dict[str, str] = {
    "sft_prompt_completion": "prompt/completion (plain text)",
    "sft_messages": "chat `messages` (multi-turn, with a system turn)",
    "sft_alpaca": "alpaca instruction/input/output",
    "sft_mixed": "prompt/completion whose adjectives are positive or negative at random (a neutral start for RL)",
    "preference": "prompt/chosen/rejected (plain text)",
    "preference_chat": "prompt/chosen/rejected (conversational)",
    "unpaired": "prompt/completion/label (unpaired preference, KTO)",
    "prompts": "prompt only (RL)",
}


def _prompt(rng: random.Random) -> tuple[str, str]:
    thing = rng.choice(THINGS)
    return thing, rng.choice([f"Describe the {thing}.", f"Tell me about the {thing}.", f"What is the {thing} like?"])


def _response(rng: random.Random, thing: str, words: list[str]) -> str:
    first, second = rng.sample(words, 2)
    return f"The {thing} is {first} and {second}."


def positive_word_reward(response: str) -> float:
    """Rule-based reward of the toy world: share of positive minus share of negative adjectives.

    Returns a float in [-1, 1]; 0 for a response with no adjective from either list.
    """
    words = [w.strip(".,!?;:").lower() for w in response.split()]
    positive = sum(w in POSITIVE for w in words)
    negative = sum(w in NEGATIVE for w in words)
    total = positive + negative
    return 0.0 if total == 0 else (positive - negative) / total


def judge_case(num_prompts: int = 24, seed: int = 7) -> list[dict]:
    """A bundled case for checking a judge: prompts, each with responses the rule-based reward orders.

    Each row is ``{"prompt", "responses", "oracle"}``: four responses to the prompt with two
    positive, one positive and one negative, one neutral and one negative, and two negative
    adjectives (in a shuffled order), and their :func:`positive_word_reward` (1, 0, -1, -1).
    """
    rng = random.Random(f"judge-case-{seed}")
    rows = []
    for _ in range(num_prompts):
        thing, prompt = _prompt(rng)
        pairs = [
            rng.sample(POSITIVE, 2),
            [rng.choice(POSITIVE), rng.choice(NEGATIVE)],
            [rng.choice(NEUTRAL), rng.choice(NEGATIVE)],
            rng.sample(NEGATIVE, 2),
        ]
        rng.shuffle(pairs)
        responses = [f"The {thing} is {a} and {b}." for a, b in pairs]
        rows.append({"prompt": prompt, "responses": responses, "oracle": [positive_word_reward(r) for r in responses]})
    return rows


def _rows(name: str, n: int, seed: int) -> Iterator[dict]:
    rng = random.Random(f"{name}-{seed}")
    for _ in range(n):
        thing, prompt = _prompt(rng)
        good = _response(rng, thing, POSITIVE)
        bad = _response(rng, thing, NEGATIVE)
        if name == "sft_prompt_completion":
            yield {"prompt": prompt, "completion": good}
        elif name == "sft_messages":
            other, follow_up = _prompt(rng)
            yield {
                "messages": [
                    {"role": "system", "content": SYSTEM_PROMPT},
                    {"role": "user", "content": prompt},
                    {"role": "assistant", "content": good},
                    {"role": "user", "content": follow_up},
                    {"role": "assistant", "content": _response(rng, other, POSITIVE)},
                ]
            }
        elif name == "sft_mixed":
            yield {"prompt": prompt, "completion": _response(rng, thing, POSITIVE + NEGATIVE)}
        elif name == "sft_alpaca":
            yield {"instruction": "Describe the thing in one sentence.", "input": thing, "output": good}
        elif name == "preference":
            yield {"prompt": prompt, "chosen": good, "rejected": bad}
        elif name == "preference_chat":
            yield {
                "prompt": [{"role": "user", "content": prompt}],
                "chosen": [{"role": "assistant", "content": good}],
                "rejected": [{"role": "assistant", "content": bad}],
            }
        elif name == "unpaired":
            label = rng.random() < 0.5
            yield {"prompt": prompt, "completion": good if label else bad, "label": label}
        elif name == "prompts":
            yield {"prompt": prompt}
        else:
            raise KeyError(f"unknown bundled dataset {name!r}; known: {sorted(DATASETS)}")


SIZES = {"train": 512, "test": 64}


def bundled_path(name: str, split: str = "train") -> Path:
    """Path of a bundled JSONL file, e.g. ``bundled_path("preference", "test")``."""
    if name not in DATASETS:
        raise KeyError(f"unknown bundled dataset {name!r}; known: {sorted(DATASETS)}")
    if split not in SIZES:
        raise KeyError(f"unknown split {split!r}; known: {sorted(SIZES)}")
    return BUNDLED_DIR / f"{name}.{split}.jsonl"


def generate(out_dir: Path = BUNDLED_DIR) -> list[Path]:
    """Write every bundled dataset (train and test splits) as JSONL; return the paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in DATASETS:
        for split, n in SIZES.items():
            path = out_dir / f"{name}.{split}.jsonl"
            with path.open("w") as f:
                for row in _rows(name, n, seed=0 if split == "train" else 1):
                    f.write(json.dumps(row) + "\n")
            paths.append(path)
    return paths


def corpus() -> Iterator[str]:
    """Texts of the toy world, for training the local tokenizer (covers every word used)."""
    rng = random.Random("corpus")
    yield SYSTEM_PROMPT
    for thing in THINGS:
        for words in (POSITIVE, NEGATIVE, NEUTRAL):
            for _ in range(4):
                _, prompt = _prompt(rng)
                yield prompt
                yield _response(rng, thing, words)
    yield "Describe the thing in one sentence."
    yield " ".join(POSITIVE + NEGATIVE + NEUTRAL + THINGS)


if __name__ == "__main__":
    for p in generate():
        print(p)
