"""``rlhf synth``: synthetic instruction data and judged preference pairs.

* ``self_instruct`` (Wang et al. 2023): each proposal shows the model ``seeds_per_prompt``
  seed tasks drawn at random and asks for one more; the new instructions that pass the
  quality rules and are no near duplicate of a seed or of each other get a response from
  the same model -> prompt/completion rows.
* ``evol_instruct`` (Xu et al. 2023, WizardLM): each seed instruction is rewritten
  ``evol_rounds`` times, each round by one operation (deepen, concretise, add reasoning,
  broaden; taken in turn over the seeds); an evolution that comes back unchanged or fails
  the filters is dropped (the paper's elimination step); survivors get a response.
* ``preference``: ``sampling.n`` responses per prompt, scored by the judge; the best and
  the worst acceptable ones become chosen and rejected when their scores differ by more
  than ``min_margin`` -> prompt/chosen/rejected rows for ``rlhf dpo`` or ``rlhf rm``.

Every row records its provenance (the seeds or parent instruction, the operations, the
judge and the scores); ``manifest.json`` counts what each filter dropped, and for the
instruction modes ``instructions.jsonl`` lists every proposed instruction and response
with its fate (``kept`` or why it was dropped).
"""

from __future__ import annotations

import json
import random
from typing import Any

from rlhf.data.formats import Text
from rlhf.gen.common import Dropped
from rlhf.gen.config import SynthConfig

SELF_INSTRUCT_PROMPT = "Come up with a new task like these.\n\n{tasks}\nTask {next}:"
EVOL_PROMPTS = {
    "deepen": "Rewrite the instruction so that it asks for more depth and breadth, keeping it answerable.\n\n"
    "Instruction: {instruction}\nRewritten instruction:",
    "concretise": "Rewrite the instruction, replacing general concepts with more specific ones.\n\n"
    "Instruction: {instruction}\nRewritten instruction:",
    "add_reasoning": "Rewrite the instruction so that answering it needs several explicit steps of reasoning.\n\n"
    "Instruction: {instruction}\nRewritten instruction:",
    "broaden": "Write a new instruction in the same domain as this one, but about a rarer topic.\n\n"
    "Instruction: {instruction}\nNew instruction:",
}


def first_paragraph(text: str) -> str:
    """A generated instruction: the text up to its first blank line, stripped."""
    return text.strip().split("\n\n")[0].strip()


def run(config: SynthConfig) -> dict[str, Any]:
    """Make the synthetic dataset; return a summary (output, rows, what was dropped)."""
    from cluster import configtree
    from cluster.connect import connect
    from rlhf.gen.common import prepare_output, read_rows, release_output, write_dataset
    from rlhf.gen.judges import check_judge
    from rlhf.gen.sampler import Sampler
    from rlhf.jobs.rundir import atomic_open

    if config.mode == "preference":
        check_judge(config.judge)
    rows, source = read_rows(config.data)
    output_dir = prepare_output(config.output_dir)
    try:
        connect(config.cluster)
        dropped = Dropped()
        if config.mode == "preference":
            out = _preference(config, rows, source, dropped)
        else:
            from rlhf.gen.common import build_prompts

            seeds = [_plain(p) for p in build_prompts(rows, source, config.template)]
            log: list[dict[str, Any]] = []
            with Sampler(config.model, config.sampling) as sampler:
                make = _self_instruct if config.mode == "self_instruct" else _evol_instruct
                instructions = make(config, seeds, sampler, dropped, log)
                out = _respond(config, instructions, sampler, dropped, log)
            with atomic_open(output_dir / "instructions.jsonl") as handle:
                handle.writelines(json.dumps(entry, ensure_ascii=False) + "\n" for entry in log)
        summary = {
            "output": str(output_dir / "data.jsonl"),
            "mode": config.mode,
            "rows": len(out),
            "dropped": dict(dropped.reasons),
        }
        write_dataset(output_dir, out, {**summary, "config": configtree.to_dict(config)})
    finally:
        release_output(output_dir)
    return summary


def _plain(prompt: Text) -> str:
    from rlhf.gen.judges import request_text

    return request_text(prompt)


def _proposals(sampler: Any, questions: list[str], config: SynthConfig, description: str) -> list[str]:
    """One generated instruction per question (plain-text prompts)."""
    completions = sampler.generate(sampler.encode(questions), n=1, description=description)
    return [first_paragraph(c[0].text) for c in completions]


def _keep_new(
    config: SynthConfig, parents: list[str], candidates: list[tuple[str, dict]], dropped: Dropped, log: list[dict]
) -> list[tuple[str, dict]]:
    """Candidates that pass the quality rules and are not near duplicates of the parents or each other.

    Every candidate goes to ``log`` with its fate: ``kept`` or why it was dropped.
    """
    from rlhf.gen.common import deduplicate, quality_problem

    passing, fates = [], []
    for text, origin in candidates:
        problem = quality_problem(origin.get("parent", ""), text, config.filter)
        if problem is None and any(text.strip().lower() == p.strip().lower() for p in parents):
            problem = "unchanged or a copy of a seed"
        if problem:
            dropped.add(f"instruction {problem}")
            log.append({"instruction": text, **origin, "fate": problem})
        else:
            passing.append((text, origin))
    kept = deduplicate([*parents, *(text for text, _ in passing)], config.filter, Dropped())
    fresh = {i - len(parents) for i in kept if i >= len(parents)}
    for i, (text, origin) in enumerate(passing):
        if i not in fresh:
            dropped.add("instruction near duplicate")
        fates.append({"instruction": text, **origin, "fate": "kept" if i in fresh else "near duplicate"})
    log += fates
    return [passing[i] for i in sorted(fresh)]


def _self_instruct(
    config: SynthConfig, seeds: list[str], sampler: Any, dropped: Dropped, log: list[dict]
) -> list[tuple[str, dict]]:
    rng = random.Random(config.sampling.seed)
    questions, origins = [], []
    for _ in range(config.num_instructions):
        shown = rng.sample(range(len(seeds)), min(config.seeds_per_prompt, len(seeds)))
        tasks = "\n".join(f"Task {k + 1}: {seeds[i]}" for k, i in enumerate(shown))
        questions.append(SELF_INSTRUCT_PROMPT.format(tasks=tasks, next=len(shown) + 1))
        origins.append({"method": "self_instruct", "seed_rows": shown})
    proposals = _proposals(sampler, questions, config, "self-instruct")
    return _keep_new(config, seeds, list(zip(proposals, origins, strict=True)), dropped, log)


def _evol_instruct(
    config: SynthConfig, seeds: list[str], sampler: Any, dropped: Dropped, log: list[dict]
) -> list[tuple[str, dict]]:
    current: list[tuple[str, dict[str, Any]]] = [
        (seed, {"method": "evol_instruct", "seed_row": i, "operations": []}) for i, seed in enumerate(seeds)
    ]
    for round_index in range(config.evol_rounds):
        operations = [config.evolutions[(i + round_index) % len(config.evolutions)] for i in range(len(current))]
        questions = [
            EVOL_PROMPTS[op].format(instruction=text) for op, (text, _) in zip(operations, current, strict=True)
        ]
        evolved = _proposals(sampler, questions, config, f"evol-instruct round {round_index + 1}")
        candidates = [
            (new, {**origin, "parent": text, "operations": [*origin["operations"], op]})
            for new, op, (text, origin) in zip(evolved, operations, current, strict=True)
        ]
        current = _keep_new(config, seeds, candidates, dropped, log)
    return current


def _respond(
    config: SynthConfig, instructions: list[tuple[str, dict]], sampler: Any, dropped: Dropped, log: list[dict]
) -> list[dict[str, Any]]:
    """A response to each instruction (in the template's layout), filtered; the rows to write."""
    from rlhf.gen.common import answer, provenance, quality_problem

    layout_chat = config.template.layout == "chat"
    prompts: list[Text] = [[{"role": "user", "content": text}] if layout_chat else text for text, _ in instructions]
    if config.template.system and layout_chat:
        prompts = [[{"role": "system", "content": config.template.system}, *p] for p in prompts]
    completions = sampler.generate(sampler.encode(prompts), n=1, description="responses") if prompts else []
    out = []
    for prompt, (_, origin), samples in zip(prompts, instructions, completions, strict=True):
        response = samples[0].text
        problem = quality_problem(prompt, response, config.filter)
        log.append({"instruction": _plain(prompt), "response": response, "fate": f"response {problem or 'kept'}"})
        if problem:
            dropped.add(f"response {problem}")
            continue
        made = provenance("synth", model=config.model, **origin, seed=config.sampling.seed)
        out.append({"prompt": prompt, "completion": answer(prompt, response), "provenance": made})
    return out


def _preference(config: SynthConfig, rows: list[dict], source: Any, dropped: Dropped) -> list[dict[str, Any]]:
    from rlhf.gen.common import (
        answer,
        build_prompts,
        deduplicate,
        preference_pairs,
        prompt_text,
        provenance,
        sample_and_judge,
    )

    prompts = build_prompts(rows, source, config.template)
    kept = deduplicate([prompt_text(p) for p in prompts], config.filter, dropped)
    prompts = [prompts[i] for i in kept]
    samples, scores, describe = sample_and_judge(config.model, config.sampling, config.judge, prompts, source, kept)
    pairs = preference_pairs(prompts, samples, scores, config.filter, config.min_margin, dropped)
    return [
        {
            "prompt": prompts[p.prompt_index],
            "chosen": answer(prompts[p.prompt_index], p.chosen),
            "rejected": answer(prompts[p.prompt_index], p.rejected),
            "provenance": provenance(
                "synth",
                method="preference",
                model=config.model,
                source={"path": config.data.path, "split": config.data.split, "row": kept[p.prompt_index]},
                judge=describe,
                chosen_score=p.chosen_score,
                rejected_score=p.rejected_score,
                scores=p.scores,
                seed=config.sampling.seed,
            ),
        }
        for p in pairs
    ]
