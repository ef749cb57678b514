"""Activation matching (Ainsworth et al. 2023, section 3.1).

Run both models over the same data and pair each hidden unit of A with the unit of B whose
activations correlate best with it: one linear assignment per permutation on the matrix of
cross-correlations. The statistics are streamed over the loader in float64, so any number of
batches fits in memory; only an ``n × n`` cross-moment per permutation is kept.

Which activations belong to which permutation comes from :func:`rebasin.trace.trace_model`: for
every permutation, the fx nodes holding the features it acts on as the next weighted layers consume
them (post-activation values). A residual stream is read at several nodes; their statistics are
pooled into one correlation matrix, hence one assignment for the whole stream.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .._common import State, check_int, head, model_device, paired_states, resolve_device, split_batch, to_device
from .._distributed import Reducer, fingerprint, guarded, reducer
from .._errors import RebasinError
from ..spec.core import PermutationSpec, join_structured
from ..trace.tracing import trace_model
from .assignment import linear_assignment, structured_assignment

__all__ = [
    "activation_matching",
    "activation_correlations",
    "correlation_from_moments",
    "ActivationMatchingInfo",
]


# ---------------------------------------------------------------------------------------- helpers
def _batches(first: Any, rest: Iterator[Any], max_batches: int | None) -> Iterator[Any]:
    """``first`` followed by ``rest``, at most ``max_batches`` in all."""
    yield first
    count = 1
    for batch in rest:
        if max_batches is not None and count >= max_batches:
            return
        yield batch
        count += 1


def _first_batch(loader: Iterable[Any]) -> tuple[Any, Iterator[Any]]:
    it = iter(loader)
    try:
        first = next(it)
    except StopIteration:
        raise RebasinError("the loader yielded no batch; activation statistics need data") from None
    return first, it


# ---------------------------------------------------------------------------------------- moments
class _Moments:
    """Streaming float64 first and second moments of paired features ``a`` and ``b``.

    Sums are taken of ``x - shift`` with ``shift`` the first batch's mean, which keeps the
    ``E[ab] - E[a]E[b]`` subtraction well conditioned (covariances are shift invariant).
    """

    def __init__(self, n: int, device: torch.device) -> None:
        kw: dict[str, Any] = {"dtype": torch.float64, "device": device}
        self.n = n
        self.count = 0
        self.shift_a: Tensor | None = None
        self.shift_b: Tensor | None = None
        self.sum_a = torch.zeros(n, **kw)
        self.sum_b = torch.zeros(n, **kw)
        self.sq_a = torch.zeros(n, **kw)
        self.sq_b = torch.zeros(n, **kw)
        self.cross = torch.zeros(n, n, **kw)

    def update(self, a: Tensor, b: Tensor) -> None:
        """Add samples: ``a`` and ``b`` of shape ``(n, samples)``."""
        a = a.to(self.cross.device, torch.float64)
        b = b.to(self.cross.device, torch.float64)
        if a.shape[1] == 0:
            return
        if self.shift_a is None:
            self.shift_a = a.mean(dim=1)
            self.shift_b = b.mean(dim=1)
        a = a - self.shift_a[:, None]
        b = b - self.shift_b[:, None]  # type: ignore[index]  # Optional narrowed by earlier logic mypy cannot follow
        self.count += a.shape[1]
        self.sum_a += a.sum(dim=1)
        self.sum_b += b.sum(dim=1)
        self.sq_a += (a * a).sum(dim=1)
        self.sq_b += (b * b).sum(dim=1)
        self.cross += a @ b.T

    def reduce(self, red: Reducer) -> None:
        """Replace the sums by their totals over ``red``'s ranks, re-centred on the ranks' mean shift.

        Each rank's sums are taken about its own shift ``s_r`` (its first batch's mean); they are moved
        to the common shift ``s`` (the mean of the ``s_r``) with ``Σ(x − s) = Σ(x − s_r) + k(s_r − s)`` and
        the matching identities for the squares and the cross products, then added.
        """
        n = self.n
        zero = torch.zeros(n, dtype=torch.float64, device=self.cross.device)
        sa = self.shift_a if self.shift_a is not None else zero
        sb = self.shift_b if self.shift_b is not None else zero
        has = 1.0 if self.shift_a is not None else 0.0
        total_sa, total_sb, ranks = red.sum([sa, sb, torch.tensor([has], dtype=torch.float64)])
        k = max(float(ranks.item()), 1.0)
        da, db = sa - total_sa / k, sb - total_sb / k  # s_r - s
        c = float(self.count)
        sum_a = self.sum_a + c * da
        sum_b = self.sum_b + c * db
        sq_a = self.sq_a + 2 * da * self.sum_a + c * da * da
        sq_b = self.sq_b + 2 * db * self.sum_b + c * db * db
        cross = self.cross + torch.outer(da, self.sum_b) + torch.outer(self.sum_a, db) + c * torch.outer(da, db)
        count = torch.tensor([c], dtype=torch.float64)
        self.sum_a, self.sum_b, self.sq_a, self.sq_b, self.cross, count = red.sum(
            [sum_a, sum_b, sq_a, sq_b, cross, count]
        )
        self.count = int(count.item())
        self.shift_a, self.shift_b = total_sa / k, total_sb / k

    def correlation(self, eps: float) -> Tensor:
        """``(n, n)`` float64 Pearson correlations ``corr[i, j] = corr(a_i, b_j)``."""
        if self.count == 0:
            raise RebasinError("no activation samples were collected (empty batches?)")
        return correlation_from_moments(
            self.count, self.sum_a, self.sum_b, self.sq_a, self.sq_b, self.cross, eps=eps
        )


def correlation_from_moments(
    count: int,
    sum_a: Tensor,
    sum_b: Tensor,
    sq_a: Tensor,
    sq_b: Tensor,
    cross: Tensor,
    *,
    eps: float = 1e-8,
) -> Tensor:
    """Pearson cross-correlations from raw moment sums, with dead units mapped to 0.

    Parameters
    ----------
    count
        Number of samples ``N`` summed.
    sum_a, sum_b
        ``(n,)`` sums ``Σ a_i`` and ``Σ b_j``.
    sq_a, sq_b
        ``(n,)`` sums of squares ``Σ a_i²`` and ``Σ b_j²``.
    cross
        ``(n, n)`` cross moments ``Σ a_i b_j``.
    eps
        A unit whose standard deviation is below ``eps`` is *dead*: its row (in A) or column
        (in B) of the result is 0 instead of NaN.

    Returns
    -------
    Tensor
        ``(n, n)`` in the inputs' dtype (float64 in :func:`activation_matching`),
        ``corr[i, j] = cov(a_i, b_j) / (std(a_i) std(b_j))``, clamped to ``[-1, 1]``.

    Examples
    --------
    >>> a = torch.tensor([[1., 2., 3.], [0., 0., 0.]], dtype=torch.float64)
    >>> c = correlation_from_moments(3, a.sum(1), a.sum(1), (a * a).sum(1), (a * a).sum(1), a @ a.T)
    >>> c.round(decimals=6)  # unit 1 of each side is dead: 0, not NaN
    tensor([[1., 0.],
            [0., 0.]], dtype=torch.float64)
    """
    mean_a, mean_b = sum_a / count, sum_b / count
    cov = cross / count - torch.outer(mean_a, mean_b)
    std_a = (sq_a / count - mean_a * mean_a).clamp_min(0).sqrt()
    std_b = (sq_b / count - mean_b * mean_b).clamp_min(0).sqrt()
    live_a, live_b = std_a >= eps, std_b >= eps
    inv_a = torch.where(live_a, 1.0 / torch.where(live_a, std_a, 1.0), 0.0)
    inv_b = torch.where(live_b, 1.0 / torch.where(live_b, std_b, 1.0), 0.0)
    return (cov * inv_a[:, None] * inv_b[None, :]).clamp(-1.0, 1.0)


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


def _concat_only_error(spec: PermutationSpec, name: str) -> RebasinError:
    """The refusal of a permutation that acts only inside concatenations and has no activation node."""
    inside = sorted(c for c, parts in spec.concat.items() if any(q == name for q, _ in parts))
    return RebasinError(
        f"activation matching cannot collect the activations of permutation {name!r}: it acts only "
        f"inside the concatenation(s) {inside} (packed projections such as attention's q;k;v, "
        "torch.cat, recurrent gates) of a layer the trace keeps whole (nn.MultiheadAttention, the "
        "nn.Transformer* layers, nn.LSTM/GRU/RNN), so no graph node outputs its units. Use weight_matching "
        "(method='weight_matching') or ste_matching for this spec"
    )


def _activation_nodes_for(
    spec: PermutationSpec, traced: PermutationSpec, found: Mapping[str, list[tuple[str, int]]]
) -> dict[str, list[tuple[str, int]]]:
    """Activation nodes of each permutation of ``spec``, found through the traced spec.

    The two specs may name their permutations differently (a hand-written spec): a permutation of
    ``spec`` gets the nodes of every traced permutation acting on one of the same (key, axis) pairs.
    """
    owner = {o[:3]: p for p, occ in traced.occurrences.items() for o in occ}
    out: dict[str, list[tuple[str, int]]] = {}
    for name, occ in spec.occurrences.items():
        where = [o[:2] for o in occ]
        traced_names = sorted({owner[o[:3]] for o in occ if o[:3] in owner})
        nodes = list(dict.fromkeys(n for t in traced_names for n in found.get(t, ())))
        if not nodes and not spec.perm_to_axes.get(name):
            raise _concat_only_error(spec, name)
        if not nodes:
            raise RebasinError(
                f"no activation node was found for permutation {name!r} (it acts on {list(where)[:4]}): "
                f"tracing the model gave no permutation on those axes; check the spec against "
                "rebasin.spec_from_model(model, example_input) or leave spec=None; if the spec is right, use "
                "weight_matching (method='weight_matching'), which needs no activations"
            )
        out[name] = nodes
    return out


def _collect(
    model_a: nn.Module,
    model_b: nn.Module,
    loader: Iterable[Any],
    *,
    spec: PermutationSpec | None,
    example_input: Any,
    max_batches: int | None,
    device: Any,
    state_a: State | None = None,
    state_b: State | None = None,
    red: Reducer | None = None,
) -> tuple[PermutationSpec, dict[str, _Moments], int]:
    if max_batches is not None:
        check_int(max_batches, "max_batches")
    with guarded(red, "activation statistics") as outcome:
        spec, moments, num_batches = _collect_local(
            model_a, model_b, loader, spec=spec, example_input=example_input, max_batches=max_batches,
            device=device, state_a=state_a, state_b=state_b,
        )
        outcome.count = num_batches
        outcome.key = fingerprint(spec.axes, {name: m.n for name, m in moments.items()})
    if red is not None:
        for name in sorted(moments):
            moments[name].reduce(red)
        (total,) = red.sum([torch.tensor([float(num_batches)], dtype=torch.float64)])
        num_batches = int(total.item())
    return spec, moments, num_batches


def _collect_local(
    model_a: nn.Module,
    model_b: nn.Module,
    loader: Iterable[Any],
    *,
    spec: PermutationSpec | None,
    example_input: Any,
    max_batches: int | None,
    device: Any,
    state_a: State | None,
    state_b: State | None,
) -> tuple[PermutationSpec, dict[str, _Moments], int]:
    dev = resolve_device(model_a, model_b, device=device)
    state_a, state_b = paired_states(model_a, model_b, dev, state_a=state_a, state_b=state_b)
    first, rest = _first_batch(loader)
    if example_input is None:
        example_input = head(split_batch(first)[0])
    example_input = to_device(example_input, model_device(model_a))
    try:
        trace = trace_model(model_a, example_input)
    except RebasinError as err:
        if spec is None:
            raise
        raise RebasinError(
            "activation matching traces model_a to find the activations of each permutation, even with a "
            f"hand-written spec, and tracing failed: {err} — with this spec use weight_matching "
            "(method='weight_matching') or ste_matching, which need no tracing"
        ) from err
    if spec is None:
        spec = trace.spec
    sizes = spec.validate_pair(state_a, state_b)
    nodes = _activation_nodes_for(spec, trace.spec, trace.activation_nodes)
    wanted = sorted({node for found in nodes.values() for node, _ in found})
    moments = {name: _Moments(sizes[name], dev) for name in spec.perms}
    num_batches = 0
    for batch in _batches(first, rest, max_batches):
        x = to_device(split_batch(batch)[0], dev)
        if not wanted:  # a spec without permutations: nothing to capture
            num_batches += 1
            continue
        with torch.no_grad():
            acts_a = trace.capture(state_a, x, wanted, train=False)
            acts_b = trace.capture(state_b, x, wanted, train=False)
        for name, found in nodes.items():
            for node, axis in found:
                fa, fb = acts_a[node], acts_b[node]
                if fa.shape[axis] != sizes[name]:
                    raise RebasinError(
                        f"activation node {node!r} has {fa.shape[axis]} features on axis {axis} "
                        f"(shape {tuple(fa.shape)}) but permutation {name!r} has size {sizes[name]}"
                    )
                n = sizes[name]
                moments[name].update(
                    torch.movedim(fa.detach(), axis, 0).reshape(n, -1),
                    torch.movedim(fb.detach(), axis, 0).reshape(n, -1),
                )
        num_batches += 1
    return spec, moments, num_batches


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
    _, moments, _ = _collect(
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
    the structure. A permutation that acts only inside concatenations (``spec.concat``: packed q;k;v,
    LSTM gates) has no activations of its own; such a spec raises :class:`RebasinError` (use weight
    matching).

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
    spec, moments, num_batches = _collect(
        model_a, model_b, loader, spec=spec, example_input=example_input, max_batches=max_batches, device=device,
        state_a=state_a, state_b=state_b, red=red,
    )
    perms: dict[str, Tensor] = {}
    before: dict[str, float] = {}
    after: dict[str, float] = {}
    corrs = {name: m.correlation(eps) for name, m in moments.items()}
    solved = _solve_units(spec, corrs)
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


def _solve_units(spec: PermutationSpec, corrs: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """One assignment per unit of the spec: a free permutation on its correlations, a structured unit
    (heads/groups sharing an outer permutation) by :func:`structured_assignment` on its members'
    correlations (plus the outer's own, when the outer acts on axes itself)."""
    out: dict[str, Tensor] = {}
    for unit in spec.units:
        members = [p for p in unit if p in spec.structure]
        if not members:
            out[unit[0]] = linear_assignment(corrs[unit[0]], name=unit[0])
            continue
        outer = spec.structure[members[0]][0]
        res = structured_assignment([corrs[m] for m in members], [spec.structure[m][1] for m in members],
                                    corrs.get(outer), name=outer)
        for m, inner in zip(members, res.inner):
            out[m] = join_structured(torch.from_numpy(res.outer), torch.from_numpy(inner))
        if outer in corrs:
            out[outer] = torch.from_numpy(res.outer.astype("int64"))
    return out
