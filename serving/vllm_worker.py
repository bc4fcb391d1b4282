"""What the replicas' vLLM workers run besides vLLM itself: the ``worker_extension_cls`` of every deployment.

**Tied output layers after a weight reload.** A model whose output layer is its input embeddings
(``tie_word_embeddings``: SmolLM2, Qwen2.5, Llama-3.2, Gemma) is loaded by vLLM with one weight
shared by both layers. vLLM's CPU backend prepares a linear layer's weight for its GEMM kernels once
it is loaded (``process_weights_after_loading`` packs it for oneDNN); the output layer's copy is
made when the model is first loaded. An in-place reload (``reload_weights`` from files, or a weight
transfer, both layer by layer) loads the shared weight through the embeddings alone, so the output
layer is never processed again and keeps computing logits with the old weights, while the input
embeddings use the new ones. :func:`refresh_tied_output_layers` processes such output layers again;
both weight-sync paths call it after every reload. (On GPUs the unquantized output layer reads the
shared weight directly; the call then changes nothing.)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner


def refresh_tied_output_layers(model: Any) -> int:
    """Process again every output layer that shares its weight with the input embeddings; how many there were."""
    from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding

    modules = list(model.modules())
    embeddings = {
        id(m.weight) for m in modules if isinstance(m, VocabParallelEmbedding) and not isinstance(m, ParallelLMHead)
    }
    heads = [m for m in modules if isinstance(m, ParallelLMHead) and id(getattr(m, "weight", None)) in embeddings]
    for head in heads:
        head.quant_method.process_weights_after_loading(head)
    return len(heads)


class WorkerExtension:
    """Methods added to every vLLM worker of the replicas, called through ``collective_rpc`` by name."""

    if TYPE_CHECKING:
        model_runner: GPUModelRunner  # set by the vLLM worker this class is mixed into

    def refresh_tied_weights(self) -> int:
        """:func:`refresh_tied_output_layers` on this worker's model."""
        return refresh_tied_output_layers(self.model_runner.get_model())

    def torch_threads(self) -> int:
        """The threads torch computes on in this worker (on CPUs, the engine's: ``engine_threads``)."""
        import torch

        return torch.get_num_threads()


QUALNAME = f"{__name__}.{WorkerExtension.__name__}"
"""What ``worker_extension_cls`` is set to."""
