"""rlhf plan: the ZeRO paper's model-state figures, real parameter and state sizes of the tiny model, and
refusals and acceptances for stated 7B and 70B cases."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from cluster import configtree
from rlhf.config import SFTConfig
from rlhf.jobs.registry import EXAMPLES_DIR
from rlhf.plan import GB, ModelShape, model_state_bytes, plan_job, shape_of
from rlhf.rl.config import PPOConfig

# Llama-2-7B and Llama-2-70B as their configs describe them (parameters as counted by transformers)
LLAMA_7B = ModelShape(parameters=6_738_415_616, hidden_size=4096, num_layers=32, num_heads=32, vocab_size=32000)
LLAMA_70B = ModelShape(parameters=68_976_648_192, hidden_size=8192, num_layers=80, num_heads=64, vocab_size=32000)


@pytest.mark.parametrize(
    ("stage", "expected_gb"),
    # Rajbhandari et al. 2020 (ZeRO), Figure 1: a 7.5B model, Nd = 64, mixed-precision Adam (K = 12)
    [(0, 120.0), (1, 31.4), (2, 16.6), (3, 1.88)],
)
def test_model_states_match_the_zero_paper(stage: int, expected_gb: float) -> None:
    total = sum(model_state_bytes(7.5e9, stage, 64).values()) / GB
    assert total == pytest.approx(expected_gb, rel=0.01)


def test_offload_moves_the_optimizer_and_zero3_params_off_the_gpu() -> None:
    states = model_state_bytes(7.5e9, 3, 64, offload_optimizer=True, offload_params=True)
    assert states["optimizer"] == 0 and states["weights"] == 0
    assert states["gradients"] == pytest.approx(2 * 7.5e9 / 64)


def test_the_tiny_models_parameters_and_fp32_states_are_what_training_allocates(tiny_model_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    shape = shape_of(str(tiny_model_dir))
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    assert shape.parameters == sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)  # the engine's fp32 ZeRO-0 optimizer
    ids = torch.randint(0, shape.vocab_size, (2, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    measured = {
        "weights": sum(p.nbytes for p in model.parameters()),
        "gradients": sum(p.grad.nbytes for p in model.parameters()),
        "optimizer": sum(t.nbytes for state in optimizer.state.values() for t in state.values() if t.dim() > 0),
    }
    estimated = model_state_bytes(shape.parameters, 0, 1, mixed_precision=False)
    print(f"\ntiny model states, measured vs estimated bytes: {measured} vs {estimated}")
    assert measured == pytest.approx(estimated, rel=0.001)


def sft_config(*overrides: str) -> SFTConfig:
    base = ["model.name_or_path=llama-7b", "data.max_length=2048", "engine.micro_batch_size=1"]
    return configtree.load(SFTConfig, EXAMPLES_DIR / "sft.yaml", [*base, *overrides])


def test_full_7b_sft_without_zero_does_not_fit_80gb_and_zero3_with_checkpointing_does() -> None:
    shapes = {"llama-7b": LLAMA_7B}
    refused = plan_job(sft_config("engine.zero_stage=0", "cluster.num_workers=8"), "sft", 1, 8, 80 * GB, shapes=shapes)
    assert not refused.fits
    assert "sft: " in refused.problems[0] and "optimizer" in refused.problems[0]  # 16 bytes x 6.7B = 108 GB
    accepted = plan_job(
        sft_config("engine.zero_stage=3", "cluster.num_workers=8", "model.gradient_checkpointing=true"),
        "sft",
        1,
        8,
        80 * GB,
        shapes=shapes,
    )
    assert accepted.fits, accepted.problems
    assert accepted.roles[0].total / GB == pytest.approx(16 * 6.74 / 8 + 1 + 1.5, abs=1.0)  # states + ctx + acts


def ppo_config(*overrides: str) -> PPOConfig:
    base = ["policy.name_or_path=llama", "data.max_length=1024", "roles.gpus_per_worker=1"]
    return configtree.load(PPOConfig, EXAMPLES_DIR / "ppo.yaml", [*base, *overrides])


def test_70b_ppo_needs_zero3_over_many_gpus() -> None:
    shapes = {"llama": LLAMA_70B}
    small = ppo_config("roles.policy_workers=8", "roles.value_workers=8", "engine.zero_stage=3",
                       "value_engine.zero_stage=3")  # fmt: skip
    plan = plan_job(small, "ppo", 2, 8, 80 * GB, shapes=shapes)
    assert not plan.fits  # 2 x 8 GPUs: the frozen 70B reference alone is 138 GB per rank, and GPUs run out
    assert any(p.startswith("reference:") for p in plan.problems)
    assert any("needs" in p and "GPUs" in p for p in plan.problems)


def test_7b_ppo_with_colocated_roles_fits_one_node_of_h200s() -> None:
    shapes = {"llama": LLAMA_7B}
    config = ppo_config(
        "roles.policy_workers=4", "roles.reference_workers=4", "roles.value_workers=2",
        "roles.colocate=policy+reference", "engine.zero_stage=3", "value_engine.zero_stage=3",
        "engine.micro_batch_size=4", "policy.gradient_checkpointing=true", "rollout.num_replicas=2",
    )  # fmt: skip
    plan = plan_job(config, "ppo", 1, 8, 141 * GB, shapes=shapes)
    assert plan.fits, plan.problems
    assert plan.gpus_needed == 4 + 2 + 2  # policy+reference share 4 GPUs, value 2, two replicas 1 each
    too_few = plan_job(config, "ppo", 1, 4, 141 * GB, shapes=shapes)
    assert not too_few.fits and "needs 8 GPUs" in too_few.problems[0]


def test_the_cli_prints_the_plan_and_exits_2_when_it_does_not_fit() -> None:
    def plan(*args: str) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "rlhf.cli", "plan", "ppo", "--config", str(EXAMPLES_DIR / "ppo.yaml"), *args]
        return subprocess.run(command, capture_output=True, text=True, timeout=120)

    fits = plan("--nodes", "1", "--gpus-per-node", "4", "--gpu-memory", "80GB")
    assert fits.returncode == 0, fits.stderr
    assert "policy" in fits.stdout and "rollout replica" in fits.stdout and fits.stdout.rstrip().endswith("fits")
    refused = plan("--nodes", "1", "--gpus-per-node", "2", "--gpu-memory", "80GB")
    assert refused.returncode == 2 and "the job needs 4 GPUs, the cluster has 1 x 2 = 2" in refused.stdout
    bad = plan("--nodes", "1", "--gpus-per-node", "2", "--gpu-memory", "lots")
    assert bad.returncode == 2 and "--gpu-memory 'lots'" in bad.stderr and "Traceback" not in bad.stderr


def test_qlora_puts_a_70b_model_on_one_80gb_gpu_where_full_training_cannot() -> None:
    shape = LLAMA_70B
    lora_shape = ModelShape(**{**shape.__dict__, "lora_parameters": 16 * (8192 + 8192) * 2 * 80})  # r=16, q and v
    shapes = {"llama-70b": lora_shape}
    common = ["model.name_or_path=llama-70b", "data.max_length=1024", "engine.micro_batch_size=1",
              "model.gradient_checkpointing=true", "cluster.num_workers=1", "cluster.gpus_per_worker=1"]  # fmt: skip
    qlora = configtree.load(
        SFTConfig, EXAMPLES_DIR / "sft.yaml", [*common, "model.lora.enabled=true", "model.quantization=4bit"]
    )
    plan = plan_job(qlora, "sft", 1, 1, 80 * GB, shapes=shapes)
    assert plan.fits, plan.problems
    assert plan.roles[0].parts["frozen base weights"] / GB == pytest.approx(0.5 * 68.98, rel=0.01)  # 4-bit base
    full = configtree.load(SFTConfig, EXAMPLES_DIR / "sft.yaml", common)
    refused = plan_job(full, "sft", 1, 1, 80 * GB, shapes=shapes)
    assert not refused.fits and refused.roles[0].total / GB > 1000  # 16 bytes x 69B


PEAK_PROBE = """
import json, resource
import psutil, torch
from transformers import LlamaConfig, LlamaForCausalLM
torch.manual_seed(0)
h, layers, heads, vocab, s, b = 768, 6, 12, 1024, 256, 4
config = LlamaConfig(hidden_size=h, intermediate_size=2048, num_hidden_layers=layers, num_attention_heads=heads,
                     num_key_value_heads=heads, vocab_size=vocab, max_position_embeddings=s, attn_implementation="eager")
model = LlamaForCausalLM(config)
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
before = psutil.Process().memory_info().rss  # the weights are allocated by now
ids = torch.randint(0, vocab, (b, s))
for _ in range(2):
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=False)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"parameters": sum(p.numel() for p in model.parameters()), "growth": peak - before}))
"""


def test_the_estimate_is_close_to_the_measured_peak_of_a_training_step_on_cpu() -> None:
    """Peak resident memory of fp32 AdamW steps on a 50M Llama-shaped model, beyond its weights, vs the estimate."""
    import json

    from rlhf.plan import activation_bytes

    result = subprocess.run([sys.executable, "-c", PEAK_PROBE], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    shape = ModelShape(measured["parameters"], 768, 6, 12, 1024, intermediate_size=2048)
    states = model_state_bytes(shape.parameters, 0, 1, mixed_precision=False)
    estimate = states["gradients"] + states["optimizer"] + activation_bytes(shape, 4, 256, False, bytes_per_value=4)
    ratio = measured["growth"] / estimate
    print(f"\npeak growth beyond the weights: measured {measured['growth'] / GB:.2f} GB, estimated "
          f"{estimate / GB:.2f} GB (x{ratio:.2f})")  # fmt: skip
    assert 0.75 < ratio < 1.5  # CPU allocator caching and the step's temporaries come on top of the estimate


def test_a_reward_model_among_weighted_rewards_has_its_memory_planned(tmp_path: Path) -> None:
    """Before: the planner read the reward's kind from ``reward`` alone, so a reward model given as a term of
    ``rewards`` was left out of the plan (no reward role, its memory unplanned) while the run loads it on every
    reward rank. The kind of each term is now parsed once (``rlhf.rl.rewards.parse_reward``) for all its users."""
    model = tmp_path / "rm"
    model.mkdir()
    shapes = {"llama": LLAMA_7B, str(model.resolve()): LLAMA_7B}
    function = "rlhf.data.bundled:positive_word_reward"

    def reward_role(*overrides: str):
        plan = plan_job(ppo_config(*overrides), "ppo", 1, 8, 141 * GB, shapes=shapes)
        return next((role for role in plan.roles if role.role == "reward"), None)

    alone = reward_role(f"reward={model}")
    weighted = reward_role(f"rewards=[{{source: '{model}', weight: 1.0}}, {{source: '{function}', weight: 0.5}}]")
    assert alone is not None and weighted is not None
    assert weighted.total == alone.total
    assert reward_role(f"reward={function}") is None  # a function needs no GPU memory
    two = reward_role(f"rewards=[{{source: '{model}', name: a}}, {{source: '{model}', name: b}}]")
    assert two.parts["weights (a)"] == two.parts["weights (b)"] == alone.parts["weights"]
    assert two.parts["CUDA context"] == alone.parts["CUDA context"]  # one per rank, not one per model
