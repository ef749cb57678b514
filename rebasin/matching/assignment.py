"""Linear assignment on similarity matrices (the one place that calls scipy's solver).

Every matcher of the toolkit ends each step with a maximum-weight perfect matching on an
``n x n`` similarity matrix. The matrix is turned into a float64 CPU *cost* matrix ``-S`` in one
pass (``n x n`` only, never a whole model) and handed to
:func:`scipy.optimize.linear_sum_assignment` as a minimisation, which then works in place
without copying it again.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from .._errors import RebasinError

__all__ = ["cost_from_similarity", "solve_cost", "linear_assignment"]


def cost_from_similarity(similarity: Tensor, out: np.ndarray | None = None) -> np.ndarray:
    """``-similarity`` as a float64, C-contiguous CPU array of shape ``(n, n)`` (one pass).

    ``out``, a float64 C-contiguous array of the same shape, is reused when given (it saves
    allocating and faulting in ``8 n^2`` bytes per call); the result is then ``out`` itself.
    """
    if similarity.ndim != 2 or similarity.shape[0] != similarity.shape[1]:
        raise RebasinError(f"a similarity matrix must be square, got shape {tuple(similarity.shape)}")
    similarity = similarity.detach()
    usable = (
        out is not None
        and out.shape == tuple(similarity.shape)
        and out.dtype == np.float64
        and out.flags.c_contiguous
        and out.flags.writeable
    )
    if similarity.device.type != "cpu":
        neg = similarity.to(torch.float64).neg_()
        if not usable:
            return neg.cpu().numpy()
        torch.from_numpy(out).copy_(neg)
        return out
    if not usable:
        return np.negative(similarity.numpy(), dtype=np.float64)
    return np.negative(similarity.numpy(), out=out)


def solve_cost(cost: np.ndarray, *, name: str = "?") -> np.ndarray:
    """The permutation ``p`` minimising ``sum_i cost[i, p[i]]`` (int64 array of shape ``(n,)``)."""
    try:
        rows, cols = linear_sum_assignment(cost)
    except ValueError as exc:
        raise RebasinError(
            f"the similarity matrix of permutation {name!r} (shape {cost.shape}) contains NaN or inf: "
            f"{exc}; the weights are too large for float32 products — rescale them"
        ) from None
    if not np.array_equal(rows, np.arange(cost.shape[0])):  # pragma: no cover - scipy contract
        cols = cols[np.argsort(rows)]
    cols = cols.astype(np.int64, copy=False)
    if not np.isfinite(cost[np.arange(cols.size), cols]).all():
        raise RebasinError(
            f"the similarity matrix of permutation {name!r} (shape {cost.shape}) contains NaN or inf; "
            "the weights are too large for float32 products — rescale them"
        )
    return cols


def linear_assignment(similarity: Tensor, *, name: str = "?") -> Tensor:
    """Maximum-similarity assignment of a square tensor: int64 CPU tensor of shape ``(n,)``.

    Works for a matrix on any device (it is copied to the CPU once, as float64).

    Examples
    --------
    >>> linear_assignment(torch.tensor([[0.0, 2.0], [3.0, 1.0]]))
    tensor([1, 0])
    """
    return torch.from_numpy(solve_cost(cost_from_similarity(similarity), name=name))
