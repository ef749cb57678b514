"""Symmetries beyond permutations: signed permutations and orthogonal maps of a class, as plain data.

A *class* of the spec (a name in :attr:`PermutationSpec.perms`) is the set of tensor axes one
permutation acts on. Some classes admit a larger group: the residual stream of a model whose every norm
is RMSNorm-type and which passes through no elementwise function (Llama and its relatives) is unchanged
in function by any signed permutation ``DP`` and, once every norm scale is folded into its readers
(:func:`fold_rmsnorm`), by any orthogonal ``Q``. This module holds the data and the arithmetic:

* a transform of one class is a 1-D integer tensor (a permutation, as everywhere in the toolkit), a
  :class:`SignedPermutation` or an orthogonal float matrix of shape ``(n, n)``;
* :class:`SymmetryKinds` says which classes admit which kind and which state_dict entries are norm
  scales of each class (derived from a model by :func:`rebasin.trace.symmetry_kinds`);
* :func:`apply_transforms` applies transforms to a state_dict.

Convention, the same as :func:`rebasin.permute`: a transform ``Q`` (``n x n``; a permutation ``p`` is the
matrix with ``Q[i, p[i]] = 1``, a signed permutation ``Q[i, p[i]] = signs[i]``) maps model B onto model A,
and along *every* axis the class acts on the new slice ``i`` is ``sum_j Q[i, j] * (old slice j)``. For a
weight that writes to the class (rows) this is ``Q W``; for one that reads from it (columns) ``W Q^T``; for a
bias on the class ``Q b``; an embedding's feature axis ``E Q^T``. Since ``Q`` is orthogonal, a reader sees
``W Q^T Q x = W x``. Norm scales are the exception: an RMSNorm ``g * x / rms(x)`` commutes with a signed
permutation when its scale is permuted without signs (``P g``), and with a rotation only when ``g`` is all
ones.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import NamedTuple, Union

import torch
from torch import Tensor

from .._errors import RebasinError
from .core import PermutationSpec, check_permutations, permute_unchecked
from .heads import HeadLayout, HeadMaps, apply_head_maps, check_head_layouts

__all__ = [
    "SignedPermutation",
    "Transform",
    "SymmetryKinds",
    "KINDS",
    "kind_of",
    "apply_transforms",
    "random_signed_permutation",
    "random_orthogonal",
    "fold_rmsnorm",
    "transform_matrix",
    "why_structured",
    "check_transforms",
    "transform_entries",
]

KINDS = ("permutation", "signed", "orthogonal")  # each kind contains the previous ones
_ORTHO_TOL = 1e-4


class SignedPermutation(NamedTuple):
    """A signed permutation ``D P``: the new slice ``i`` is ``signs[i] * (old slice perm[i])``.

    Attributes
    ----------
    perm
        1-D integer tensor of shape ``(n,)``, a permutation of ``0..n-1``.
    signs
        Tensor of shape ``(n,)`` with entries ``+1`` or ``-1`` (any dtype).
    """

    perm: Tensor
    signs: Tensor


Transform = Union[Tensor, SignedPermutation]  # a transforms dict may also hold HeadMaps under a layout's name


def kind_of(transform: Transform | HeadMaps) -> str:
    """``"permutation"``, ``"signed"``, ``"orthogonal"`` or ``"heads"`` (:class:`HeadMaps`): the kind of one transform.

    Not validated.

    Parameters
    ----------
    transform
        A 1-D integer tensor, a :class:`SignedPermutation` or a square floating matrix.

    Raises
    ------
    RebasinError
        For anything else.

    Examples
    --------
    >>> kind_of(torch.tensor([1, 0])), kind_of(torch.eye(2))
    ('permutation', 'orthogonal')
    """
    if isinstance(transform, SignedPermutation):
        return "signed"
    if isinstance(transform, HeadMaps):
        return "heads"
    if isinstance(transform, Tensor) and transform.ndim == 1 and not transform.is_floating_point():
        return "permutation"
    if isinstance(transform, Tensor) and transform.ndim == 2 and transform.is_floating_point():
        return "orthogonal"
    desc = f"{type(transform).__name__} of shape {tuple(getattr(transform, 'shape', ()))}"
    raise RebasinError(f"a transform must be a 1-D integer tensor (a permutation), a SignedPermutation(perm, signs) "
                       f"or a square floating matrix (orthogonal), got {desc}")


@dataclass(frozen=True, eq=False)
class SymmetryKinds:
    """Which kind of transform each class of a spec admits, and the norm scales of each class.

    Parameters
    ----------
    kinds
        ``{perm: kind}``, the largest kind the class admits: ``"permutation"`` (the default for a class
        not listed), ``"signed"`` or ``"orthogonal"``. A class admitting a kind admits the smaller ones
        (permutation < signed < orthogonal). An orthogonal map also needs the class's norm scales to be
        all ones (:func:`fold_rmsnorm`); that is a property of the weights, checked by
        :func:`apply_transforms`.
    scales
        ``{perm: (key, ...)}``: state_dict entries that are norm scales (an RMSNorm's ``weight``) on the
        class. A signed permutation moves them without signs; an orthogonal map requires them to be ones.
    reasons
        ``{perm: text}``: why a class admits no more than it does, naming the module path and the op.
    readers
        ``{scale_key: (weight_key, ...)}``: the 2-D weights that read each norm's output through their
        columns (axis 1), used by :func:`fold_rmsnorm`.
    heads
        ``{name: HeadLayout}``: the attention layers whose heads admit maps inside them (q/k by ``A`` and
        ``A^{-T}``, v/o by ``B`` and ``B^{-1}``; see :mod:`rebasin.spec.heads`), by module path. A transforms
        dict gives :class:`HeadMaps` under these names.

    Examples
    --------
    >>> k = SymmetryKinds({"P0": "orthogonal"}, {"P0": ("norm.weight",)})
    >>> k.admits("P0", "signed"), k.admits("P1", "signed")
    (True, False)
    """

    kinds: Mapping[str, str]
    scales: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    reasons: Mapping[str, str] = field(default_factory=dict)
    readers: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    heads: Mapping[str, HeadLayout] = field(default_factory=dict)

    def __post_init__(self) -> None:
        kinds = {str(p): k for p, k in dict(self.kinds).items()}
        bad = {p: k for p, k in kinds.items() if k not in KINDS}
        if bad:
            raise RebasinError(f"SymmetryKinds: kinds must be one of {KINDS}, got {bad}")
        scales = {str(p): tuple(str(k) for k in v) for p, v in dict(self.scales).items()}
        object.__setattr__(self, "kinds", MappingProxyType(kinds))
        object.__setattr__(self, "scales", MappingProxyType(scales))
        object.__setattr__(self, "reasons", MappingProxyType({str(p): str(r) for p, r in dict(self.reasons).items()}))
        readers = {str(k): tuple(str(w) for w in v) for k, v in dict(self.readers).items()}
        object.__setattr__(self, "readers", MappingProxyType(readers))
        heads = {str(n): lay for n, lay in dict(self.heads).items()}
        bad_heads = [n for n, lay in heads.items() if not isinstance(lay, HeadLayout)]
        if bad_heads:
            raise RebasinError(f"SymmetryKinds: heads must map names to HeadLayout, got other values for {bad_heads}")
        object.__setattr__(self, "heads", MappingProxyType(heads))

    def admits(self, perm: str, kind: str) -> bool:
        """Whether class ``perm`` admits transforms of ``kind`` (one of :data:`KINDS`)."""
        if kind not in KINDS:
            raise RebasinError(f"kind must be one of {KINDS}, got {kind!r}")
        return KINDS.index(kind) <= KINDS.index(self.kinds.get(perm, "permutation"))

    def why_not(self, perm: str, kind: str) -> str:
        """The message for a refused ``kind`` on ``perm`` (module path and op where known)."""
        have = self.kinds.get(perm, "permutation")
        reason = self.reasons.get(perm, "the spec does not declare it (SymmetryKinds.kinds)")
        return (f"class {perm!r} admits transforms up to {have!r}, not {kind!r}: {reason}. Transform it by a "
                f"{have} only")


def why_structured(spec: PermutationSpec, perm: str) -> str | None:
    """None when class ``perm`` acts on whole axes only (it may then take signed or orthogonal maps); else why not.

    Examples
    --------
    >>> why_structured(PermutationSpec({"w": ("P", None)}), "P") is None
    True
    """
    if perm in spec.structure or perm in spec.outers:
        return ("it is structured (attention heads or groups: heads move whole; maps inside heads are given as "
                "HeadMaps under the layouts in SymmetryKinds.heads)")
    if perm in spec.block_inner.values():
        return "it permutes the units inside the blocks of another axis (spec.block_inner: grouped-query attention)"
    if any(perm == part for parts in spec.concat.values() for part, _ in parts):
        return "it is part of a concatenation (packed projections, torch.cat)"
    for key, axis in spec.perm_to_axes.get(perm, ()):
        if spec.blocks.get((key, axis), 1) > 1:
            return f"it acts in blocks on axis {axis} of {key!r} (after a flatten)"
        if (key, axis) in spec.grouped:
            return f"it acts on the grouped axis {axis} of {key!r}"
    return None


def _check_transform(name: str, t: Transform, n: int) -> None:
    if isinstance(t, SignedPermutation):
        s = t.signs
        if not isinstance(s, Tensor) or tuple(s.shape) != (n,) or not bool((s.abs() == 1).all()):
            raise RebasinError(f"transform {name!r}: signs must be a tensor of shape ({n},) with entries +1 or -1, "
                               f"got {getattr(s, 'shape', type(s).__name__)}")
    elif kind_of(t) == "orthogonal":
        if tuple(t.shape) != (n, n):
            raise RebasinError(f"transform {name!r} is a matrix of shape {tuple(t.shape)}, but the class acts on "
                               f"axes of size {n}: give an orthogonal ({n}, {n}) matrix")
        q = t.detach().double()
        if not bool(torch.isfinite(q).all()):
            raise RebasinError(f"transform {name!r} has non-finite entries")
        err = float((q @ q.T - torch.eye(n, dtype=q.dtype, device=q.device)).abs().max()) if n else 0.0
        if err > _ORTHO_TOL:
            raise RebasinError(f"transform {name!r} is not orthogonal: max |Q Q^T - I| = {err:.2e} > {_ORTHO_TOL}; "
                               "project it first (U V^T from its SVD)")


def transform_matrix(transform: Transform, n: int | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
    """The ``n x n`` matrix of a transform (``Q[i, p[i]] = 1``, resp. ``signs[i]``; a matrix is returned as is).

    Parameters
    ----------
    transform
        A permutation, :class:`SignedPermutation` or orthogonal matrix.
    n
        The size (default: the permutation's length).
    dtype
        The matrix's dtype.

    Examples
    --------
    >>> transform_matrix(SignedPermutation(torch.tensor([1, 0]), torch.tensor([1., -1.])))
    tensor([[ 0.,  1.],
            [-1.,  0.]])
    """
    if kind_of(transform) == "orthogonal":
        return transform.to(dtype)  # type: ignore[union-attr]  # kind_of(...) == "orthogonal" means a Tensor; mypy cannot narrow through kind_of
    perm = transform.perm if isinstance(transform, SignedPermutation) else transform
    n = perm.numel() if n is None else n
    out = torch.zeros(n, n, dtype=dtype, device=perm.device)
    vals = transform.signs.to(dtype) if isinstance(transform, SignedPermutation) else torch.ones(n, dtype=dtype)
    out[torch.arange(n, device=perm.device), perm.long()] = vals.to(perm.device)
    return out


def _along(t: Tensor, axis: int, q: Tensor) -> Tensor:
    """``q`` applied along ``axis`` of ``t``: new slice ``i`` = sum_j q[i, j] * slice j."""
    return torch.movedim(torch.tensordot(q.to(device=t.device, dtype=t.dtype), t, dims=([1], [axis])), 0, axis)


def apply_transforms(
    spec: PermutationSpec,
    transforms: Mapping[str, Transform | HeadMaps],
    state_dict: Mapping[str, Tensor],
    *,
    kinds: SymmetryKinds | None = None,
) -> dict[str, Tensor]:
    """Return a new state_dict with each class transformed on every axis it acts on.

    .. math::  W \\mapsto Q_{out} \\, W \\, Q_{in}^\\top, \\quad b \\mapsto Q b, \\quad
               g \\mapsto |Q| g \\text{ (norm scales, signed)}

    Parameters
    ----------
    spec
        The spec of the architecture.
    transforms
        ``{perm: transform}``; a transform is a 1-D integer tensor (a permutation, applied exactly as
        :func:`rebasin.permute` does, structured classes included), a :class:`SignedPermutation`, or an
        orthogonal floating matrix of shape ``(n, n)``. Missing classes stay as they are. Under the name of a
        layout of ``kinds.heads``: :class:`~rebasin.spec.heads.HeadMaps`, maps inside that attention's heads
        (applied after the permutations, in the permuted head order).
    state_dict
        Parameters and buffers; not mutated.
    kinds
        Which classes admit signed and orthogonal transforms, and their norm scales
        (:func:`rebasin.trace.symmetry_kinds`). Required as soon as one transform is not a permutation.

    Returns
    -------
    dict
        A new dict; untouched tensors are the input tensors themselves.

    Raises
    ------
    RebasinError
        For an unknown class, a malformed or non-orthogonal transform, a kind the class does not admit
        (the message names the module and the op that forbid it), a signed or orthogonal transform of a
        structured, blocked, grouped or concatenated class, or an orthogonal map of a class whose norm
        scales are not all ones (fold them first with :func:`fold_rmsnorm`).

    Examples
    --------
    >>> spec = PermutationSpec({"w1": ("P", None), "b1": ("P",), "w2": (None, "P")})
    >>> s = {"w1": torch.randn(3, 2), "b1": torch.randn(3), "w2": torch.randn(1, 3)}
    >>> q = random_orthogonal(3, seed=0)
    >>> out = apply_transforms(spec, {"P": q}, s, kinds=SymmetryKinds({"P": "orthogonal"}))
    >>> x = torch.randn(2)
    >>> torch.allclose(out["w2"] @ (out["w1"] @ x + out["b1"]), s["w2"] @ (s["w1"] @ x + s["b1"]), atol=1e-5)
    True
    """
    sizes = spec.validate(state_dict)
    classes: dict[str, Transform] = {}
    head_maps: dict[str, HeadMaps] = {}
    for name, t in transforms.items():
        if isinstance(t, HeadMaps):
            if kinds is None or name not in kinds.heads:
                known = [] if kinds is None else list(kinds.heads)
                raise RebasinError(f"HeadMaps given for {name!r}, which is not an attention layout of "
                                   f"kinds.heads ({known}); pass kinds= from rebasin.trace.symmetry_kinds")
            head_maps[name] = t
        else:
            classes[name] = t
    check_transforms(spec, classes, sizes, kinds=kinds, scale_values=state_dict)
    perms: dict[str, Tensor] = {name: (t.perm if isinstance(t, SignedPermutation) else t)
                                for name, t in classes.items() if kind_of(t) != "orthogonal"}
    other = {name: t for name, t in classes.items() if kind_of(t) != "permutation"}
    scale_keys = {name: set(kinds.scales.get(name, ())) if kinds is not None else set() for name in other}
    out = permute_unchecked(spec, perms, state_dict)
    for name, t in other.items():
        for key, axis in spec.perm_to_axes[name]:
            if key in scale_keys[name]:
                continue  # signed: permuted without signs (done above); orthogonal: all ones
            x = out[key]
            if isinstance(t, SignedPermutation):
                shape = [1] * x.ndim
                shape[axis] = -1
                out[key] = x * t.signs.to(device=x.device, dtype=x.dtype).reshape(shape)
            else:
                out[key] = _along(x, axis, t)
    if head_maps:
        check_head_layouts(kinds.heads, spec.perms)  # type: ignore[union-attr]  # head_maps is only filled when kinds is given
        for name, m in head_maps.items():
            apply_head_maps(kinds.heads[name], m, out)  # type: ignore[union-attr]  # as above
    return out


def random_signed_permutation(n: int, *, seed: int | None = 0,
                              generator: torch.Generator | None = None) -> SignedPermutation:
    """A uniformly random signed permutation of size ``n`` (on the CPU).

    Parameters
    ----------
    n
        Its size.
    seed, generator
        The randomness: a seed, or a ``torch.Generator`` to continue (no global RNG is used).

    Examples
    --------
    >>> sp = random_signed_permutation(4, seed=1)
    >>> sorted(sp.perm.tolist()), set(sp.signs.abs().tolist())
    ([0, 1, 2, 3], {1.0})
    """
    g = _generator(seed, generator, "random_signed_permutation")
    perm = torch.randperm(n, generator=g)
    signs = torch.randint(0, 2, (n,), generator=g).float() * 2 - 1
    return SignedPermutation(perm, signs)


def random_orthogonal(n: int, *, seed: int | None = 0, generator: torch.Generator | None = None,
                      dtype: torch.dtype = torch.float32) -> Tensor:
    """A Haar-random orthogonal ``n x n`` matrix (QR of a Gaussian matrix with the sign fix), on the CPU.

    Parameters
    ----------
    n
        Its size.
    seed, generator
        The randomness: a seed, or a ``torch.Generator`` to continue (no global RNG is used).
    dtype
        The result's dtype (drawn in float64).

    Examples
    --------
    >>> q = random_orthogonal(5, seed=0, dtype=torch.float64)
    >>> torch.allclose(q @ q.T, torch.eye(5, dtype=torch.float64))
    True
    """
    g = _generator(seed, generator, "random_orthogonal")
    a = torch.randn(n, n, generator=g, dtype=torch.float64)
    q, r = torch.linalg.qr(a)
    q = q * torch.sign(torch.diagonal(r)).where(torch.diagonal(r) != 0, torch.ones(()))[None, :]
    return q.to(dtype)


def _generator(seed: int | None, generator: torch.Generator | None, who: str) -> torch.Generator:
    if generator is not None:
        return generator
    if seed is None:
        raise RebasinError(f"{who} needs seed= or generator=")
    return torch.Generator().manual_seed(int(seed))


def fold_rmsnorm(spec: PermutationSpec, state_dict: Mapping[str, Tensor], kinds: SymmetryKinds) -> dict[str, Tensor]:
    """Fold every RMSNorm scale into the weights that read the norm's output, and set the scale to one.

    ``W (g * n) = (W diag(g)) n``: the function is unchanged, and the class then admits orthogonal maps
    (:func:`apply_transforms`). Models built with the scales as parameters load the result as they are.

    Parameters
    ----------
    spec
        The spec of the architecture.
    state_dict
        Not mutated.
    kinds
        From :func:`rebasin.trace.symmetry_kinds`: :attr:`SymmetryKinds.scales` names the norm scales and
        :attr:`SymmetryKinds.readers` the weights reading each norm.

    Returns
    -------
    dict
        A new state_dict; every scale in ``kinds.scales`` is ones, its readers' columns scaled by it.

    Raises
    ------
    RebasinError
        If a scale has no recorded readers, a reader is not a 2-D weight whose columns carry the scale's
        class, or a reader shares its tensor with another entry (tied embeddings: folding would untie them).
    """
    spec.validate(state_dict)
    out = dict(state_dict)
    ptrs: dict[int, list[str]] = {}
    for k, t in state_dict.items():
        if t.numel():
            ptrs.setdefault(t.data_ptr(), []).append(k)
    for p, keys in kinds.scales.items():
        for key in keys:
            ws = kinds.readers.get(key, ())
            if not ws:
                raise RebasinError(f"fold_rmsnorm: the norm scale {key!r} (class {p!r}) has no recorded readers to fold "
                                   "into (SymmetryKinds.readers)")
            g = state_dict[key]
            for w in ws:
                ax = spec.axes.get(w)
                if ax is None or len(ax) != 2 or ax[1] != p:
                    raise RebasinError(f"fold_rmsnorm: reader {w!r} of {key!r} must be a 2-D weight whose columns carry "
                                       f"class {p!r}; the spec gives {ax}")
                tied = [k for k in ptrs.get(state_dict[w].data_ptr(), []) if k != w]
                if tied:
                    raise RebasinError(f"fold_rmsnorm: {w!r} shares its tensor with {tied} (tied weights); folding the "
                                       f"scale {key!r} into it would change them too. Untie the weights first")
                out[w] = out[w] * g.to(out[w].dtype)[None, :]
            out[key] = torch.ones_like(g)
    return out


def check_transforms(
    spec: PermutationSpec,
    transforms: Mapping[str, Transform],
    sizes: Mapping[str, int],
    *,
    kinds: SymmetryKinds | None = None,
    scale_values: Mapping[str, Tensor] | None = None,
) -> None:
    """Raise :class:`RebasinError` for transforms :func:`apply_transforms` would refuse, reading no weights.

    The check :func:`transform_entries` relies on, for callers that apply transforms a tensor (or a slice of
    rows) at a time, such as :func:`rebasin.save_permuted`.

    Parameters
    ----------
    spec, transforms, kinds
        As for :func:`apply_transforms`.
    sizes
        ``{perm: n}``, from :meth:`PermutationSpec.validate` of the state (or its ``meta`` tensors).
    scale_values
        The norm scales of every class given an orthogonal map (``kinds.scales``), to check that they are ones;
        None skips that check.

    Examples
    --------
    >>> spec = PermutationSpec({"w": ("P", None)})
    >>> check_transforms(spec, {"P": torch.eye(2)}, {"P": 2}, kinds=SymmetryKinds({"P": "orthogonal"}))
    """
    perms: dict[str, Tensor] = {}
    for name, t in transforms.items():
        if name not in spec.perm_to_axes:
            raise RebasinError(f"unknown class {name!r}; the spec has {list(spec.perms)}")
        kind = kind_of(t)
        if kind == "permutation":
            perms[name] = t  # type: ignore[assignment]  # kind_of(...) == "permutation" means a Tensor
            continue
        if kinds is None:
            raise RebasinError(f"transform {name!r} is a {kind} map: pass kinds= (rebasin.trace.symmetry_kinds(model, "
                               "example_input)) so that its legality and the norm scales of the class are known")
        if not kinds.admits(name, kind):
            raise RebasinError(kinds.why_not(name, kind))
        why = why_structured(spec, name)
        if why is not None:
            raise RebasinError(f"class {name!r} takes only permutations: {why}")
        _check_transform(name, t, int(sizes[name]))
        if isinstance(t, SignedPermutation):
            perms[name] = t.perm
        elif scale_values is not None:
            for key in kinds.scales.get(name, ()):
                if not bool((scale_values[key] == 1).all()):
                    raise RebasinError(f"class {name!r}: the norm scale {key!r} is not all ones, and a norm scale does "
                                       "not commute with a rotation; fold it into its readers first (rebasin.fold_rmsnorm)")
    check_permutations(spec, perms, dict(sizes))


def transform_entries(
    spec: PermutationSpec,
    transforms: Mapping[str, Transform],
    part: Mapping[str, Tensor],
    *,
    kinds: SymmetryKinds | None = None,
) -> dict[str, Tensor]:
    """:func:`apply_transforms` on some entries of a state_dict only, unchecked (see :func:`check_transforms`).

    Orthogonal maps of 16-bit floating entries are computed in float32 and rounded once. An entry may also be
    a slice of rows of a tensor when no class acts on its first axis (the other axes
    are whole, so an orthogonal map along them is exact row by row): the checkpoint writer streams big
    embeddings that way.

    Parameters
    ----------
    spec, transforms, kinds
        As for :func:`apply_transforms`, already checked.
    part
        ``{key: tensor}`` for any subset of the spec's keys. Not mutated.

    Returns
    -------
    dict
        The transformed entries of ``part``.

    Examples
    --------
    >>> spec = PermutationSpec({"w1": ("P", None), "w2": (None, "P")})
    >>> sp = SignedPermutation(torch.tensor([1, 0]), torch.tensor([1., -1.]))
    >>> transform_entries(spec, {"P": sp}, {"w2": torch.tensor([[1., 2.]])},
    ...                   kinds=SymmetryKinds({"P": "signed"}))["w2"]
    tensor([[ 2., -1.]])
    """
    perms = {n: (t.perm if isinstance(t, SignedPermutation) else t) for n, t in transforms.items()
             if kind_of(t) != "orthogonal"}
    out = permute_unchecked(spec, perms, part)
    for name, t in transforms.items():
        if kind_of(t) == "permutation":
            continue
        scales = set(kinds.scales.get(name, ())) if kinds is not None else set()
        for key, axis in spec.perm_to_axes[name]:
            if key not in out or key in scales:
                continue
            x = out[key]
            if isinstance(t, SignedPermutation):
                shape = [1] * x.ndim
                shape[axis] = -1
                out[key] = x * t.signs.to(device=x.device, dtype=x.dtype).reshape(shape)
            elif x.is_floating_point() and x.element_size() < 4:  # 16-bit floats: computed in float32, rounded once
                out[key] = _along(x.float(), axis, t).to(x.dtype)
            else:
                out[key] = _along(x, axis, t)
    return out
