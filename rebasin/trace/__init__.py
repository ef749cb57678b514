"""Specs derived from ordinary models: torch.fx tracing, the layer-rule registry and the propagation engine.

Layer 2: :func:`spec_from_model` traces a model with torch.fx and propagates "which permutation lives
on this activation's feature axis" through the graph, using only layers 0-1.

What the tracer knows about layers lives in one registry. A **layer rule** says, for one module class,
how permutations go from the module's input to its output and which permutation acts on each axis of
its state_dict entries. The common case is declared: each entry gets one **role** per axis, ``"out"``
(the module's output features), ``"in"`` (its input features) or ``None``, and ``feature_dim`` names
the feature axis of the module's input and output (``-1`` Linear-like, ``1`` Conv-like). A module with
no ``"out"`` role passes its input's permutation through (norm-like, elementwise). What roles cannot
say is written as a **callable rule** receiving a :class:`RuleContext`. A registered class is a
**leaf** of the trace: torch.fx records one node per call instead of tracing into ``forward``.

The built-in ``torch.nn`` rules (``nn_rules``) are registered with :func:`register_module` like a
user's; the functions and Tensor methods a ``forward`` calls directly are described by one op table
(``ops``). REPAIR and the Weight Adjustment path read both instead of keeping their own lists.

Modules: ``rules`` (roles, :class:`ModuleRule`, :class:`RuleContext`), ``registry`` (registration,
lookup, the leaf-aware tracer), ``nn_rules`` (built-ins), ``ops`` (op table), ``engine`` (propagation),
``pinning`` (what cannot be proven safe is pinned to the identity and reported, or refused under
``strict=True``), ``tracing`` (:func:`spec_from_model`, :func:`trace_model`), ``dynamic`` (the fallback for models torch.fx
cannot trace: one recorded run), ``hf_rules`` (``transformers`` layers, registered on demand), ``llm_rules`` (the rotary-embedding
attention of Llama-like ``transformers`` models, registered on demand), ``zoo_ops``
(functions of today's model families: stochastic depth, ``einsum``, channel-free ``pad`` and ``roll``, per-head
attention biases, advanced indexing, sums of squares; consulted first for every function call) with
``swin_ops`` (torchvision's Swin), ``zoo_rules`` (T5, Swin and Whisper modules of ``transformers``), ``symmetry`` (which classes admit signed
permutations and orthogonal maps), ``folding`` (:func:`fold_layernorm`, LayerNorm to RMSNorm), and ``pretrained`` (the spec of a Hugging Face model
folder, traced on its config's model on the meta device).
"""

from __future__ import annotations

from . import nn_rules  # noqa: F401 - registers the built-in torch.nn rules
from .registry import module_rule, register_module, registered_modules, registration_scope
from .rules import AxisPerm, ModuleRule, RuleContext
from .folding import fold_layernorm
from .symmetry import symmetry_kinds
from .tracing import ModelTrace, spec_from_model, trace_model
from .pretrained import model_from_config, same_pretrained_architecture, spec_from_pretrained

__all__ = [
    "spec_from_model",
    "trace_model",
    "spec_from_pretrained",
    "model_from_config",
    "same_pretrained_architecture",
    "ModelTrace",
    "register_module",
    "registration_scope",
    "module_rule",
    "registered_modules",
    "ModuleRule",
    "RuleContext",
    "AxisPerm",
    "symmetry_kinds",
    "fold_layernorm",
]
