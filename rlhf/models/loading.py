"""Load causal LMs and scalar-head models (reward, value), wrap them with LoRA/QLoRA, save them.

Every model a job trains or serves comes through here, so the rules hold everywhere:
``trust_remote_code`` only when the config says so; trainable weights in float32 (the
training engine casts to bf16 where the device supports it and keeps fp32 master
weights); saved models in Hugging Face format with safetensors.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from cluster.errors import UserError
from rlhf.models.config import LoraConfig, ModelConfig

if TYPE_CHECKING:
    import torch
    from peft import PeftModel
    from transformers import BitsAndBytesConfig, PreTrainedModel, PreTrainedTokenizerBase
    from transformers.models.auto.auto_factory import _BaseAutoModelClass

log = logging.getLogger(__name__)

TINY = "tiny"


class ModelLoadError(UserError, ValueError):
    """A model or tokenizer that cannot be loaded; the message names what and why."""


def cache_dir() -> Path:
    """Where rlhf keeps what it builds on first use (``RLHF_CACHE``, default ``~/.cache/rlhf``)."""
    return Path(os.environ.get("RLHF_CACHE", Path.home() / ".cache" / "rlhf"))


def resolve(name_or_path: str) -> str:
    """The directory or hub id that ``name_or_path`` stands for.

    ``tiny`` is the locally built tiny model (built once); a ``.gguf`` file or the short name of
    a packaged one (``smollm2-135m-instruct``) is its Hugging Face conversion (converted once,
    :mod:`rlhf.models.gguf`); anything else is returned as is.
    """
    from rlhf.models import gguf

    if gguf.is_gguf(name_or_path):
        try:
            return str(gguf.converted(name_or_path, cache_dir()))
        except gguf.GGUFError as exc:
            raise ModelLoadError(str(exc)) from None
    if name_or_path != TINY:
        return name_or_path
    path = cache_dir() / "tiny-model"
    if not (path / "config.json").is_file():
        from filelock import FileLock

        from rlhf.models.init_model import init_model

        path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(path) + ".lock"):
            if not (path / "config.json").is_file():
                log.info("building the tiny local model in %s", path)
                tmp = path.with_name(f"tiny-model.tmp{os.getpid()}")
                init_model(tmp)
                tmp.rename(path)
    return str(path)


def _explain(kind: str, name: str, exc: Exception) -> ModelLoadError:
    path = Path(name).expanduser()
    if name.startswith(("/", ".", "~")) and not path.exists():
        return ModelLoadError(f"model directory {name} does not exist (needed to load the {kind})")
    where = "local directory" if path.exists() else "hub id (no local directory of that name)"
    return ModelLoadError(f"cannot load {kind} from {name!r} ({where}): {type(exc).__name__}: {exc}")


def load_tokenizer(config: ModelConfig) -> PreTrainedTokenizerBase:
    """The tokenizer of ``config`` with a pad token (the eos token when the tokenizer has none)."""
    from transformers import AutoTokenizer

    name = resolve(config.tokenizer or config.name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=config.trust_remote_code)
    except Exception as exc:
        raise _explain("tokenizer", name, exc) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _quantization(config: ModelConfig, compute_dtype: torch.dtype) -> BitsAndBytesConfig | None:
    if config.quantization == "none":
        return None
    from transformers import BitsAndBytesConfig

    if config.quantization == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype,
        )
    return BitsAndBytesConfig(load_in_8bit=True)


def _load(auto_cls: type[_BaseAutoModelClass], config: ModelConfig, trainable: bool, **kwargs: Any) -> PreTrainedModel:
    import torch

    name = resolve(config.name_or_path)
    dtype = torch.float32 if trainable else torch.bfloat16 if torch.cuda.is_available() else torch.float32
    quantization = _quantization(config, torch.bfloat16 if torch.cuda.is_available() else torch.float32)
    try:
        model = auto_cls.from_pretrained(
            name,
            dtype=dtype,
            trust_remote_code=config.trust_remote_code,
            attn_implementation=config.attn_implementation,
            quantization_config=quantization,
            **kwargs,
        )
    except Exception as exc:
        raise _explain("model", name, exc) from None
    if not trainable:
        model.requires_grad_(False)
        return model.eval()
    if quantization is not None:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=config.gradient_checkpointing)
    elif config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if config.lora.enabled:
        task = "SEQ_CLS" if kwargs.get("num_labels") else "CAUSAL_LM"
        model = apply_lora(model, config.lora, task)
        if config.gradient_checkpointing:
            model.enable_input_require_grads()
    return model


def load_causal_lm(config: ModelConfig, trainable: bool = True) -> PreTrainedModel:
    """A causal LM from ``config``: trainable (fp32, LoRA/QLoRA as configured) or frozen (eval, no grads)."""
    from transformers import AutoModelForCausalLM

    return _load(AutoModelForCausalLM, config, trainable)


def load_scalar_model(config: ModelConfig, trainable: bool = True) -> PreTrainedModel:
    """A model with a scalar head (reward or value model) from ``config``.

    A causal-LM checkpoint gets a freshly initialised ``score`` head; the score of a
    sequence is read at its last non-pad token (transformers' sequence classification).
    """
    from transformers import AutoModelForSequenceClassification

    tokenizer = load_tokenizer(config)
    model = _load(
        AutoModelForSequenceClassification, config, trainable, num_labels=1, pad_token_id=tokenizer.pad_token_id
    )
    return model


DROPOUT_ATTRIBUTES = ("dropout", "attention_dropout", "attn_dropout", "dropout_p", "activation_dropout")
"""Float attributes through which attention modules apply dropout themselves (Llama/Qwen: ``attention_dropout``;
OPT/BART: ``dropout``), besides ``nn.Dropout`` modules (GPT-2, peft's LoRA dropout)."""


def disable_dropout(model: torch.nn.Module) -> int:
    """Set every dropout probability of ``model`` to 0 (its saved config is left as it is); return how many.

    ``eval()`` would also stop dropout, but it stops gradient checkpointing too, so the training mode stays
    and the probabilities go to 0 instead: ``nn.Dropout`` modules and the float attributes of
    :data:`DROPOUT_ATTRIBUTES` that attention modules read when training.
    """
    import torch

    changed = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout) and module.p > 0:
            module.p = 0.0
            changed += 1
        for name in DROPOUT_ATTRIBUTES:
            value = getattr(module, name, None)
            if isinstance(value, float) and not isinstance(value, bool) and value > 0:
                setattr(module, name, 0.0)
                changed += 1
    return changed


def apply_lora(model: PreTrainedModel, lora: LoraConfig, task_type: str = "CAUSAL_LM") -> PreTrainedModel:
    """Wrap ``model`` with peft LoRA adapters; a scalar head stays fully trainable."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    targets = lora.target_modules[0] if lora.target_modules == ("all-linear",) else list(lora.target_modules)
    peft_config = PeftLoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=targets,
        task_type=task_type,
    )
    # a PeftModel forwards every other attribute to the PreTrainedModel it wraps, and is handed on as one
    return cast("PreTrainedModel", get_peft_model(model, peft_config))


def is_peft(model: object) -> bool:
    """Whether ``model`` is a peft model (adapters on a base)."""
    from peft import PeftModel

    return isinstance(model, PeftModel)


def save_pretrained(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    output_dir: str | Path,
    state_dict: dict | None = None,
    base_config: ModelConfig | None = None,
    merge_lora: bool = True,
) -> Path:
    """Write ``model`` and ``tokenizer`` to ``output_dir`` in Hugging Face format (safetensors).

    A peft model writes its adapter to ``output_dir/adapter``; with ``merge_lora`` the
    base model is reloaded unquantized (``base_config``), the adapter merged into it and
    the result written to ``output_dir`` itself, so transformers and vLLM load
    ``output_dir`` as a plain model and can also serve ``output_dir/adapter`` as LoRA.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if not is_peft(model):
        model.save_pretrained(output_dir, state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(output_dir)
        return output_dir
    adapter_dir = output_dir / "adapter"
    model.save_pretrained(adapter_dir, state_dict=state_dict, safe_serialization=True)
    tokenizer.save_pretrained(adapter_dir)
    if merge_lora:
        if base_config is None:
            raise ValueError("merging LoRA adapters needs the base model's config (base_config)")
        merged = merge_adapter(
            base_config, adapter_dir, scalar_head=cast("PeftModel", model).peft_config["default"].task_type == "SEQ_CLS"
        )
        merged.save_pretrained(output_dir, safe_serialization=True)
        tokenizer.save_pretrained(output_dir)
    return output_dir


def merge_adapter(base_config: ModelConfig, adapter_dir: str | Path, scalar_head: bool = False) -> PreTrainedModel:
    """The base model of ``base_config``, loaded unquantized in fp32, with the adapter merged in."""
    from dataclasses import replace

    from peft import PeftModel

    plain = replace(
        base_config, quantization="none", lora=replace(base_config.lora, enabled=False), gradient_checkpointing=False
    )
    base = load_scalar_model(plain, trainable=True) if scalar_head else load_causal_lm(plain, trainable=True)
    return PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
