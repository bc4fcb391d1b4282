"""``rlhf generate``: batch generation over a prompts dataset with vLLM replicas on the cluster.

rows -> prompts (template) -> ``sampling.n`` completions each -> ``data.jsonl`` as
prompt/completion rows (one per sample, with provenance) that ``rlhf sft`` reads as it is.
"""

from __future__ import annotations

import time
from typing import Any

from rlhf.gen.config import GenerateConfig


def run(config: GenerateConfig) -> dict[str, Any]:
    """Generate; return a summary (output path, rows, samples, tokens per second)."""
    from cluster import configtree
    from cluster.connect import connect
    from rlhf.gen.common import (
        answer,
        build_prompts,
        prepare_output,
        provenance,
        read_rows,
        release_output,
        write_dataset,
    )
    from rlhf.gen.sampler import Sampler

    rows, source = read_rows(config.data)
    prompts = build_prompts(rows, source, config.template)
    output_dir = prepare_output(config.output_dir)
    try:
        connect(config.cluster)
        with Sampler(config.model, config.sampling) as sampler:
            prompt_ids = sampler.encode(prompts, source)
            started = time.perf_counter()
            completions = sampler.generate(prompt_ids)
            seconds = time.perf_counter() - started
        s, t = config.sampling, config.template
        out = []
        for prompt, samples in zip(prompts, completions, strict=True):
            for c in samples:
                made = provenance(
                    "generate",
                    model=config.model,
                    source={"path": config.data.path, "split": config.data.split, "row": c.prompt_index},
                    template={"style": t.style, "layout": t.layout, "template": t.template},
                    sample=c.sample_index,
                    seed=s.seed,
                    temperature=s.temperature,
                    finish_reason=c.finish_reason,
                )
                out.append({"prompt": prompt, "completion": answer(prompt, c.text), "provenance": made})
        tokens = sum(c.num_tokens for samples in completions for c in samples)
        summary = {
            "output": str(output_dir / "data.jsonl"),
            "prompts": len(prompts),
            "rows": len(out),
            "generated_tokens": tokens,
            "seconds": round(seconds, 2),
            "tokens_per_second": round(tokens / max(seconds, 1e-9), 1),
        }
        write_dataset(output_dir, out, {**summary, "config": configtree.to_dict(config)})
    finally:
        release_output(output_dir)
    return summary
