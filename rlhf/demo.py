"""``rlhf demo``: the pipeline end to end on an embedded local Ray cluster, on a CPU, in minutes.

Stages: build the tiny model; supervised fine-tuning on the bundled toy-world data whose
responses use positive and negative adjectives at random; a reward model on the bundled
preference pairs (positive over negative); RLHF with PPO from the SFT model against that
reward model (policy, reference, value and reward actor groups, rollouts from a vLLM replica
on Ray Serve); ``rlhf eval`` of the PPO model against the SFT model (format, reward-model
score and the reward model's judged win rate on held-out prompts); then the PPO model is
served (Ray Serve + vLLM) and asked a question through the ``openai`` client. SFT and RM run 2 data-parallel Ray Train workers (DeepSpeed ZeRO-2
over gloo); each stage prints its before/after figures.
"""

from __future__ import annotations

import time
from pathlib import Path

from rlhf import configtree
from rlhf.config import PPOConfig, RMConfig, SFTConfig

EXAMPLE_PROMPT = "Describe the cat."
PPO_STEPS = 30


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


def _config(cls: type, job: str, output_dir: Path, overrides: list[str]):
    from rlhf.cli import EXAMPLES_DIR

    return configtree.load(cls, EXAMPLES_DIR / f"{job}.yaml", [f"train.output_dir={output_dir / job}", *overrides])


DEMO_PARTS = ("tiny-model", "sft", "rm", "ppo", "eval")


def clear_previous_demo(output_dir: Path) -> None:
    """Remove an earlier demo's outputs from ``output_dir``; refuse a directory that holds anything else."""
    import shutil

    if not output_dir.exists():
        return
    others = sorted(p.name for p in output_dir.iterdir() if p.name not in DEMO_PARTS)
    if others:
        raise ValueError(f"{output_dir} holds more than an earlier demo ({', '.join(others[:5])}); choose --output-dir")
    for part in DEMO_PARTS:
        shutil.rmtree(output_dir / part, ignore_errors=True)


def run_demo(output_dir: Path, workers: int = 2) -> dict[str, object]:
    """Run every stage; print and return the before/after figures."""
    from rlhf.data.bundled import positive_word_reward
    from rlhf.jobs import ppo, rm, sft
    from rlhf.models.init_model import init_model

    started = time.perf_counter()
    output_dir = Path(output_dir).resolve()
    clear_previous_demo(output_dir)
    print(f"[1/6] init-model -> {output_dir / 'tiny-model'}", flush=True)
    model_dir = init_model(output_dir / "tiny-model")
    before = sample(model_dir)

    print(f"[2/6] sft: {workers} Ray Train workers, DeepSpeed ZeRO-2, bundled mixed-sentiment data", flush=True)
    data = ["data.path=bundled:sft_mixed", f"cluster.num_workers={workers}"]
    sft_summary = sft.run(_config(SFTConfig, "sft", output_dir, [f"model.name_or_path={model_dir}", *data]))
    sft_model = sft_summary["final_model"]
    after_sft = sample(sft_model)

    print("[3/6] reward model on the bundled preference pairs (positive over negative adjectives)", flush=True)
    rm_summary = rm.run(
        _config(RMConfig, "rm", output_dir, [f"model.name_or_path={sft_model}", f"cluster.num_workers={workers}"])
    )
    reward_model = rm_summary["final_model"]

    print(
        f"[4/6] ppo: {PPO_STEPS} steps from the SFT model against the reward model (policy, reference, value and "
        "reward actor groups; rollouts from a vLLM replica on Ray Serve)",
        flush=True,
    )
    ppo_summary = ppo.run(
        _config(
            PPOConfig,
            "ppo",
            output_dir,
            [f"policy.name_or_path={sft_model}", f"reward={reward_model}", f"train.max_steps={PPO_STEPS}"],
        )
    )
    after_ppo = sample(ppo_summary["final_model"])

    print("[5/6] eval: the PPO model against the SFT model on held-out prompts, judged by the reward model", flush=True)
    report = evaluate(ppo_summary["final_model"], sft_model, reward_model, output_dir / "eval")

    print("[6/6] serve the PPO model (Ray Serve + vLLM) and ask it through the openai client", flush=True)
    served = ask_served_model(ppo_summary["final_model"])
    elapsed = time.perf_counter() - started

    print("\n=== demo summary ===")
    print(f"sft  held-out loss        : {sft_summary['eval_loss_before']:.3f} -> {sft_summary['eval_loss_after']:.3f}")
    print(
        f"rm   held-out accuracy    : {rm_summary['eval_accuracy_before']:.2f} -> {rm_summary['eval_accuracy_after']:.2f}"
    )
    print(
        f"ppo  held-out reward (RM) : {ppo_summary['eval_reward_before']:+.2f} -> {ppo_summary['eval_reward_after']:+.2f} "
        f"(training batches: {ppo_summary['reward_first_steps']:+.2f} -> {ppo_summary['reward_last_steps']:+.2f}; "
        f"{ppo_summary['seconds_per_step']:.2f} s per step)"
    )
    metrics = report["metrics"]
    win = metrics["win_rate"]
    print(
        f"eval PPO vs SFT (64 held-out prompts, sampled): RM-judged win rate {win['value']:.2f} [{win['low']:.2f}, "
        f"{win['high']:.2f}], RM score {metrics['reward']['value']:+.2f}, format {metrics['format']['value']:.2f} "
        f"({output_dir / 'eval'}/report.md)"
    )
    print(f"prompt                    : {EXAMPLE_PROMPT}")
    for name, answer in (("base model", before), ("after SFT", after_sft), ("after PPO", after_ppo)):
        print(f"  {name:<23} : {answer!r} (rule-based reward {positive_word_reward(answer):+.2f})")
    print(f"served endpoint           : {served['url']}/v1 (model {served['model']!r}), chat: {EXAMPLE_PROMPT}")
    print(f"  {'answer':<23} : {served['answer']!r}")
    print(f"run directories           : {output_dir}/{{sft,rm,ppo}} (final/, metrics.jsonl, curves.png, config.yaml)")
    print(f"wall time                 : {elapsed:.0f} s")
    return {
        "sft": sft_summary,
        "rm": rm_summary,
        "ppo": ppo_summary,
        "eval": report,
        "served": served,
        "seconds": elapsed,
    }


def evaluate(model: str, baseline: str, reward_model: str, output_dir: Path) -> dict:
    """``rlhf eval`` of ``model`` against ``baseline`` on the bundled held-out prompts, judged by ``reward_model``."""
    from rlhf.cli import EXAMPLES_DIR
    from rlhf.gen import evaluate as eval_job
    from rlhf.gen.config import EvalConfig

    overrides = [
        f"model={model}",
        f"baseline={baseline}",
        f"judge.reward={reward_model}",
        "metrics=[format,reward,win_rate]",
        "sampling.temperature=1.0",  # sampled, as PPO's held-out reward is: greedy answers hide the spread
        f"output_dir={output_dir}",
    ]
    return eval_job.run(configtree.load(EvalConfig, EXAMPLES_DIR / "eval.yaml", overrides))


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
