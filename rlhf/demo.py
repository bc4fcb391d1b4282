"""``rlhf demo``: the pipeline end to end on an embedded local Ray cluster, on a CPU, in minutes.

Stages today: build the tiny model, then supervised fine-tuning on the bundled toy-world
data with 2 data-parallel workers (DeepSpeed ZeRO-2 over gloo). It prints the held-out
loss before and after, and what the model answers to a prompt before and after.
"""

from __future__ import annotations

import time
from pathlib import Path

from rlhf import configtree
from rlhf.config import SFTConfig

EXAMPLE_PROMPT = "Describe the cat."


def sample(model_dir: str | Path, prompt: str = EXAMPLE_PROMPT, max_new_tokens: int = 16) -> str:
    """Greedy completion of a plain-text ``prompt`` by the model in ``model_dir`` (transformers)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()


def run_demo(output_dir: Path, workers: int = 2) -> dict[str, object]:
    """Run every stage this version has; print and return the before/after figures."""
    from rlhf.cli import EXAMPLES_DIR
    from rlhf.jobs import sft
    from rlhf.models.init_model import init_model

    started = time.perf_counter()
    output_dir = Path(output_dir).resolve()
    print(f"[1/2] init-model -> {output_dir / 'tiny-model'}", flush=True)
    model_dir = init_model(output_dir / "tiny-model")
    before = sample(model_dir)

    print(f"[2/2] sft: {workers} Ray Train workers, DeepSpeed ZeRO-2, bundled prompt/completion data", flush=True)
    config = configtree.load(
        SFTConfig,
        EXAMPLES_DIR / "sft.yaml",
        [f"model.name_or_path={model_dir}", f"train.output_dir={output_dir / 'sft'}", f"cluster.num_workers={workers}"],
    )
    summary = sft.run(config)
    after = sample(summary["final_model"])
    elapsed = time.perf_counter() - started

    print("\n=== demo summary ===")
    print(f"sft held-out loss : {summary['eval_loss_before']:.3f} -> {summary['eval_loss_after']:.3f}")
    print(f"sft training loss : {summary['first_loss']:.3f} -> {summary['last_loss']:.3f} ({summary['steps']} steps)")
    print(f"prompt            : {EXAMPLE_PROMPT}")
    print(f"  before SFT      : {before!r}")
    print(f"  after SFT       : {after!r}")
    print(f"final model       : {summary['final_model']}")
    print(f"metrics           : {output_dir / 'sft' / 'metrics.jsonl'}")
    print(f"wall time         : {elapsed:.0f} s")
    return {**summary, "sample_before": before, "sample_after": after, "seconds": elapsed}
