r"""Optimal-transport neuron matching (Anokhin & Yarotsky, ICML 2020).

Neuron matching by exact optimal transport between the empirical distributions of the two networks'
neuron weight vectors, layer by layer in network order: with uniform weights on ``n`` neurons per side
the transport plan is a permutation, found by a linear assignment on squared distances between each
neuron's incoming weights (its bias and norm parameters included), after the previous layer's matching
has been applied to B's inputs.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from .._errors import RebasinError
from ..spec.core import PermutationSpec, block_index
from .assignment import solve_cost

__all__ = ["ot_matching"]

State = Mapping[str, Tensor]


def _ot_order(spec: PermutationSpec) -> list[str]:
    """Permutations in network order: topological on "P's rows read columns of Q", greedy on cycles.

    Rank of a permutation = index of the first state_dict key whose axis 0 carries it (keys are in
    module order). Kahn's algorithm picks the lowest-ranked permutation whose dependencies are all
    solved; on a cycle (residual streams) it takes the lowest-ranked remaining one.
    """
    rank: dict[str, int] = {}
    for i, axes in enumerate(spec.axes.values()):
        if axes and axes[0] is not None:
            rank.setdefault(axes[0], i)
    for j, p in enumerate(spec.perms):
        rank.setdefault(p, len(spec.axes) + j)
    deps: dict[str, set[str]] = {p: set() for p in spec.perms}
    for axes in spec.axes.values():
        if axes and axes[0] is not None:
            deps[axes[0]].update(q for q in axes[1:] if q is not None and q != axes[0])
    remaining = sorted(spec.perms, key=rank.__getitem__)
    order: list[str] = []
    while remaining:
        done = set(order)
        ready = [p for p in remaining if deps[p] <= done]
        nxt = ready[0] if ready else remaining[0]
        order.append(nxt)
        remaining.remove(nxt)
    return order


def _neuron_rows(
    spec: PermutationSpec, key: str, axis: int, t: Tensor, n: int, solved: Mapping[str, Tensor] | None, done: set[str]
) -> Tensor:
    """``t`` as ``(n, d)`` float64 rows along ``axis``, other axes made comparable between A and B.

    Axes of solved permutations are permuted (B only: ``solved`` is None for A); axes of unsolved
    ones are sorted (per block offset), a permutation-invariant summary of those coordinates.
    """
    t = t.detach().to(torch.float64)
    for i, q in enumerate(spec.axes[key]):
        if i == axis or q is None:
            continue
        k = spec.blocks.get((key, i), 1)
        if q in done:
            if solved is not None:
                t = t.index_select(i, block_index(solved[q], k).to(t.device))
        else:
            shape = t.shape
            blocked = t.reshape(*shape[:i], shape[i] // k, k, *shape[i + 1 :])
            t = blocked.sort(dim=i).values.reshape(shape)
    return t.movedim(axis, 0).reshape(n, -1)


def _refuse_structure(spec: PermutationSpec) -> None:
    """OT matches one permutation at a time in network order; structured specs need joint solves it does not do.

    Heads/groups (``structure``) tie permutations of different layers (q/k and v/o) to one outer
    permutation, and a permutation used only inside a concatenation has no rows of its own to
    transport, so rather than return permutations that break the structure (or silently leave the
    identity) it refuses.
    """
    what = []
    if spec.structure:
        what.append(f"structured permutations (heads/groups) {sorted(spec.structure)}")
    if spec.concat:
        what.append(f"concatenations {sorted(spec.concat)}")
    if spec.grouped:
        what.append(f"grouped axes {sorted(spec.grouped)}")
    if spec.block_inner:
        what.append(f"block_inner axes {sorted(spec.block_inner)} (grouped-query attention's value units)")
    if what:
        raise RebasinError(
            "ot_matching does not support " + " and ".join(what) + ": it matches one permutation at a time "
            "in network order and cannot keep heads/groups together or transport units that only appear inside "
            "a concatenation. Use weight_matching (or activation_matching for heads/groups) for this spec"
        )


def ot_matching(
    spec: PermutationSpec,
    state_a: State,
    state_b: State,
    *,
    use_outgoing: bool = False,
    device: torch.device | str | None = None,
) -> dict[str, Tensor]:
    r"""Neuron matching by exact optimal transport between neuron weight distributions.

    Anokhin & Yarotsky (2020) view a layer as the empirical distribution
    :math:`\frac1n \sum_i \delta_{w_i}` of its neurons' weight vectors. Between two such
    distributions with uniform weights and equal counts the optimal transport plan for the
    squared Euclidean cost is a permutation (Birkhoff), found by a linear assignment:

    .. math:: \pi_P = \arg\min_{\pi} \sum_i \lVert a_i - b_{\pi(i)} \rVert^2 .

    The permutations are solved one at a time in network order (topological order of "the rows
    of permutation ``P`` read the columns of ``Q``"): the weight vector of neuron ``i`` of ``P``
    concatenates slice ``i`` along axis 0 of every floating tensor whose axis 0 carries ``P``
    (weight rows, bias, norm affine, BatchNorm running statistics; a residual stream stacks all of
    them), with the other axes of B already permuted by the permutations solved before. Greedy,
    one pass. Axes of still-unsolved permutations (only on cycles, i.e. residual streams, or with
    ``use_outgoing``) cannot be aligned yet; they are *sorted* in both A and B, which keeps the
    per-neuron distribution of those coordinates and is invariant to the unknown permutation.

    Parameters
    ----------
    spec
        Permutation spec of the architecture (any spec from :func:`rebasin.spec_from_model`:
        MLP, VGG, ResNet; ``spec.blocks`` is honoured).
    state_a, state_b
        Full state_dicts of two networks of the architecture (finite). Not mutated.
    use_outgoing
        Also append each neuron's outgoing weights (its slices along every non-zero axis
        carrying ``P``, e.g. the columns of the next layer). A permutation that never appears on
        axis 0 always uses them.
    device
        Where the distances are computed; default: where ``state_a``'s tensors are. The permutations
        come back on the CPU either way.

    Returns
    -------
    dict[str, Tensor]
        ``{perm: int64 CPU tensor (n,)}`` for every permutation of the spec, mapping B onto A:
        ``permute(spec, perms, state_b)`` is close to ``state_a``.

    Raises
    ------
    RebasinError
        If the states do not fit the spec or each other, or contain NaN / inf, or the spec has
        structured permutations, concatenations or grouped axes (``spec.structure``, ``spec.concat``,
        ``spec.grouped``): OT solves one permutation at a time and would break heads/groups, so it
        refuses them (one permutation on two axes, ``P W P^T``, is supported).

    Examples
    --------
    >>> import torch
    >>> from rebasin import PermutationSpec, permute, random_permutation
    >>> spec = PermutationSpec({"w1": ("P", None), "w2": (None, "P")})
    >>> a = {"w1": torch.randn(5, 3), "w2": torch.randn(2, 5)}
    >>> b = permute(spec, random_permutation(spec, seed=1, sizes={"P": 5}), a)
    >>> perms = ot_matching(spec, a, b)
    >>> torch.equal(permute(spec, perms, b)["w1"], a["w1"])
    True
    """
    if not isinstance(spec, PermutationSpec):
        raise RebasinError(f"spec must be a PermutationSpec, got {type(spec).__name__}")
    if not isinstance(use_outgoing, bool):
        raise RebasinError(f"use_outgoing must be a bool, got {use_outgoing!r}")
    _refuse_structure(spec)
    sizes = spec.validate_pair(state_a, state_b)
    if device is not None:
        state_a = {k: v.to(device) for k, v in state_a.items()}
        state_b = {k: v.to(device) for k, v in state_b.items()}
    solved: dict[str, Tensor] = {}
    for p in _ot_order(spec):
        n = sizes[p]
        where = [(k, ax) for k, ax in spec.perm_to_axes[p] if state_a[k].is_floating_point() and state_a[k].numel()]
        incoming = [(k, ax) for k, ax in where if ax == 0]
        terms = where if use_outgoing or not incoming else incoming
        if n <= 1 or not terms:
            solved[p] = torch.arange(n)
            continue
        done = set(solved)
        dev = state_a[terms[0][0]].device
        fa = torch.cat([_neuron_rows(spec, k, ax, state_a[k].to(dev), n, None, done) for k, ax in terms], dim=1)
        fb = torch.cat([_neuron_rows(spec, k, ax, state_b[k].to(dev), n, solved, done) for k, ax in terms], dim=1)
        cost = fa.pow(2).sum(1, keepdim=True) + fb.pow(2).sum(1)[None, :] - 2.0 * fa @ fb.T
        solved[p] = torch.from_numpy(solve_cost(cost.clamp_min_(0.0).cpu().numpy(), name=p))
    return {p: solved[p] for p in spec.perms}
