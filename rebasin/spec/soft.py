"""Soft (differentiable) permutation of state_dicts, and conversions between permutations and matrices.

``soft_permute`` is the differentiable counterpart of :func:`rebasin.permute`: every permutation is
given as an ``n x n`` matrix (a doubly stochastic one from :func:`rebasin.sinkhorn`, or a hard 0/1
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

__all__ = ["soft_permute", "perm_to_matrix", "matrix_to_perm"]


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

    Parameters
    ----------
    spec
        The permutation spec of the architecture.
    matrices
        ``{perm: Tensor of shape (n, n)}``, floating; typically ``sinkhorn(logits)`` or
        ``perm_to_matrix(p)``. Permutations missing from it are the identity. Gradients flow
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
        matrix is not floating or not ``n x n`` for a permutation of size ``n``, or a
        non-floating tensor would need to be mixed.

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
            raise RebasinError(f"unknown permutation {name!r} in matrices; the spec has {list(spec.perms)}")
        n = sizes[name]
        if not isinstance(m, Tensor) or not m.is_floating_point():
            desc = f"{type(m).__name__} {getattr(m, 'dtype', '')}".strip()
            raise RebasinError(
                f"matrix for permutation {name!r} must be a floating Tensor of shape ({n}, {n}), got {desc}"
                + ("; convert a hard permutation with perm_to_matrix" if isinstance(m, Tensor) and m.ndim == 1 else "")
            )
        if tuple(m.shape) != (n, n):
            key, axis = spec.perm_to_axes[name][0]
            raise RebasinError(
                f"matrix for permutation {name!r} has shape {tuple(m.shape)} but the permutation has size "
                f"{n} (e.g. state_dict[{key!r}] of shape {tuple(state_dict[key].shape)}, axis {axis}); "
                f"expected ({n}, {n})"
            )
    out: dict[str, Tensor] = {}
    for key, t in state_dict.items():
        axes = [(axis, name) for axis, name in enumerate(spec.axes[key]) if name is not None and name in matrices]
        if axes and not t.is_floating_point():
            raise RebasinError(
                f"state_dict[{key!r}] has dtype {t.dtype} (shape {tuple(t.shape)}) but permutation "
                f"{axes[0][1]!r} acts on it; a non-floating tensor cannot be soft-permuted — use "
                "rebasin.permute with hard permutations"
            )
        for axis, name in axes:
            t = _contract(matrices[name].to(dtype=t.dtype, device=t.device), t, axis, spec.blocks.get((key, axis), 1))
        out[key] = t
    return out


def _contract(m: Tensor, t: Tensor, axis: int, block: int) -> Tensor:
    """``new[..., i, ...] = sum_j m[i, j] old[..., j, ...]`` on ``axis`` (read as ``(n, block)``)."""
    shape = t.shape
    n = m.shape[0]
    if block > 1:
        t = t.reshape(*shape[:axis], n, block, *shape[axis + 1 :])
    # tensordot puts the contracted result's new axis first; move it back into place.
    r = torch.movedim(torch.tensordot(m, t, dims=([1], [axis])), 0, axis)
    return r.reshape(shape)


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
