"""``rlhf demo``: the pipeline end to end on an embedded local Ray cluster, on a CPU, in minutes.

Stages today: build the tiny model; supervised fine-tuning on the bundled toy-world data;
a reward model on the bundled preference pairs; DPO from the SFT model on the same pairs;
then the DPO model is served (Ray Serve + vLLM) and asked a question through the
``openai`` client. Each training stage runs 2 data-parallel Ray Train workers (DeepSpeed
ZeRO-2 over gloo) and prints its before/after figures.
"""

from __future__ import annotations

import time
from pathlib import Path

from rlhf import configtree
from rlhf.config import DPOConfig, RMConfig, SFTConfig

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


def _config(cls: type, job: str, output_dir: Path, model: Path | str, workers: int):
    from rlhf.cli import EXAMPLES_DIR

    overrides = [
        f"model.name_or_path={model}",
        f"train.output_dir={output_dir / job}",
        f"cluster.num_workers={workers}",
    ]
    return configtree.load(cls, EXAMPLES_DIR / f"{job}.yaml", overrides)


def run_demo(output_dir: Path, workers: int = 2) -> dict[str, object]:
    """Run every stage this version has; print and return the before/after figures."""
    from rlhf.data.bundled import positive_word_reward
    from rlhf.jobs import dpo, rm, sft
    from rlhf.models.init_model import init_model

    started = time.perf_counter()
    output_dir = Path(output_dir).resolve()
    print(f"[1/5] init-model -> {output_dir / 'tiny-model'}", flush=True)
    model_dir = init_model(output_dir / "tiny-model")
    before = sample(model_dir)

    print(f"[2/5] sft: {workers} Ray Train workers, DeepSpeed ZeRO-2, bundled prompt/completion data", flush=True)
    sft_summary = sft.run(_config(SFTConfig, "sft", output_dir, model_dir, workers))
    after_sft = sample(sft_summary["final_model"])

    print("[3/5] reward model on the bundled preference pairs", flush=True)
    rm_summary = rm.run(_config(RMConfig, "rm", output_dir, sft_summary["final_model"], workers))

    print("[4/5] dpo from the SFT model on the same pairs", flush=True)
    dpo_summary = dpo.run(_config(DPOConfig, "dpo", output_dir, sft_summary["final_model"], workers))
    after_dpo = sample(dpo_summary["final_model"])

    print("[5/5] serve the DPO model (Ray Serve + vLLM) and ask it through the openai client", flush=True)
    served = ask_served_model(dpo_summary["final_model"])
    elapsed = time.perf_counter() - started

    print("\n=== demo summary ===")
    print(f"sft  held-out loss        : {sft_summary['eval_loss_before']:.3f} -> {sft_summary['eval_loss_after']:.3f}")
    print(
        f"rm   held-out accuracy    : {rm_summary['eval_accuracy_before']:.2f} -> {rm_summary['eval_accuracy_after']:.2f}"
    )
    print(
        f"dpo  reward accuracy      : {dpo_summary['eval_rewards/accuracy_before']:.2f} -> "
        f"{dpo_summary['eval_rewards/accuracy_after']:.2f} "
        f"(margin {dpo_summary['eval_rewards/margin_before']:.2f} -> {dpo_summary['eval_rewards/margin_after']:.2f})"
    )
    print(f"prompt                    : {EXAMPLE_PROMPT}")
    for name, answer in (("base model", before), ("after SFT", after_sft), ("after DPO", after_dpo)):
        print(f"  {name:<23} : {answer!r} (rule-based reward {positive_word_reward(answer):+.2f})")
    print(f"served endpoint           : {served['url']}/v1 (model {served['model']!r}), chat: {EXAMPLE_PROMPT}")
    print(f"  {'answer':<23} : {served['answer']!r}")
    print(f"run directories           : {output_dir}/{{sft,rm,dpo}} (final/, metrics.jsonl, config.yaml)")
    print(f"wall time                 : {elapsed:.0f} s")
    return {"sft": sft_summary, "rm": rm_summary, "dpo": dpo_summary, "served": served, "seconds": elapsed}


def ask_served_model(model_dir: str, question: str = EXAMPLE_PROMPT) -> dict[str, str]:
    """Serve ``model_dir`` on 127.0.0.1, ask ``question`` through the openai client, stop the endpoint."""
    import openai

    from cluster.connect import free_port
    from rlhf.config import ServeConfig
    from serving.server import start, stop

    # a free port, so the demo never collides with a running server
    config = ServeConfig(model=model_dir, model_name="demo", port=free_port(), max_model_len=256, max_tokens_limit=64)
    url = start(config)
    try:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=2)
        response = client.chat.completions.create(
            model="demo", messages=[{"role": "user", "content": question}], max_tokens=16, temperature=0
        )
        answer = (response.choices[0].message.content or "").strip()
    finally:
        stop()
    return {"url": url, "model": "demo", "answer": answer}
