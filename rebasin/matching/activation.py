"""Activation matching (Ainsworth et al. 2023, section 3.1).

Run both models over the same data and pair each hidden unit of A with the unit of B whose
activations correlate best with it: one linear assignment per permutation on the matrix of
cross-correlations. The statistics are streamed over the loader in float64, so any number of
batches fits in memory; only an ``n × n`` cross-moment per permutation is kept.

Which activations belong to which permutation comes from :func:`rebasin.trace.trace_model`: for
every permutation, the fx nodes holding the features it acts on as the next weighted layers consume
them (post-activation values). A residual stream is read at several nodes; their statistics are
pooled into one correlation matrix, hence one assignment for the whole stream. The units inside
``nn.MultiheadAttention`` and the ``nn.Transformer*`` layers (which the trace keeps whole) are recomputed from
those modules' inputs: query/key and value units per head, the attention output before ``out_proj``, the
feed-forward units and the residual stream between sublayers.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .._common import State
from .._distributed import reducer
from ..spec.core import PermutationSpec
from ._activation_stats import collect, correlation_from_moments, solve_units

__all__ = [
    "activation_matching",
    "activation_correlations",
    "correlation_from_moments",
    "ActivationMatchingInfo",
]


# ---------------------------------------------------------------------------------------- public
@dataclass(frozen=True)
class ActivationMatchingInfo:
    """Diagnostics of :func:`activation_matching`.

    Attributes
    ----------
    corr_before
        ``{perm: mean_i corr(a_i, b_i)}``: mean correlation of the unaligned unit pairs.
    corr_after
        ``{perm: mean_i corr(a_i, b_{perm[i]})}``: mean correlation of the matched pairs.
    num_samples
        ``{perm: N}``: activation samples pooled per permutation (batch × spatial positions ×
        number of nodes of the stream).
    num_batches
        Batches read from the loader.
    """

    corr_before: dict[str, float]
    corr_after: dict[str, float]
    num_samples: dict[str, int]
    num_batches: int


def activation_correlations(
    model_a: nn.Module,
    model_b: nn.Module,
    loader: Iterable[Any],
    *,
    spec: PermutationSpec | None = None,
    example_input: Any = None,
    max_batches: int | None = None,
    device: Any = None,
    eps: float = 1e-8,
    state_a: State | None = None,
    state_b: State | None = None,
    sync: bool = True,
    group: Any = None,
) -> dict[str, Tensor]:
    """Cross-correlation of A's and B's hidden units, one matrix per permutation.

    Same arguments as :func:`activation_matching`.

    Returns
    -------
    dict
        ``{perm: (n, n) float64 Tensor}`` with ``corr[i, j]`` the Pearson correlation of A's unit
        ``i`` with B's unit ``j`` over every sample (and every spatial position, and every node of
        a residual stream). Dead units (std < ``eps``) have correlation 0, never NaN.

    Examples
    --------
    >>> corr = activation_correlations(model_a, model_b, loader)  # doctest: +SKIP
    >>> corr["P0"].diagonal().mean()                              # doctest: +SKIP
    """
    _, moments, _ = collect(
        model_a, model_b, loader, spec=spec, example_input=example_input, max_batches=max_batches, device=device,
        state_a=state_a, state_b=state_b, red=reducer(sync, group),
    )
    return {name: m.correlation(eps) for name, m in moments.items()}


def activation_matching(
    model_a: nn.Module,
    model_b: nn.Module,
    loader: Iterable[Any],
    *,
    spec: PermutationSpec | None = None,
    example_input: Any = None,
    max_batches: int | None = None,
    device: Any = None,
    eps: float = 1e-8,
    return_info: bool = False,
    state_a: State | None = None,
    state_b: State | None = None,
    sync: bool = True,
    group: Any = None,
) -> dict[str, Tensor] | tuple[dict[str, Tensor], ActivationMatchingInfo]:
    r"""Match B's hidden units to A's by the correlation of their activations.

    For each permutation :math:`P` with activations :math:`a_i, b_j` (features on the axis :math:`P`
    acts on, every other axis flattened into samples) solve

    .. math::

        \pi_P = \arg\max_{\pi} \sum_i \operatorname{corr}(a_i, b_{\pi(i)})

    by linear assignment. Statistics are streamed in float64; each permutation is solved on its own
    (no coordinate descent is needed: the activations of A and B do not depend on ``π``). Structured
    permutations (``spec.structure``: heads, groups) are solved together per outer permutation by
    :func:`rebasin.matching.assignment.structured_assignment` on their correlation matrices (value of
    pairing block ``a`` with block ``b`` = the best within-block assignment), so the result respects
    the structure. Inside ``nn.MultiheadAttention`` and the ``nn.Transformer*`` layers (kept whole by the
    trace) the units are recomputed from the modules' inputs and the state's weights: the query/key
    class pools the q and k projections, the value class the v projection and the attention output
    before ``out_proj``; heads and the units inside them are then matched by the structured assignment.
    A permutation that acts only inside concatenations of another layer kept whole (LSTM gates) has no
    activations of its own; such a spec raises :class:`RebasinError` (use weight matching).

    Parameters
    ----------
    model_a, model_b
        Two models of the same architecture. Run in eval mode on their own state_dicts through the
        traced graph; neither is modified (no hooks, no mode change).
    loader
        Iterable of batches ``(x, y, ...)`` or ``x``. Only ``x`` is used; both models see the same
        batches in the same order.
    spec
        The permutation spec. ``model_a`` is traced either way (for the activation nodes); the
        traced spec is used when ``spec`` is None.
    example_input
        Input for tracing; default: the first two samples of the first batch.
    max_batches
        Read at most this many batches (default: the whole loader).
    device
        Where to run. Default: the models' device (they must share one). When given, the models'
        state_dicts are copied there; the models themselves are not moved.
    eps
        Units whose activation std is below ``eps`` are treated as dead: correlation 0.
    return_info
        Also return an :class:`ActivationMatchingInfo`.
    state_a, state_b
        Run these state_dicts (parameters and buffers) instead of the models' own; the models are then only
        the architecture (``model_b`` only has to have the same keys and shapes). Nothing is copied into a
        module: the states go straight through the traced graph.
    sync, group
        Under ``torch.distributed`` (an initialised process group and ``sync=True``, the default) the
        moments are summed over the ranks of ``group`` (None: the default group), so the correlations are
        those of the union of the shards, and the permutations are decided once and broadcast from the
        group's first rank. ``max_batches`` counts per rank. ``sync=False``: this process's data only.
        See docs/distributed.md.

    Returns
    -------
    dict or (dict, ActivationMatchingInfo)
        ``{perm: LongTensor (n,)}`` (CPU) with ``permute(spec, perms, state_b) ≈ state_a``:
        ``perms[P][i]`` is the unit of B matched to A's unit ``i``.

    Raises
    ------
    RebasinError
        Models on different devices (without ``device=``), different architectures, an empty
        loader, or a spec that does not fit the traced model.

    Examples
    --------
    >>> import copy
    >>> from rebasin import permute, random_permutation
    >>> from rebasin.apps.models import MLP
    >>> from rebasin.trace import spec_from_model
    >>> _ = torch.manual_seed(0)
    >>> model_a, x = MLP(4, [8], 2), torch.randn(64, 4)
    >>> spec = spec_from_model(model_a, x[:2])
    >>> model_b = copy.deepcopy(model_a)  # B: A with its hidden units shuffled
    >>> model_b.load_state_dict(permute(spec, random_permutation(spec, seed=1), model_a.state_dict()))
    <All keys matched successfully>
    >>> perms = activation_matching(model_a, model_b, [x[:32], x[32:]], spec=spec)
    >>> aligned = permute(spec, perms, model_b.state_dict())
    >>> all(torch.equal(aligned[k], v) for k, v in model_a.state_dict().items())
    True

    References
    ----------
    Ainsworth, Hayase, Srinivasa. Git Re-Basin: Merging Models modulo Permutation Symmetries.
    ICLR 2023, section 3.1.
    """
    red = reducer(sync, group)
    spec, moments, num_batches = collect(
        model_a, model_b, loader, spec=spec, example_input=example_input, max_batches=max_batches, device=device,
        state_a=state_a, state_b=state_b, red=red,
    )
    perms: dict[str, Tensor] = {}
    before: dict[str, float] = {}
    after: dict[str, float] = {}
    corrs = {name: m.correlation(eps) for name, m in moments.items()}
    solved = solve_units(spec, corrs)
    for name, m in moments.items():
        corr = corrs[name]
        perm = solved[name]
        perms[name] = perm
        idx = torch.arange(m.n, device=corr.device)
        before[name] = float(corr.diagonal().mean())
        after[name] = float(corr[idx, perm.to(corr.device)].mean())
    if red is not None:  # decided once: every rank holds the first rank's permutations
        perms = red.broadcast(perms)
    if not return_info:
        return perms
    info = ActivationMatchingInfo(
        corr_before=before,
        corr_after=after,
        num_samples={name: m.count for name, m in moments.items()},
        num_batches=num_batches,
    )
    return perms, info
