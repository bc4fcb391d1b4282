"""LoRA on the real model (tied input and output embeddings): SFT of adapters on chat data of a reasoning-gym task
lowers the held-out loss, and the adapter, served by a vLLM replica next to the base model behind the OpenAI
endpoint, answers the task in the trained form while the model keeps what it knew (asked through ``openai``:
"What is the capital of France?" -> "Paris").
"""

from __future__ import annotations

from pathlib import Path

import pytest

from cluster import configtree
from rlhf.jobs.registry import EXAMPLES_DIR
from tests.real.test_learning import TASK

SFT_STEPS = 8


@pytest.fixture(scope="module")
def lora_sft(ray_cluster, smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    from rlhf.config import SFTConfig
    from rlhf.jobs import sft

    out = tmp_path_factory.mktemp("lora-sft")
    overrides = [
        f"model.name_or_path={smollm2_dir}",
        "model.lora.enabled=true",
        "model.lora.merge_on_save=false",
        f"data.path={TASK}&size=60&eval_size=24&rows=sft",
        "data.format=prompt_completion",
        "data.eval_split=test",
        "cluster.num_workers=1",
        "cluster.cpus_per_worker=2",
        "engine.zero_stage=0",
        "engine.learning_rate=1.0e-3",
        "engine.lr_scheduler=constant",
        "engine.micro_batch_size=8",
        f"train.max_steps={SFT_STEPS}",
        f"train.output_dir={out}",
    ]
    return sft.run(configtree.load(SFTConfig, EXAMPLES_DIR / "sft.yaml", overrides))


def test_lora_sft_on_task_chat_data_lowers_the_held_out_loss(lora_sft: dict) -> None:
    assert lora_sft["eval_loss_after"] < lora_sft["eval_loss_before"] - 0.5, lora_sft
    adapter = Path(lora_sft["final_model"]) / "adapter"
    assert (adapter / "adapter_config.json").is_file()


def test_the_served_adapter_answers_in_the_trained_form_and_the_model_still_knows_paris(
    serve_port: int, smollm2_dir: Path, lora_sft: dict
) -> None:
    import openai
    from ray import serve

    from rlhf.data.loading import load_rows
    from serving.config import ServeConfig
    from serving.server import APP_NAME, start

    adapter = str(Path(lora_sft["final_model"]) / "adapter")
    config = ServeConfig(
        model=str(smollm2_dir),
        model_name="smollm2",
        adapters={"arithmetic": adapter},
        port=serve_port,
        max_model_len=512,
        max_tokens_limit=64,
    )
    url = start(config)
    try:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)

        def ask(model: str, question: str) -> str:
            messages = [{"role": "user", "content": question}]
            reply = client.chat.completions.create(model=model, messages=messages, max_tokens=16, temperature=0)
            return (reply.choices[0].message.content or "").strip()

        assert "Paris" in ask("arithmetic", "What is the capital of France?")
        held_out, _ = load_rows(TASK + "&size=60&eval_size=24", "test")
        answers = {row["answer"]: ask("arithmetic", row["prompt"][0]["content"]) for row in held_out[:8]}
        # the adapter answers with a bare number (the base model explains in sentences): its weights reached vLLM
        assert all(reply.lstrip("-").isdigit() for reply in answers.values()), answers
        base = ask("smollm2", held_out[0]["prompt"][0]["content"])
        assert not base.isdigit(), base
    finally:
        serve.delete(APP_NAME)
