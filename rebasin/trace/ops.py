"""The op table of the trace package: what every torch function and Tensor method does to a feature axis.

Modules are described by the layer-rule registry (:mod:`rebasin.trace.registry`); the functions and
Tensor methods a ``forward`` calls directly (``torch.add``, ``F.relu``, ``x.view(...)``) are described
here, as sets grouped by what they do to a permuted axis. The propagation engine
(:mod:`rebasin.trace.engine`) reads these sets for every ``call_function`` / ``call_method`` node, and
the Weight Adjustment path (:mod:`rebasin.paths.weight_adjusted`) reads the same sets to decide which
parameter-free ops may sit between its Linear layers, so there is one table of op knowledge.

* ``ELEMENTWISE_FN`` / ``ELEMENTWISE_METHOD``: applied entry by entry (with broadcasting), so a
  permutation of any axis passes through; two permuted operands must carry one permutation.
  ``DROPOUT_FN`` is the dropout subset (the identity in eval mode).
* ``IDENTITY_METHOD``: return their input unchanged up to dtype/device/copy.
* ``QUERY_METHOD``: return metadata (sizes, device), not a tensor.
* ``RESHAPE_FN`` / ``RESHAPE_METHOD``: views and reshapes, followed axis by axis.
* ``REORDER_FN`` / ``REORDER_METHOD``: axis reorderings (permute, transpose, ...).
* ``REDUCE_NAMES`` / ``REDUCE_FN``: symmetric reductions over whole axes; invariant to a permutation of a
  reduced axis (which carries nothing afterwards).
* ``SPATIAL_FN``: pooling over the last ``d`` axes (``{function: d}``).
* ``UNSUPPORTED_HINT``: a readable description of ops that mix a permuted axis with others.
* ``INPLACE_FN``: functions that write into their first argument.

"""

from __future__ import annotations

import operator
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F

__all__ = [
    "ELEMENTWISE_FN",
    "ELEMENTWISE_METHOD",
    "DROPOUT_FN",
    "IDENTITY_METHOD",
    "QUERY_METHOD",
    "RESHAPE_FN",
    "RESHAPE_METHOD",
    "REORDER_FN",
    "REORDER_METHOD",
    "REDUCE_NAMES",
    "REDUCE_FN",
    "SPATIAL_FN",
    "UNSUPPORTED_HINT",
    "INPLACE_FN",
]


def _fns(owner: Any, names: Iterable[str]) -> set[Any]:
    return {getattr(owner, n) for n in names if hasattr(owner, n)}


DROPOUT_FN = _fns(F, ["dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout", "feature_alpha_dropout"])
ELEMENTWISE_FN = _fns(operator, ["add", "sub", "mul", "truediv", "floordiv", "pow", "neg", "pos", "abs",
                                  "iadd", "isub", "imul", "itruediv", "gt", "lt", "ge", "le", "eq", "ne"]) | _fns(torch, [
    "add", "sub", "mul", "div", "true_divide", "rsub", "maximum", "minimum", "where", "pow", "relu", "relu_",
    "tanh", "tanh_", "sigmoid", "sigmoid_", "exp", "log", "log1p", "expm1", "abs", "neg", "sqrt", "rsqrt",
    "square", "sin", "cos", "erf", "sign", "clamp", "clip", "softmax", "log_softmax", "addcmul", "lerp",
    "gt", "lt", "ge", "le", "eq", "ne",
]) | _fns(F, [
    "relu", "relu_", "relu6", "elu", "elu_", "selu", "celu", "gelu", "silu", "mish", "leaky_relu",
    "leaky_relu_", "hardtanh", "hardtanh_", "hardswish", "hardsigmoid", "logsigmoid", "softplus", "softsign",
    "tanhshrink", "tanh", "sigmoid", "softmax", "log_softmax", "softmin", "normalize", "threshold",
]) | DROPOUT_FN
ELEMENTWISE_METHOD = {
    "add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "pow", "maximum", "minimum", "clamp",
    "clamp_", "clip", "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "exp", "log", "abs", "neg",
    "sqrt", "rsqrt", "square", "softmax", "log_softmax", "where", "masked_fill", "masked_fill_", "lerp",
    "gt", "lt", "ge", "le", "eq", "ne",
}
IDENTITY_METHOD = {"contiguous", "clone", "detach", "float", "double", "half", "bfloat16", "to", "type",
                   "type_as", "cuda", "cpu", "requires_grad_"}
QUERY_METHOD = {"size", "dim", "numel", "nelement", "ndimension", "get_device", "element_size"}
RESHAPE_FN = _fns(torch, ["flatten", "reshape", "squeeze", "unsqueeze", "unflatten"])
RESHAPE_METHOD = {"view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze", "view_as", "reshape_as"}
REORDER_FN = _fns(torch, ["permute", "transpose", "movedim", "moveaxis", "swapaxes", "swapdims", "t"])
REORDER_METHOD = {"permute", "transpose", "movedim", "moveaxis", "swapaxes", "swapdims", "t"}
REDUCE_NAMES = ["mean", "sum", "amax", "amin", "std", "var", "nansum", "nanmean", "logsumexp"]
REDUCE_FN = _fns(torch, REDUCE_NAMES)
SPATIAL_FN: dict[Any, int] = {
    getattr(F, f"{name}{d}d"): d
    for d in (1, 2, 3)
    for name in ("max_pool", "avg_pool", "adaptive_avg_pool", "adaptive_max_pool", "lp_pool")
    if hasattr(F, f"{name}{d}d")
}
UNSUPPORTED_HINT = {
    torch.cat: "concatenation (torch.cat) of permuted tensors",
    torch.stack: "stacking (torch.stack) of permuted tensors",
    torch.matmul: "a matrix product (matmul) of a permuted tensor",
    operator.matmul: "a matrix product (@) of a permuted tensor",
    torch.bmm: "a batched matrix product (bmm) of a permuted tensor",
    torch.einsum: "an einsum of a permuted tensor",
    F.scaled_dot_product_attention: "attention (scaled_dot_product_attention) over a permuted tensor",
}
INPLACE_FN = _fns(operator, ["iadd", "isub", "imul", "itruediv"]) | _fns(torch, ["relu_", "sigmoid_", "tanh_"]) | _fns(
    F, ["relu_", "elu_", "leaky_relu_", "hardtanh_"])

