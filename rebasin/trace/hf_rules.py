"""Layer rules for Hugging Face ``transformers`` modules, registered only when a traced model uses them.

``import rebasin`` never imports ``transformers``: :func:`~rebasin.trace.tracing.trace_model` calls
:func:`register` when the model holds a module defined in that library. Today this is GPT-2's
``Conv1D`` (``transformers.pytorch_utils.Conv1D``), a Linear layer whose weight is stored transposed,
``(in, out)``, and the T5 / Swin / Whisper modules of :mod:`rebasin.trace.zoo_rules`. Everything else in
BERT, ViT and GPT-2 (embeddings, LayerNorm, Linear, attention written with ``view`` / ``transpose`` /
``matmul`` / ``softmax`` / ``scaled_dot_product_attention``) is traced through by the op table and the
``torch.nn`` rules.
"""

from __future__ import annotations

from .registry import module_rule, register_module
from .zoo_rules import register_hf

__all__ = ["register"]


def register() -> None:
    """Register the ``transformers`` rules that are missing (idempotent; nothing without the library)."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - the library is optional
        return
    if module_rule(Conv1D) is None:
        register_module(Conv1D, params={"weight": ("in", "out"), "bias": ("out",)}, feature_dim=-1)
    register_hf()  # T5, Swin, Whisper (rebasin.trace.zoo_rules)
