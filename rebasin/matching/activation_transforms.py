r"""Activation matching beyond permutations: signed permutations and orthogonal maps from activations.

:func:`activation_transform_matching` collects the same statistics as :func:`rebasin.activation_matching`
(float64 moments of every class's activations, pooled over the graph nodes and the units recomputed inside
attention and transformer layers) and solves each class by the kind it is asked for:

* a permutation: linear assignment on the Pearson correlations (structured classes: heads and the units
  inside them, as :func:`rebasin.activation_matching` does);
* a signed permutation ``DP``: assignment on ``|corr|``, then ``signs[i] = sign(corr[i, perm[i]])`` — a unit of
  B that is the negative of A's unit correlates at ``-1``;
* an orthogonal map ``Q``: Procrustes on the *uncentred* cross moment ``M = Σ_t a_t b_tᵀ`` over all samples,
  ``Q = U Vᵀ`` from ``M = U Σ Vᵀ``, which maximises ``Σ_t ⟨a_t, Q b_t⟩``.

Why uncentred: the symmetry is linear, ``a = Q b``, not affine. The stream's mean over the samples is part of
what ``Q`` must map (``Q μ_b = μ_a``; a translation is not a symmetry, since RMSNorm divides by the raw
``rms(x)``), and the large common directions of a residual stream (the mean token) are exactly what the
interpolation must line up. Centring would fit only the fluctuations and leave the mean to chance, and
dividing by per-unit standard deviations (correlations) would break the rotation: ``Q`` then maps whitened
coordinates, not the stream. After :func:`rebasin.trace.fold_layernorm` the stream is mean-zero *along its
features* (``1ᵀ x = 0`` for every token), so ``M`` has the rank-deficient direction ``1`` (more generally,
any direction neither model's stream visits): the activations say nothing about where ``Q`` sends it. Those
directions are settled by the weights the class touches, with every other class already matched: with
``U₀``, ``V₀`` the singular vectors of ``M`` whose singular values are below ``1e-4`` of the largest, the
block ``U₀ R V₀ᵀ`` takes ``R`` = the polar factor of ``U₀ᵀ S V₀``, ``S`` the weight similarity of
:func:`rebasin.matching.transform_matching` (``Σ`` over every axis of the class of ``rows(A) rows(B')ᵀ``).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .._common import State, head, model_device, split_batch, to_device
from .._distributed import reducer
from .._errors import RebasinError
from ..spec.core import PermutationSpec
from ..spec.transforms import SignedPermutation, SymmetryKinds, Transform, apply_transforms, why_structured
from ..trace.symmetry import symmetry_kinds
from ._activation_stats import Moments, collect, solve_units
from .assignment import linear_assignment

__all__ = ["activation_transform_matching"]

_NULL_TOL = 1e-4  # singular values of M below this fraction of the largest: directions the activations do not visit


def _kinds_to_use(spec: PermutationSpec, kinds: SymmetryKinds, use: Mapping[str, str] | None) -> dict[str, str]:
    """``{class: kind}`` of the classes fitted as signed or orthogonal (validated)."""
    if use is None:
        use = {p: "signed" for p in spec.perms if kinds.admits(p, "signed") and why_structured(spec, p) is None}
    free: dict[str, str] = {}
    for p, kind in use.items():
        if p not in spec.perm_to_axes and p not in spec.perms:
            raise RebasinError(f"use names the unknown class {p!r}; the spec has {list(spec.perms)}")
        if not kinds.admits(p, kind):  # also checks the kind's name; names the module path and the op
            raise RebasinError(kinds.why_not(p, kind))
        if kind == "permutation":
            continue
        why = why_structured(spec, p)
        if why is not None:
            raise RebasinError(f"class {p!r} takes only permutations: {why}")
        free[p] = kind
    return free


def _check_scales(free: Mapping[str, str], kinds: SymmetryKinds, states: Mapping[str, State]) -> None:
    for p, kind in free.items():
        if kind != "orthogonal":
            continue
        for key in kinds.scales.get(p, ()):
            for name, st in states.items():
                if not bool((st[key] == 1).all()):
                    raise RebasinError(f"class {p!r} is to be matched by an orthogonal map, but {name}[{key!r}] is a "
                                       "norm scale that is not all ones; fold the scales of both models first "
                                       "(rebasin.fold_rmsnorm or rebasin.trace.fold_layernorm)")


def _signed(corr: Tensor, name: str) -> SignedPermutation:
    perm = linear_assignment(corr.abs(), name=name)
    picked = corr[torch.arange(perm.numel()), perm.to(corr.device)]
    return SignedPermutation(perm, torch.where(picked < 0, -1.0, 1.0).float().cpu())


def _weight_similarity(spec: PermutationSpec, perm: str, a: State, b: State, skip: set[str]) -> Tensor:
    n = int(spec.sizes[perm])  # type: ignore[index]  # validated states give the spec its sizes
    s = torch.zeros(n, n, dtype=torch.float64)
    for key, axis in spec.perm_to_axes[perm]:
        if key in skip or not a[key].is_floating_point():
            continue
        ra = torch.movedim(a[key].detach().double().cpu(), axis, 0).reshape(n, -1)
        rb = torch.movedim(b[key].detach().double().cpu(), axis, 0).reshape(n, -1)
        s += ra @ rb.T
    return s


def _orthogonal(m: Moments, complete: Any) -> Tensor:
    """Procrustes on the uncentred cross moment; the directions it leaves open completed by ``complete(U₀, V₀)``."""
    cross = m.raw_cross().cpu()
    u, sv, vh = torch.linalg.svd(cross)
    r = int((sv > _NULL_TOL * sv[0]).sum()) if sv.numel() and float(sv[0]) > 0 else 0
    q = u[:, :r] @ vh[:r]
    if r < cross.shape[0]:
        u0, v0 = u[:, r:], vh[r:].T
        su, _, svh = torch.linalg.svd(u0.T @ complete() @ v0)
        q = q + u0 @ (su @ svh) @ v0.T
    return q.float()


def activation_transform_matching(
    model_a: nn.Module,
    model_b: nn.Module,
    loader: Iterable[Any],
    *,
    kinds: SymmetryKinds | None = None,
    use: Mapping[str, str] | None = None,
    spec: PermutationSpec | None = None,
    example_input: Any = None,
    max_batches: int | None = None,
    device: Any = None,
    eps: float = 1e-8,
    state_a: State | None = None,
    state_b: State | None = None,
    sync: bool = True,
    group: Any = None,
) -> dict[str, Transform]:
    """Transforms of model B (permutations, signed permutations, orthogonal maps) matching its activations to A's.

    See the module documentation for the solvers and why the orthogonal fit uses uncentred moments.

    Parameters
    ----------
    model_a, model_b
        Two models of the same architecture; neither is modified.
    loader
        Iterable of batches ``(x, y, ...)`` or ``x``; both models see the same batches.
    kinds
        Which classes admit which kinds (:func:`rebasin.trace.symmetry_kinds`). Default: derived from
        ``model_a`` on ``example_input``.
    use
        ``{class: kind}``: ``"permutation"``, ``"signed"`` or ``"orthogonal"`` per class; classes not listed are
        permutations. Default: ``"signed"`` for every class that admits it. An orthogonal class needs its
        RMSNorm scales to be ones in both models (fold them first).
    spec, example_input, max_batches, device, eps, state_a, state_b, sync, group
        As for :func:`rebasin.activation_matching`. ``kinds`` must describe ``spec``'s classes.

    Returns
    -------
    dict
        ``{class: transform}`` for every class of the spec (a LongTensor, a :class:`~rebasin.spec.SignedPermutation`
        or an orthogonal float32 matrix): ``apply_transforms(spec, result, state_b, kinds=kinds)`` is close to
        ``state_a`` when B is A up to these symmetries.

    Raises
    ------
    RebasinError
        A kind a class does not admit (the message names the module path and the op that forbid it), a
        structured class (heads, groups) asked for more than a permutation, an unknown class, unfolded norm
        scales under an orthogonal class, and everything :func:`rebasin.activation_matching` refuses.

    Examples
    --------
    >>> from rebasin.spec import random_signed_permutation
    >>> from rebasin.trace import symmetry_kinds, trace_model
    >>> class Net(nn.Module):  # a linear stream read by an RMSNorm: signed permutations are symmetries
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.inp, self.norm, self.out = nn.Linear(3, 6), nn.RMSNorm(6), nn.Linear(6, 2)
    ...     def forward(self, x):
    ...         return self.out(self.norm(self.inp(x)))
    >>> _ = torch.manual_seed(0)
    >>> model_a, x = Net(), torch.randn(64, 3)
    >>> tr = trace_model(model_a, x[:2])
    >>> kinds = symmetry_kinds(model_a, x[:2], trace=tr)
    >>> plant = {"P0": random_signed_permutation(6, seed=1)}
    >>> model_b = Net()
    >>> _ = model_b.load_state_dict(apply_transforms(tr.spec, plant, model_a.state_dict(), kinds=kinds))
    >>> found = activation_transform_matching(model_a, model_b, [x], kinds=kinds)
    >>> back = apply_transforms(tr.spec, found, model_b.state_dict(), kinds=kinds)
    >>> all(torch.allclose(back[k], v) for k, v in model_a.state_dict().items())
    True
    """
    if kinds is not None and not isinstance(kinds, SymmetryKinds):
        raise RebasinError(f"kinds must be a SymmetryKinds (rebasin.trace.symmetry_kinds), got {type(kinds).__name__}")
    if kinds is None:
        if example_input is None:
            it = iter(loader)
            first = next(it, None)
            if first is None:
                raise RebasinError("the loader yielded no batch; activation statistics need data")
            if it is loader:  # a one-shot iterator: put the first batch back
                loader = itertools.chain([first], it)
            example_input = head(split_batch(first)[0])
        kinds = symmetry_kinds(model_a, to_device(example_input, model_device(model_a)))
    red = reducer(sync, group)
    spec, moments, _ = collect(
        model_a, model_b, loader, spec=spec, example_input=example_input, max_batches=max_batches, device=device,
        state_a=state_a, state_b=state_b, red=red,
    )
    free = _kinds_to_use(spec, kinds, use)
    sa = {k: v.detach() for k, v in (state_a if state_a is not None else model_a.state_dict()).items()}
    sb = {k: v.detach() for k, v in (state_b if state_b is not None else model_b.state_dict()).items()}
    _check_scales(free, kinds, {"state_a": sa, "state_b": sb})
    corrs = {name: m.correlation(eps) for name, m in moments.items()}
    out: dict[str, Transform] = dict(solve_units(spec, corrs))
    for p, kind in free.items():
        if kind == "signed":
            out[p] = _signed(corrs[p], p)
    pending = {p for p, kind in free.items() if kind == "orthogonal"}
    for p in sorted(pending):
        def complete(p: str = p) -> Tensor:  # B with every other class matched so far, p itself not
            others = {q: t for q, t in out.items() if q not in pending}
            b_other = apply_transforms(spec, others, sb, kinds=kinds)
            return _weight_similarity(spec, p, sa, b_other, set(kinds.scales.get(p, ())))

        out[p] = _orthogonal(moments[p], complete)
        pending.discard(p)
    if red is not None:  # decided once: every rank holds the first rank's transforms
        out = _broadcast(red, out)
    return {p: out[p] for p in spec.perms if p in out}


def _broadcast(red: Any, trans: Mapping[str, Transform]) -> dict[str, Transform]:
    flat: dict[str, Tensor] = {}
    for p, t in trans.items():
        if isinstance(t, SignedPermutation):
            flat[p], flat[p + "\0signs"] = t.perm, t.signs
        else:
            flat[p] = t
    got = red.broadcast(flat)
    return {p: SignedPermutation(got[p], got[p + "\0signs"]) if isinstance(t, SignedPermutation) else got[p]
            for p, t in trans.items()}
