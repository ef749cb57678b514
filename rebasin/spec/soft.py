"""Soft (differentiable) permutation of state_dicts, and conversions between permutations and matrices.

``soft_permute`` is the differentiable counterpart of :func:`rebasin.permute`: every permutation is
given as an ``n x n`` matrix (a doubly stochastic one from :func:`rebasin.matching.sinkhorn`, or a hard 0/1
one), and along each axis it acts on the tensor is contracted with that matrix. For a hard
permutation ``p``, ``perm_to_matrix(p)`` (that is ``torch.eye(n)[p]``) reproduces
``permute(spec, {name: p}, state_dict)`` exactly.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from .._errors import RebasinError
from .core import PermutationSpec

__all__ = ["soft_permute", "structured_matrix", "perm_to_matrix", "matrix_to_perm"]


def soft_permute(
    spec: PermutationSpec, matrices: Mapping[str, Tensor], state_dict: Mapping[str, Tensor]
) -> dict[str, Tensor]:
    r"""Apply soft permutation matrices to a state_dict, differentiably.

    Along an axis carrying permutation ``P`` with matrix :math:`M` (``n x n``), the result is

    .. math::

        \text{new}[\dots, i, \dots] = \sum_j M_{ij}\, \text{old}[\dots, j, \dots],

    and on an axis of size ``n * k`` that the spec marks as ``k``-blocks (a ``Linear`` after a
    flattened ``(C, H, W)`` map) the axis is read as ``(n, k)`` and contracted over ``n``.
    For a permutation matrix :math:`M_{ij} = [j = p_i]` this is ``index_select(axis, p)``,
    exactly what :func:`rebasin.permute` does.

    The structured parts of a spec are honoured as :func:`rebasin.permute` honours them:

    * a concatenation (``spec.concat``: ``torch.cat``, packed q;k;v, LSTM gates) is contracted with the
      block-diagonal matrix of its parts' matrices (identity for ``None`` parts and parts not in
      ``matrices``), slice by slice;
    * a permutation on two axes of one tensor (``("P", "P")``) is contracted on both: :math:`M W M^\top`;
    * a structured permutation (``spec.structure``: attention heads, groups) is given as its flat
      ``n x n`` matrix, built with :func:`structured_matrix` from one outer matrix shared by the members
      of the structure and one inner matrix per block. All members of a structure (and its outer, if it
      is a permutation of the spec) are given together or not at all;
    * on a grouped axis (``spec.grouped``, a grouped convolution's ``(C_out, C_in / g, ...)`` weight) row
      ``r`` is mixed by the inner matrix of its (destination) group only,
      :math:`T_a = \sum_b M_{[a], [b]}` (the sum of block row ``a`` of the input's matrix; exactly the
      ``T_a`` of :func:`structured_matrix`): the outer part moves the groups once, through axis 0.

    Parameters
    ----------
    spec
        The permutation spec of the architecture.
    matrices
        ``{perm: Tensor of shape (n, n)}``, floating; typically ``sinkhorn(logits)``,
        ``structured_matrix(sinkhorn(outer_logits), sinkhorn(inner_logits))`` or
        ``perm_to_matrix(p)``. Keys are permutations of the spec (``spec.perms``), never concatenation
        names or virtual outer permutations. Permutations missing from it are the identity. Gradients flow
        back to these matrices. Each is cast to the dtype and device of the tensor it acts on.
    state_dict
        Parameters and buffers. Gradients flow back to these tensors too. Not mutated.
        Non-floating tensors (``num_batches_tracked``) are passed through unchanged.

    Returns
    -------
    dict
        A new dict with the same keys; tensors no matrix acts on are the input tensors themselves.

    Raises
    ------
    RebasinError
        If ``state_dict`` does not match ``spec``, a name is not a permutation of the spec, a
        matrix is not floating or not ``n x n`` for a permutation of size ``n``, only some members
        of a structure are given, or a non-floating tensor would need to be mixed.

    Examples
    --------
    >>> import torch
    >>> from rebasin import PermutationSpec, permute
    >>> spec = PermutationSpec({"w1": ("P", None), "w2": (None, "P")})
    >>> s = {"w1": torch.randn(3, 2), "w2": torch.randn(1, 3)}
    >>> p = torch.tensor([2, 0, 1])
    >>> hard = soft_permute(spec, {"P": perm_to_matrix(p)}, s)
    >>> torch.equal(hard["w1"], permute(spec, {"P": p}, s)["w1"])
    True
    """
    sizes = spec.validate(state_dict)
    for name, m in matrices.items():
        if name not in spec.perm_to_axes:
            hint = ""
            if name in spec.concat:
                hint = f"; {name!r} is a concatenation: give the matrices of its parts"
            elif name in spec.outers:
                hint = (f"; {name!r} is a virtual outer permutation: give its members "
                        f"{list(spec.outers[name])} as structured_matrix(outer, inner) matrices")
            raise RebasinError(f"unknown permutation {name!r} in matrices; the spec has {list(spec.perms)}{hint}")
        n = sizes[name]
        if not isinstance(m, Tensor) or not m.is_floating_point():
            desc = f"{type(m).__name__} {getattr(m, 'dtype', '')}".strip()
            raise RebasinError(
                f"matrix for permutation {name!r} must be a floating Tensor of shape ({n}, {n}), got {desc}"
                + ("; convert a hard permutation with perm_to_matrix" if isinstance(m, Tensor) and m.ndim == 1 else "")
            )
        if tuple(m.shape) != (n, n):
            occ = spec.occurrences[name][0]
            hint = ""
            if name in spec.structure and m.ndim == 3:
                hint = "; build the flat matrix of a structured permutation with structured_matrix(outer, inner)"
            raise RebasinError(
                f"matrix for permutation {name!r} has shape {tuple(m.shape)} but the permutation has size "
                f"{n} (e.g. state_dict[{occ.key!r}] of shape {tuple(state_dict[occ.key].shape)}, axis {occ.axis}); "
                f"expected ({n}, {n}){hint}"
            )
    _check_units(spec, matrices)
    spec.refuse_block_inner("soft_permute (and Sinkhorn re-basin, PAM, which use it)")
    out: dict[str, Tensor] = {}
    for key, t in state_dict.items():
        axes = [(axis, name) for axis, name in enumerate(spec.axes[key]) if name is not None and _acts(spec, name, matrices)]
        if axes and not t.is_floating_point():
            raise RebasinError(
                f"state_dict[{key!r}] has dtype {t.dtype} (shape {tuple(t.shape)}) but permutation "
                f"{axes[0][1]!r} acts on it; a non-floating tensor cannot be soft-permuted — use "
                "rebasin.permute with hard permutations"
            )
        grouped = []
        for axis, name in axes:
            block = spec.blocks.get((key, axis), 1)
            if (key, axis) in spec.grouped:
                grouped.append((axis, name))  # after axis 0, like permute: rows first, then each row's group
            elif name in spec.concat:
                t = _contract_concat(spec.concat[name], matrices, t, axis, block)
            else:
                t = _contract(matrices[name].to(dtype=t.dtype, device=t.device), t, axis, block)
        for axis, name in grouped:
            t = _contract_grouped(matrices[name].to(dtype=t.dtype, device=t.device), t, axis, spec.grouped[(key, axis)])
        out[key] = t
    return out


def _acts(spec: PermutationSpec, name: str, matrices: Mapping[str, Tensor]) -> bool:
    """Whether an axis name (a permutation or a concatenation) has a matrix (of some part) in ``matrices``."""
    if name in spec.concat:
        return any(q is not None and q in matrices for q, _ in spec.concat[name])
    return name in matrices


def _check_units(spec: PermutationSpec, matrices: Mapping[str, Tensor]) -> None:
    """A structure (an outer permutation and its members) is given whole or not at all, as in ``permute``."""
    for outer, members in spec.outers.items():
        named = [q for q in ((outer,) if outer in spec.perm_to_axes else ()) + members if q in matrices]
        missing = [q for q in ((outer,) if outer in spec.perm_to_axes else ()) + members if q not in matrices]
        if named and missing:
            raise RebasinError(
                f"matrices gives {named[0]!r} but not {missing[0]!r}, which shares the outer permutation {outer!r} "
                "(heads or groups move together); give every permutation of the structure, each built with "
                "structured_matrix from one outer matrix, or none"
            )


def _contract_concat(
    parts: tuple[tuple[str | None, int], ...], matrices: Mapping[str, Tensor], t: Tensor, axis: int, block: int
) -> Tensor:
    """Contract a concatenation axis: the block-diagonal matrix of its parts (identity for None and absent parts).

    Computed part by part on slices of the axis, so the block-diagonal matrix is never formed.
    """
    pieces, start = [], 0
    for q, n in parts:
        piece = t.narrow(axis, start * block, n * block)
        if q is not None and q in matrices:
            piece = _contract(matrices[q].to(dtype=t.dtype, device=t.device), piece, axis, block)
        pieces.append(piece)
        start += n
    return torch.cat(pieces, dim=axis)


def _contract_grouped(m: Tensor, t: Tensor, axis: int, groups: int) -> Tensor:
    """Contract a grouped axis (``t.shape[axis] = n / groups``) with the structured ``n x n`` matrix ``m``.

    Row ``r`` of axis 0 (group ``a = r // (rows / groups)``, already moved by axis 0's matrix) is mixed by the
    inner matrix of destination block ``a``, ``T_a = sum_b m[a-th block row, b-th block column]`` (for
    ``m = structured_matrix(Sigma, T)`` that is exactly ``T_a``, as the rows of ``Sigma`` sum to one; the
    outer part already acted through axis 0). For a permutation matrix this is what ``permute`` does.
    """
    size = t.shape[axis]
    inner = m.reshape(groups, size, groups, size).sum(2)  # (g, size, size): T_a[c, k]
    moved = torch.movedim(t, axis, -1)
    shape = moved.shape
    flat = moved.reshape(groups, -1, size)  # rows of one group are consecutive along axis 0
    mixed = flat @ inner.transpose(-1, -2)  # new[a, x, c] = sum_k T_a[c, k] old[a, x, k]
    return torch.movedim(mixed.reshape(shape), -1, axis)


def _contract(m: Tensor, t: Tensor, axis: int, block: int) -> Tensor:
    """``new[..., i, ...] = sum_j m[i, j] old[..., j, ...]`` on ``axis`` (read as ``(n, block)``)."""
    shape = t.shape
    n = m.shape[0]
    if block > 1:
        t = t.reshape(*shape[:axis], n, block, *shape[axis + 1 :])
    # tensordot puts the contracted result's new axis first; move it back into place.
    r = torch.movedim(torch.tensordot(m, t, dims=([1], [axis])), 0, axis)
    return r.reshape(shape)


def structured_matrix(outer: Tensor, inner: Tensor) -> Tensor:
    r"""The flat soft matrix of a structured permutation: ``S[a*d + i, b*d + j] = outer[a, b] * inner[a, i, j]``.

    A structured permutation (``spec.structure[perm] = (outer_name, d)``) moves whole blocks of ``d``
    units (attention heads, groups) by an outer permutation and the units inside each *destination*
    block ``a`` by their own inner permutation. Its soft counterpart is parametrised the same way: an
    ``H x H`` outer matrix :math:`\Sigma` (shared by every member of the structure) and one ``d x d``
    inner matrix :math:`T_a` per block,

    .. math::

        S_{ad+i,\; bd+j} = \Sigma_{ab}\, (T_a)_{ij}.

    :math:`S` is doubly stochastic when :math:`\Sigma` and every :math:`T_a` are (a row sums to
    :math:`\sum_b \Sigma_{ab} = 1`, a column to :math:`\sum_a \Sigma_{ab} = 1`), and for permutation
    matrices it is the permutation matrix of the hard structured permutation:
    ``structured_matrix(perm_to_matrix(o), stack([perm_to_matrix(i) for i in inner])) ==
    perm_to_matrix(join_structured(o, inner))``. Differentiable in both arguments. The flat form is what
    :func:`soft_permute` takes, so a structured permutation is given like any other (and a hard
    ``perm_to_matrix(p)`` of a structured ``p`` works unchanged).

    Parameters
    ----------
    outer
        Floating tensor of shape ``(H, H)``.
    inner
        Floating tensor of shape ``(H, d, d)``: the inner matrix of each destination block.

    Returns
    -------
    Tensor
        Shape ``(H * d, H * d)``, dtype and device of ``inner`` (``outer`` is cast to them).

    Examples
    --------
    >>> import torch
    >>> from rebasin.spec import join_structured
    >>> o, i = torch.tensor([1, 0]), torch.tensor([[1, 0], [0, 1]])
    >>> s = structured_matrix(perm_to_matrix(o), torch.stack([perm_to_matrix(r) for r in i]))
    >>> torch.equal(s, perm_to_matrix(join_structured(o, i)))
    True
    """
    if not isinstance(outer, Tensor) or not isinstance(inner, Tensor):
        raise RebasinError(
            f"structured_matrix needs two tensors (outer, inner), got {type(outer).__name__} and {type(inner).__name__}"
        )
    if not outer.is_floating_point() or not inner.is_floating_point():
        raise RebasinError(f"structured_matrix needs floating tensors, got {outer.dtype} and {inner.dtype}; "
                           "convert hard permutations with perm_to_matrix")
    if outer.ndim != 2 or outer.shape[0] != outer.shape[1]:
        raise RebasinError(f"structured_matrix: outer must have shape (H, H), got {tuple(outer.shape)}")
    h = outer.shape[0]
    if inner.ndim != 3 or inner.shape[0] != h or inner.shape[1] != inner.shape[2]:
        raise RebasinError(
            f"structured_matrix: inner must have shape (H, d, d) = ({h}, d, d) for an outer of shape {tuple(outer.shape)}, "
            f"got {tuple(inner.shape)}"
        )
    d = inner.shape[1]
    outer = outer.to(dtype=inner.dtype, device=inner.device)
    return (outer[:, None, :, None] * inner[:, :, None, :]).reshape(h * d, h * d)


def perm_to_matrix(
    perm: Tensor, dtype: torch.dtype | None = None, device: torch.device | str | None = None
) -> Tensor:
    """The permutation matrix of ``perm``: ``M[i, perm[i]] = 1``, i.e. ``torch.eye(n)[perm]``.

    With it, ``soft_permute(spec, {name: perm_to_matrix(p)}, s)`` equals
    ``permute(spec, {name: p}, s)``.

    Parameters
    ----------
    perm
        Integer tensor of shape ``(n,)`` holding a permutation of ``0..n-1``.
    dtype, device
        Of the result; default ``torch.get_default_dtype()`` and ``perm``'s device.

    Returns
    -------
    Tensor
        Shape ``(n, n)``, zeros and ones.

    Examples
    --------
    >>> perm_to_matrix(torch.tensor([1, 2, 0]))
    tensor([[0., 1., 0.],
            [0., 0., 1.],
            [1., 0., 0.]])
    """
    if not isinstance(perm, Tensor) or perm.ndim != 1 or perm.is_floating_point() or perm.is_complex() or perm.dtype == torch.bool:
        desc = f"{type(perm).__name__} {getattr(perm, 'dtype', '')} of shape {tuple(getattr(perm, 'shape', ()))}"
        raise RebasinError(f"perm_to_matrix needs a 1-D integer tensor, got {desc}")
    n = perm.numel()
    p = perm.long()
    if n and (int(p.min()) < 0 or int(p.max()) >= n or bool((torch.bincount(p, minlength=n) != 1).any())):
        raise RebasinError(f"perm_to_matrix: {perm.tolist() if n <= 20 else 'input'} is not a permutation of 0..{n - 1}")
    device = perm.device if device is None else torch.device(device)
    dtype = torch.get_default_dtype() if dtype is None else dtype
    m = torch.zeros(n, n, dtype=dtype, device=device)
    m[torch.arange(n, device=device), p.to(device)] = 1
    return m


def matrix_to_perm(matrix: Tensor) -> Tensor:
    """The permutation maximising ``sum_i matrix[i, perm[i]]`` (a linear assignment).

    The inverse of :func:`perm_to_matrix` on permutation matrices, and the usual way to turn a
    soft permutation (or Sinkhorn logits) into a hard one.

    Parameters
    ----------
    matrix
        Real tensor of shape ``(n, n)`` or ``(..., n, n)``, finite. Not differentiated.

    Returns
    -------
    Tensor
        ``int64`` tensor of shape ``(n,)`` (or ``(..., n)``) on ``matrix``'s device.

    Examples
    --------
    >>> p = torch.tensor([2, 0, 1])
    >>> torch.equal(matrix_to_perm(perm_to_matrix(p)), p)
    True
    """
    if not isinstance(matrix, Tensor) or matrix.ndim < 2 or matrix.shape[-1] != matrix.shape[-2]:
        raise RebasinError(
            f"matrix_to_perm needs a square matrix of shape (..., n, n), got shape {tuple(getattr(matrix, 'shape', ()))}"
        )
    if matrix.is_complex():
        raise RebasinError(f"matrix_to_perm needs a real matrix, got dtype {matrix.dtype}")
    arr = matrix.detach().to("cpu", torch.float64).numpy()
    if not np.isfinite(arr).all():
        raise RebasinError(f"matrix_to_perm: the matrix of shape {tuple(matrix.shape)} contains NaN or inf")
    n = arr.shape[-1]
    flat = arr.reshape(-1, n, n)
    out = np.empty((flat.shape[0], n), dtype=np.int64)
    for b in range(flat.shape[0]):
        _, cols = linear_sum_assignment(flat[b], maximize=True)
        out[b] = cols
    return torch.from_numpy(out.reshape(*arr.shape[:-1])).to(matrix.device)
