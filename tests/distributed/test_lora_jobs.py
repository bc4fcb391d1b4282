"""LoRA and QLoRA through the real jobs (2 ranks of the jobs' loop, gloo, a few steps each; tests/distributed/ranks.py).

Each run trains 4 steps, then the test checks what a user gets: the held-out loss fell;
``final/`` is a plain merged model that transformers loads, and it scores the held-out data
as the job last did; ``final/adapter`` is a peft adapter that, applied to the base model,
gives the merged model's logits. The LoRA reward model runs under ZeRO-3 (its adapters and
score head are gathered from partitions on export), the others under the examples' ZeRO-2.

Tolerances, all 1e-4 absolute. Adapter vs merged logits: merging folds ``B @ A * alpha / r``
into the fp32 base weights, so only summation order differs (<1e-6 observed); an adapter
saved untrained, or without the reward model's score head, differs by >0.1. Merged model vs
the job's final held-out loss: the same fp32 forward passes over the same batches (<1e-5
observed). QLoRA trains the adapters against the nf4-quantized base while ``final/`` merges
them into the unquantized base (README), so its merged model is only required to keep a
held-out loss below the untrained model's (it lands within ~1e-2 of the job's own final
figure); its adapter-vs-merged check is exact as above.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest
import torch

from .ranks import job_config, run_ranks

pytestmark = pytest.mark.distributed

ATOL = 1e-4

CASES = [  # job, model.quantization, engine.zero_stage
    pytest.param("sft", "none", 2, id="sft-lora"),
    pytest.param("rm", "none", 3, id="rm-lora-zero3"),
    pytest.param("dpo", "none", 2, id="dpo-lora"),
    pytest.param("sft", "4bit", 2, id="sft-qlora"),
    pytest.param("rm", "4bit", 2, id="rm-qlora"),
    pytest.param("dpo", "4bit", 2, id="dpo-qlora"),
]


def _overrides(job: str, quantization: str, zero_stage: int, model_dir: Path, out: Path) -> list[str]:
    return [
        f"model.name_or_path={model_dir}",
        f"train.output_dir={out}",
        "train.max_steps=4",
        "model.lora.enabled=true",
        f"model.quantization={quantization}",
        f"engine.zero_stage={zero_stage}",
        "engine.learning_rate=3.0e-3",  # adapters start at zero (B = 0) and need a larger step to move in 4 steps
        "engine.warmup_steps=0",
        "data.max_rows=64",
    ]


@pytest.fixture(scope="module")
def finished(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[tuple, tuple[list[str], dict]]:
    """Every case trained once, one after the other on the same 2 ranks: its overrides and its run summary."""
    from rlhf.jobs.loop import summarize
    from rlhf.jobs.storage import RunStorage

    tmp = tmp_path_factory.mktemp("lora")
    keys = [tuple(case.values) for case in CASES]
    runs = [(key[0], _overrides(*key, tiny_model_dir, tmp / "-".join(map(str, key)))) for key in keys]
    results = run_ranks(2, runs, tmp / "records.json")
    return {
        key: (overrides, summarize(records, RunStorage(str(tmp / "-".join(map(str, key))))))
        for key, (_, overrides), records in zip(keys, runs, results, strict=True)
    }


def _load_final(job: str, model_dir: Path, final: Path) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The merged model in ``final`` and the base model with ``final/adapter`` applied by peft, both fp32."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    if job == "rm":
        pad = AutoTokenizer.from_pretrained(final).pad_token_id
        merged = AutoModelForSequenceClassification.from_pretrained(final)
        base = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1, pad_token_id=pad)
    else:
        merged = AutoModelForCausalLM.from_pretrained(final)
        base = AutoModelForCausalLM.from_pretrained(model_dir)
    return merged.eval(), PeftModel.from_pretrained(base, final / "adapter").eval()


def _held_out_loss(job: str, config, model: torch.nn.Module) -> float:
    """``model``'s held-out loss as the job computes it (same examples, batches, objective and reference)."""
    from rlhf.jobs.loop import evaluate, prepare_data
    from rlhf.models.loading import load_causal_lm, load_tokenizer

    tokenizer = load_tokenizer(config.model)
    objective = importlib.import_module(f"rlhf.jobs.{job}").make_objective(config, tokenizer)
    _, examples = prepare_data(config, tokenizer, objective.data_kind)
    if job == "dpo":  # reference log-probs from the initial policy: the (quantized) base, adapters at zero
        examples = objective.prepare(load_causal_lm(config.model, trainable=False), examples)
    size = config.engine.micro_batch_size
    batches = [objective.collate(examples[i : i + size]) for i in range(0, len(examples), size)]
    return evaluate(model, objective, batches)["eval_loss"]  # a Hugging Face model is engine enough here


@pytest.mark.parametrize(("job", "quantization", "zero_stage"), CASES)
def test_adapters_train_and_export_a_merged_model_and_an_adapter(
    finished: dict, tiny_model_dir: Path, job: str, quantization: str, zero_stage: int
) -> None:
    from transformers import AutoTokenizer

    overrides, summary = finished[(job, quantization, zero_stage)]
    config = job_config(job, overrides)
    assert summary["eval_loss_after"] < summary["eval_loss_before"], summary

    final = Path(summary["final_model"])
    adapter_config = json.loads((final / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["peft_type"] == "LORA"
    if job == "rm":  # the score head is new: it trains in full alongside the adapters and travels with them
        assert "score" in adapter_config["modules_to_save"], adapter_config
    merged, adapted = _load_final(job, tiny_model_dir, final)
    assert not any("lora" in name for name, _ in merged.named_parameters())  # a plain model, adapters folded in

    merged_loss = _held_out_loss(job, config, merged)
    print(
        f"\n{job} {quantization}: held-out loss {summary['eval_loss_before']:.4f} -> {summary['eval_loss_after']:.4f}"
    )
    print(
        f"merged model's held-out loss {merged_loss:.6f} (|diff| {abs(merged_loss - summary['eval_loss_after']):.2e})"
    )
    if quantization == "none":
        assert merged_loss == pytest.approx(summary["eval_loss_after"], abs=ATOL)
    else:
        assert merged_loss < summary["eval_loss_before"], (merged_loss, summary)

    tokenizer = AutoTokenizer.from_pretrained(final)
    texts = ["Describe the cat.", "Describe the big red house on the hill."]
    inputs = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        merged_logits = merged(**inputs).logits
        adapter_logits = adapted(**inputs).logits
        with adapted.disable_adapter():
            base_logits = adapted(**inputs).logits
    difference = float((merged_logits - adapter_logits).abs().max())
    print(
        f"merged vs adapter: max |logit diff| {difference:.2e}; vs base {(merged_logits - base_logits).abs().max():.2e}"
    )
    assert difference <= ATOL, difference
    if job != "rm":  # (the reward model's base has a random score head of its own: nothing to compare)
        assert float((merged_logits - base_logits).abs().max()) > 1000 * ATOL  # trained: the check is not vacuous
