"""Linear assignment on similarity matrices (the one place that calls scipy's solver).

Every matcher of the toolkit ends each step with a maximum-weight perfect matching on an
``n x n`` similarity matrix. The matrix is turned into a float64 CPU *cost* matrix ``-S`` in one
pass (``n x n`` only, never a whole model) and handed to
:func:`scipy.optimize.linear_sum_assignment` as a minimisation, which then works in place
without copying it again.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from .._errors import RebasinError

__all__ = ["cost_from_similarity", "solve_cost", "linear_assignment", "structured_assignment", "StructuredAssignment"]


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
        return out  # type: ignore[return-value]  # Optional narrowed by earlier logic mypy cannot follow
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


class StructuredAssignment(NamedTuple):
    """Result of :func:`structured_assignment`.

    Attributes
    ----------
    outer
        ``(H,)`` int64: block ``a`` of A is paired with block ``outer[a]`` of B.
    inner
        One ``(H, d_m)`` int64 array per member: unit ``i`` of A's block ``a`` goes to unit
        ``inner[a, i]`` of B's block ``outer[a]``. The member's flat permutation is
        ``outer[a] * d_m + inner[a, i]`` at position ``a * d_m + i`` (:func:`rebasin.spec.join_structured`).
    value
        The maximised total similarity (float).
    """

    outer: np.ndarray
    inner: list[np.ndarray]
    value: float


# Below this block size every within-block assignment is found by enumerating the d! permutations at once.
_ENUMERATE_MAX = 4
# Entries of the enumeration's temporary (blocks x d! x d) per chunk.
_ENUMERATE_CHUNK = 1 << 22


def _block_assignments(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Best assignment inside every ``(d, d)`` block of ``blocks`` (shape ``(H, H, d, d)``, maximised).

    Returns ``(value, inner)`` of shapes ``(H, H)`` and ``(H, H, d)``.
    """
    h1, h2, d, _ = blocks.shape
    if d == 1:
        return blocks[:, :, 0, 0].copy(), np.zeros((h1, h2, 1), dtype=np.int64)
    if d <= _ENUMERATE_MAX:
        cands = np.array(list(itertools.permutations(range(d))), dtype=np.int64)  # (d!, d)
        value = np.empty((h1, h2), dtype=np.float64)
        inner = np.empty((h1, h2, d), dtype=np.int64)
        step = max(1, _ENUMERATE_CHUNK // (h2 * cands.size))  # rows of blocks per chunk: bounded memory
        for lo in range(0, h1, step):
            vals = blocks[lo:lo + step][:, :, np.arange(d)[None, :], cands].sum(axis=-1)  # (rows, H, d!)
            best = vals.argmax(axis=-1)
            value[lo:lo + step] = np.take_along_axis(vals, best[..., None], -1)[..., 0]
            inner[lo:lo + step] = cands[best]
        return value, inner
    value = np.empty((h1, h2), dtype=np.float64)
    inner = np.empty((h1, h2, d), dtype=np.int64)
    flat = -blocks.reshape(h1 * h2, d, d)
    for k in range(h1 * h2):
        rows, cols = linear_sum_assignment(flat[k])
        inner.flat[k * d:(k + 1) * d] = cols
        value.flat[k] = -flat[k][rows, cols].sum()
    return value, inner


def structured_assignment(
    similarities: Sequence[np.ndarray | Tensor],
    blocks: Sequence[int],
    outer_similarity: np.ndarray | Tensor | None = None,
    *,
    name: str = "?",
) -> StructuredAssignment:
    r"""Best structured permutations of several members sharing one outer (head / group) permutation.

    Member ``m`` has size ``H * d_m`` and similarity ``S_m`` (``(H d_m) x (H d_m)``); its permutation
    moves whole blocks of ``d_m`` units by the shared outer permutation ``σ`` (size ``H``) and the units
    inside each block freely. The problem

    .. math::

        \max_{\sigma, \tau} \sum_m \sum_a \sum_i S_m[a d_m + i,\ \sigma(a) d_m + \tau_{m,a}(i)]
        + \sum_a S_o[a, \sigma(a)]

    separates: for a fixed pairing of A's block ``a`` with B's block ``b`` the inner permutations are
    independent ``d_m x d_m`` assignments on the blocks ``S_m[a, :, b, :]``. So the value of pairing ``a``
    with ``b`` is the sum of the members' best within-block values (plus the outer's own similarity
    ``S_o``, when the outer permutation acts on axes itself), and ``σ`` is the ``H x H`` assignment on
    those values. This is exact: the hierarchical solve is the optimum over structured permutations.
    Cost: ``H^2`` assignments of size ``d`` per member (enumerated at once for ``d <= 4``; ``d = 1``
    is free) plus one of size ``H``.

    Parameters
    ----------
    similarities
        One square similarity per member (numpy or torch, any device; read as float64).
    blocks
        The block size ``d_m`` of each member.
    outer_similarity
        Optional ``(H, H)`` similarity of the outer permutation itself.
    name
        Named in error messages.

    Returns
    -------
    StructuredAssignment

    Examples
    --------
    >>> s = np.zeros((4, 4)); s[0, 3] = s[1, 2] = s[2, 1] = s[3, 0] = 1.0
    >>> r = structured_assignment([s], [2])
    >>> r.outer.tolist(), r.inner[0].tolist(), r.value
    ([1, 0], [[1, 0], [1, 0]], 4.0)
    """
    if len(similarities) != len(blocks) or not similarities:
        raise RebasinError(f"structured assignment of {name!r}: give one block size per similarity "
                           f"(got {len(similarities)} similarities and {len(blocks)} block sizes)")
    total: np.ndarray | None = None
    inners: list[np.ndarray] = []
    h = None
    for s, d in zip(similarities, blocks):
        s = _as_float64(s)
        n = s.shape[0]
        if s.ndim != 2 or s.shape[1] != n or d < 1 or n % d:
            raise RebasinError(f"structured assignment of {name!r}: a similarity of shape {s.shape} cannot be cut "
                               f"into blocks of {d}")
        if h is not None and n // d != h:
            raise RebasinError(f"structured assignment of {name!r}: members have {h} and {n // d} blocks")
        h = n // d
        view = s.reshape(h, d, h, d).transpose(0, 2, 1, 3)  # (a, b, i, j)
        value, inner = _block_assignments(np.ascontiguousarray(view))
        total = value if total is None else total + value
        inners.append(inner)
    assert total is not None and h is not None
    if outer_similarity is not None:
        o = _as_float64(outer_similarity)
        if o.shape != (h, h):
            raise RebasinError(f"structured assignment of {name!r}: the outer similarity has shape {o.shape}, "
                               f"expected {(h, h)}")
        total = total + o
    if not np.isfinite(total).all():
        raise RebasinError(f"the similarity matrices of {name!r} contain NaN or inf; the weights are too large "
                           "for float32 products — rescale them")
    outer = solve_cost(-total, name=name)
    rows = np.arange(h)
    return StructuredAssignment(outer, [inner[rows, outer] for inner in inners], float(total[rows, outer].sum()))


def _as_float64(s: np.ndarray | Tensor) -> np.ndarray:
    if isinstance(s, Tensor):
        return s.detach().to("cpu", torch.float64).numpy()
    return np.asarray(s, dtype=np.float64)
