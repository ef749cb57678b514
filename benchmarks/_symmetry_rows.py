"""Shared helper of the benchmarks that compare symmetry kinds and matchers on a pair of models (vit_mnist, char_gpt).

:class:`SymmetryPair` holds two trained models of one architecture, an example input and a few batches of
training data, and derives (once each) the spec and symmetry kinds of the models as they are and of their
*folded* form: LayerNorms turned into scale-free RMSNorms (:func:`rebasin.trace.fold_layernorm`) or RMSNorm
scales folded into the readers (:func:`rebasin.spec.fold_rmsnorm`) — the same functions, whose residual
stream then admits orthogonal maps. :data:`RECIPES` maps a row name to a recipe that aligns B to A and
returns an :class:`Aligned`: the module to run, and the path from A to the aligned B (linear, or REPAIRed).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch
from torch import Tensor, nn

from rebasin import LinearPath, PermutationSpec, RebasinError, RepairedPath, align, permute, weight_matching
from rebasin.matching import transform_matching
from rebasin.spec import apply_transforms, fold_rmsnorm, transform_matrix
from rebasin.trace import fold_layernorm, symmetry_kinds, trace_model

__all__ = ["Aligned", "Form", "SymmetryPair", "RECIPES", "run_rows", "without"]

State = dict[str, Tensor]


def without(spec: PermutationSpec, fixed: set[str]) -> PermutationSpec:
    """The spec with the permutations in ``fixed`` left as the identity."""
    axes = {k: tuple(None if p in fixed else p for p in ax) for k, ax in spec.axes.items()}
    concat = {c: tuple((None if p in fixed else p, n) for p, n in ps) for c, ps in spec.concat.items()}
    used = {p for ax in axes.values() for p in ax if p is not None}
    concat = {c: ps for c, ps in concat.items() if c in used and any(p is not None for p, _ in ps)}
    axes = {k: tuple(p if p is None or p not in spec.concat or p in concat else None for p in ax) for k, ax in axes.items()}
    structure = {p: s for p, s in spec.structure.items() if p not in fixed}
    blocks = {ka: k for ka, k in spec.blocks.items() if axes[ka[0]][ka[1]] is not None}
    return PermutationSpec(axes, blocks=blocks, structure=structure, concat=concat)


@dataclass
class Form:
    """One form of the pair (as trained, or folded): the module, both states, the spec, the kinds, the stream."""

    model: nn.Module
    model_b: nn.Module
    a: State
    b: State
    spec: PermutationSpec
    kinds: Any
    stream: str


@dataclass
class Aligned:
    """A row's result: the module to run and the path from A to the aligned B (``state_dict_at(t)``)."""

    model: nn.Module
    path: Any

    def state_at(self, t: float) -> State:
        return self.path.state_dict_at(t)


def _state(m: nn.Module) -> State:
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


class SymmetryPair:
    """Two trained models of one architecture; their forms and the alignments the rows need (cached)."""

    def __init__(self, a: nn.Module, b: nn.Module, example: Any, stats: list[Any], *, seed: int = 0,
                 device: str = "cpu", fit_batches: list[Any] | None = None, loss_fn: Any = None,
                 learn_lr: float = 1e-2) -> None:
        self.a, self.b, self.example, self.stats, self.seed, self.device = a.eval(), b.eval(), example, stats, seed, device
        self.fit_batches, self.loss_fn, self.learn_lr = fit_batches, loss_fn, learn_lr
        self.cache: dict[str, Any] = {}

    @cached_property
    def folded(self) -> Form:
        if any(isinstance(m, nn.LayerNorm) for m in self.a.modules()):
            fa, fb = fold_layernorm(self.a, self.example), fold_layernorm(self.b, self.example)
            tr = trace_model(fa, self.example)
            kinds = symmetry_kinds(fa, self.example, trace=tr)
            sa, sb = _state(fa), _state(fb)
        else:
            tr = trace_model(self.a, self.example)
            kinds = symmetry_kinds(self.a, self.example, trace=tr)
            fa, fb = self.a, self.b
            sa, sb = fold_rmsnorm(tr.spec, _state(self.a), kinds), fold_rmsnorm(tr.spec, _state(self.b), kinds)
        free = [p for p, k in kinds.kinds.items() if k == "orthogonal"]
        if len(free) != 1:
            raise RebasinError(f"expected one class admitting orthogonal maps (the residual stream), found {free}")
        return Form(fa, fb, sa, sb, tr.spec, kinds, free[0])

    @cached_property
    def plain(self) -> Form:
        tr = trace_model(self.a, self.example)
        kinds = symmetry_kinds(self.a, self.example, trace=tr)
        f = self.folded
        # the stream of the unfolded spec: the class on an axis both specs share with the folded stream
        key, axis = next((k, ax) for k, ax in f.spec.perm_to_axes[f.stream] if k in tr.spec.axes)
        return Form(self.a, self.b, _state(self.a), _state(self.b), tr.spec, kinds, tr.spec.axes[key][axis])

    def form(self, folded: bool) -> Form:
        return self.folded if folded else self.plain

    def model_with(self, f: Form, state: Mapping[str, Tensor]) -> nn.Module:
        """A copy of the form's B module holding ``state``."""
        m = copy.deepcopy(f.model_b)
        m.load_state_dict(dict(state))
        return m.eval()

    # ------------------------------------------------------------------ alignments (states of B)

    def perms(self, folded: bool) -> dict[str, Tensor]:
        key = f"perms_{folded}"
        if key not in self.cache:
            f = self.form(folded)
            self.cache[key] = weight_matching(f.spec, f.a, f.b, seed=self.seed)
        return self.cache[key]

    def wm(self, folded: bool) -> State:
        f = self.form(folded)
        return permute(f.spec, self.perms(folded), f.b)

    def transform(self, folded: bool, kind: str, start: str = "weight_matching") -> State:
        """B with its stream matched by ``kind`` (signed or orthogonal) and permutations elsewhere.

        ``transform_matching`` with ``start``: by default (``"weight_matching"``) it starts from weight
        matching's permutations of every class and never ends below their objective; ``"identity"`` is the
        cold start it used before.
        """
        key = f"transform_{folded}_{kind}_{start}"
        if key not in self.cache:
            f = self.form(folded)
            t = transform_matching(f.spec, f.a, f.b, kinds=f.kinds, use={f.stream: kind}, start=start, seed=self.seed)
            stream = transform_matrix(t[f.stream], int(f.spec.sizes[f.stream]))
            self.cache[key] = (stream, apply_transforms(f.spec, t, f.b, kinds=f.kinds))
        return self.cache[key][1]

    def am(self, folded: bool) -> State:
        f = self.form(folded)
        return align(f.model, f.model_b, spec=f.spec, method="activation_matching", loader=self.stats,
                     seed=self.seed, device=self.device).state_b

    def ortho_then_am(self) -> State:
        """The orthogonal stream of :meth:`transform`, then activation matching of every other class."""
        f = self.folded
        self.transform(True, "orthogonal")
        stream = self.cache["transform_True_orthogonal_weight_matching"][0]  # B's stream map
        rotated = apply_transforms(f.spec, {f.stream: stream}, f.b, kinds=f.kinds)
        return align(f.model, self.model_with(f, rotated), spec=without(f.spec, {f.stream}),
                     method="activation_matching", loader=self.stats, seed=self.seed, device=self.device).state_b

    def learned(self) -> State:
        """The orthogonal stream of :meth:`transform` refined on the path loss (``learn_transforms``, one pass
        over ``fit_batches``, Adam ``learn_lr``, loss at one uniform t per step), permutations kept."""
        if "learned" not in self.cache:
            from rebasin.matching import learn_transforms

            f = self.folded
            if self.fit_batches is None:
                raise RebasinError("no fit_batches for the learned transforms")
            start = self.transform(True, "orthogonal")
            res = learn_transforms(f.model, f.model_b, self.fit_batches, spec=f.spec, kinds=f.kinds, learn=[f.stream],
                                   init={f.stream: torch.eye(int(f.spec.sizes[f.stream]))}, loss_fn=self.loss_fn,
                                   lr=self.learn_lr, state_a=f.a, state_b=start, seed=self.seed)
            self.cache["learned"] = res.state_b
        return self.cache["learned"]

    # ------------------------------------------------------------------ paths

    def linear(self, folded: bool, state_b: State) -> Aligned:
        f = self.form(folded)
        return Aligned(f.model, LinearPath(f.a, state_b))

    def repaired(self, folded: bool, state_b: State) -> Aligned:
        f = self.form(folded)
        return Aligned(f.model, RepairedPath(f.model, f.a, state_b, self.stats, spec=f.spec, device=self.device))


Recipe = Callable[[SymmetryPair], Aligned]

RECIPES: dict[str, tuple[str, Recipe]] = {
    "naive": ("naive (identity)", lambda p: p.linear(False, p.plain.b)),
    "wm": ("weight matching (permutations)", lambda p: p.linear(False, p.wm(False))),
    "signed": ("signed stream + permutations (transform_matching, default start: weight matching's permutations)",
               lambda p: p.linear(False, p.transform(False, "signed"))),
    "signed_cold": ("signed stream + permutations, started from the identity (start='identity')",
                    lambda p: p.linear(False, p.transform(False, "signed", start="identity"))),
    "folded_naive": ("folded, naive", lambda p: p.linear(True, p.folded.b)),
    "folded_wm": ("folded, weight matching (permutations)", lambda p: p.linear(True, p.wm(True))),
    "folded_signed": ("folded, signed stream + permutations (default start)", lambda p: p.linear(True, p.transform(True, "signed"))),
    "folded_ortho": ("folded, orthogonal stream + permutations (transform_matching, default start)",
                     lambda p: p.linear(True, p.transform(True, "orthogonal"))),
    "folded_ortho_cold": ("folded, orthogonal stream + permutations, started from the identity (start='identity')",
                          lambda p: p.linear(True, p.transform(True, "orthogonal", start="identity"))),
    "am": ("activation matching (permutations)", lambda p: p.linear(False, p.am(False))),
    "wm_repair": ("weight matching + REPAIR", lambda p: p.repaired(False, p.wm(False))),
    "am_repair": ("activation matching + REPAIR", lambda p: p.repaired(False, p.am(False))),
    "folded_ortho_repair": ("folded, orthogonal stream + permutations (WM) + REPAIR",
                            lambda p: p.repaired(True, p.transform(True, "orthogonal"))),
    "folded_learned": ("folded, learned orthogonal stream (from the folded_ortho row's stream) + permutations",
                       lambda p: p.linear(True, p.learned())),
    "folded_learned_repair": ("folded, learned orthogonal stream + permutations + REPAIR",
                              lambda p: p.repaired(True, p.learned())),
    "folded_ortho_am": ("folded, orthogonal stream (WM), then activation matching of the rest",
                        lambda p: p.linear(True, p.ortho_then_am())),
    "folded_ortho_am_repair": ("folded, orthogonal stream (WM), then activation matching of the rest, + REPAIR",
                               lambda p: p.repaired(True, p.ortho_then_am())),
}


def run_rows(pair: SymmetryPair, names: list[str], evaluate: Callable[[Aligned], tuple[Any, ...]],
             extra: Mapping[str, tuple[str, Recipe]] | None = None) -> list[list[Any]]:
    """``[label, *evaluate(aligned), align seconds]`` per row; a refused row gets ``n/a`` and the reason."""
    import time

    recipes = {**RECIPES, **(extra or {})}
    try:  # trace and fold both models before the clock starts: align times are the matchers' own
        _ = pair.plain
    except RebasinError as err:
        print(f"no folded form: {err}", flush=True)
    rows: list[list[Any]] = []
    for name in (n.strip() for n in names if n.strip()):
        label, recipe = recipes[name]
        start = time.perf_counter()
        try:
            aligned = recipe(pair)
        except RebasinError as err:
            rows.append([f"{label} — refused: {str(err).splitlines()[0][:100]}", "n/a", "n/a", "n/a"])
            print(rows[-1], flush=True)
            continue
        seconds = time.perf_counter() - start
        rows.append([label, *evaluate(aligned), seconds])
        print(rows[-1], flush=True)
    return rows
