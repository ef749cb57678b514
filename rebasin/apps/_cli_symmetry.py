"""``--symmetry`` of ``rebasin align`` and ``rebasin merge``: which transforms the command may use, checked first.

``permutation`` (the default) leaves ``--method`` alone. ``signed`` and ``orthogonal`` run the transform
matcher (``align(..., method="transform_matching", symmetry=...)``) and are refused, with the reason, before
any alignment runs when they cannot be done:

* a model in which no class admits the symmetry (LayerNorms, elementwise functions on the stream): the
  message names the module path and the op (:func:`rebasin.trace.symmetry_kinds`);
* ``orthogonal`` on a model with LayerNorms: they must become RMSNorms first (:func:`rebasin.trace.fold_layernorm`),
  another architecture, which the checkpoint written could not be loaded into;
* ``align --symmetry orthogonal`` on a model whose stream norms have scales: folding them into their readers
  (:func:`rebasin.fold_rmsnorm`) changes model A's parametrisation too, so B's output would not pair with A's
  file (``merge`` writes one self-contained model, so it may fold).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from .._errors import RebasinError
from ..matching.symmetric import SYMMETRIES, fold_for_rotations, symmetry_use
from ..spec.core import PermutationSpec
from ..trace.symmetry import symmetry_kinds

__all__ = ["SYMMETRY_HELP", "SYMMETRIES", "symmetry_method"]

SYMMETRY_HELP = (
    "the transforms to align by (default permutation: --method as given).\n"
    "signed: signed permutations of every class that admits them (RMSNorm-type\n"
    "norms, no elementwise function on the stream; e.g. Llama), permutations elsewhere;\n"
    "orthogonal: orthogonal maps there (models with LayerNorms are refused: folding\n"
    "them changes the architecture). Both run --method transform_matching")


def symmetry_method(symmetry: str, method: str, models: Sequence[nn.Module], example: Any, spec: PermutationSpec,
                    *, writes_pair: bool) -> tuple[str, dict[str, Any]]:
    """``(method, options)`` for ``--symmetry``; a :class:`RebasinError` (exit 2) for what cannot be done.

    ``writes_pair``: the command writes B to be paired with A's file (``align``), so no model may be refolded.
    """
    if symmetry == "permutation":
        return method, {}
    if symmetry not in SYMMETRIES:
        raise RebasinError(f"--symmetry must be one of {', '.join(SYMMETRIES)}, got {symmetry!r}")
    if method not in ("weight_matching", "transform_matching"):
        raise RebasinError(f"--symmetry {symmetry} runs --method transform_matching (weight matching with {symmetry} "
                           f"maps); --method {method} finds permutations only")
    model = models[0]
    if symmetry == "orthogonal":
        norms = [n for n, m in model.named_modules() if isinstance(m, nn.LayerNorm)]
        if norms:
            raise RebasinError(
                f"--symmetry orthogonal: {type(model).__name__} has LayerNorms ({', '.join(norms[:3])}"
                f"{', ...' if len(norms) > 3 else ''}); an orthogonal map needs them rewritten into RMSNorms "
                "(rebasin.trace.fold_layernorm), another architecture that --model cannot load. Use the Python API "
                "(rebasin.align(..., method='transform_matching', symmetry='orthogonal'), then Alignment.model_a)")
        if writes_pair and any(fold_for_rotations(m, example) is not m for m in models):
            raise RebasinError(
                "--symmetry orthogonal: the stream's RMSNorm scales are not all ones; an orthogonal map needs them "
                "folded into the weights that read them (rebasin.fold_rmsnorm), which changes model A's weights too, "
                "so B's output would not pair with A's file. Fold and save both models first, or use --symmetry "
                "signed")
    symmetry_use(spec, symmetry_kinds(model, example), symmetry)  # refuses, naming the module and the op
    return "transform_matching", {"symmetry": symmetry}
