"""Activation statistics of two models over a loader, shared by the activation matchers.

:func:`collect` runs both models over the same batches through the traced graph and streams, per class of
the spec, float64 first and second moments of the paired activations (:class:`Moments`). Which activations
belong to which class comes from :func:`rebasin.trace.trace_model` (the graph nodes holding its features as
the next weighted layers consume them) and, for the units inside modules the trace keeps whole
(``nn.MultiheadAttention``, the ``nn.Transformer*`` layers), from :mod:`._inner_activations`. A class read
at several places (a residual stream) pools all of them.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .._common import State, check_int, head, model_device, paired_states, resolve_device, split_batch, to_device
from .._distributed import Reducer, fingerprint, guarded
from .._errors import RebasinError
from ..spec.core import PermutationSpec, join_structured
from ..trace.tracing import trace_model
from ._inner_activations import InnerProbe, inner_probes
from .assignment import linear_assignment, structured_assignment

__all__ = ["Moments", "correlation_from_moments", "collect", "solve_units"]


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
class Moments:
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

    def raw_cross(self) -> Tensor:
        """``(n, n)`` float64 uncentred cross moment ``Σ a bᵀ`` over the samples (no shift, no mean removed)."""
        if self.shift_a is None or self.shift_b is None:
            return self.cross.clone()
        return (self.cross + torch.outer(self.sum_a, self.shift_b) + torch.outer(self.shift_a, self.sum_b)
                + self.count * torch.outer(self.shift_a, self.shift_b))

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


def _concat_only_error(spec: PermutationSpec, name: str) -> RebasinError:
    """The refusal of a permutation that acts only inside concatenations and has no activation node."""
    inside = sorted(c for c, parts in spec.concat.items() if any(q == name for q, _ in parts))
    return RebasinError(
        f"activation matching cannot collect the activations of permutation {name!r}: it acts only "
        f"inside the concatenation(s) {inside} (packed projections such as q;k;v, torch.cat, recurrent "
        "gates) of a layer the trace keeps whole and whose inner units activation matching cannot "
        "recompute (nn.LSTM/GRU/RNN, a registered rule of your own), so no graph node outputs its units. "
        "Use weight_matching (method='weight_matching') or ste_matching for this spec"
    )


def _activation_sources(
    spec: PermutationSpec, traced: PermutationSpec, found: Mapping[str, list[tuple[str, int]]], probed: set[str]
) -> tuple[dict[str, list[tuple[str, int]]], dict[str, list[str]]]:
    """Activation nodes of each permutation of ``spec``, and the permutations of ``spec`` each traced one feeds.

    The two specs may name their permutations differently (a hand-written spec): a permutation of
    ``spec`` gets the nodes of every traced permutation acting on one of the same (key, axis) pairs, and
    the inner activations (``probed``: traced permutations some :class:`InnerProbe` emits) of those.
    """
    owner = {o[:3]: p for p, occ in traced.occurrences.items() for o in occ}
    out: dict[str, list[tuple[str, int]]] = {}
    feeds: dict[str, list[str]] = {}
    for name, occ in spec.occurrences.items():
        where = [o[:2] for o in occ]
        traced_names = sorted({owner[o[:3]] for o in occ if o[:3] in owner})
        nodes = list(dict.fromkeys(n for t in traced_names for n in found.get(t, ())))
        inner = [t for t in traced_names if t in probed]
        for t in inner:
            feeds.setdefault(t, []).append(name)
        if not nodes and not inner and not spec.perm_to_axes.get(name):
            raise _concat_only_error(spec, name)
        if not nodes and not inner:
            raise RebasinError(
                f"no activation node was found for permutation {name!r} (it acts on {list(where)[:4]}): "
                f"tracing the model gave no permutation on those axes; check the spec against "
                "rebasin.spec_from_model(model, example_input) or leave spec=None; if the spec is right, use "
                "weight_matching (method='weight_matching'), which needs no activations"
            )
        out[name] = nodes
    return out, feeds


def _inner(probes: list[InnerProbe], state: Mapping[str, Tensor], acts: Mapping[str, Tensor]) -> dict[str, list[Tensor]]:
    """``{traced perm: [features-last activations, ...]}`` of every probe, in a fixed order."""
    out: dict[str, list[Tensor]] = {}
    for probe in probes:
        probe.run(state, acts, lambda p, x: out.setdefault(p, []).append(x.detach()))
    return out


def collect(
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
) -> tuple[PermutationSpec, dict[str, Moments], int]:
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
) -> tuple[PermutationSpec, dict[str, Moments], int]:
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
    probes = inner_probes(trace)
    probed = {p for probe in probes for p in probe.perms}
    nodes, feeds = _activation_sources(spec, trace.spec, trace.activation_nodes, probed)
    probes = [probe for probe in probes if probe.perms & set(feeds)]
    wanted = sorted({node for found in nodes.values() for node, _ in found}
                    | {name for probe in probes for name in probe.inputs})
    moments = {name: Moments(sizes[name], dev) for name in spec.perms}
    num_batches = 0
    for batch in _batches(first, rest, max_batches):
        x = to_device(split_batch(batch)[0], dev)
        if not wanted:  # a spec without permutations: nothing to capture
            num_batches += 1
            continue
        with torch.no_grad():
            acts_a = trace.capture(state_a, x, wanted, train=False)
            acts_b = trace.capture(state_b, x, wanted, train=False)
            inner_a, inner_b = _inner(probes, state_a, acts_a), _inner(probes, state_b, acts_b)
        pairs: list[tuple[str, str, Tensor, Tensor, int]] = [
            (name, repr(node), acts_a[node], acts_b[node], axis) for name, found in nodes.items() for node, axis in found]
        pairs += [(name, f"inside the module of traced class {t!r}", fa, fb, fa.ndim - 1)
                  for t, names in feeds.items() for name in names for fa, fb in zip(inner_a.get(t, ()), inner_b.get(t, ()))]
        for name, where, fa, fb, axis in pairs:
            n = sizes[name]
            if fa.shape[axis] != n:
                raise RebasinError(
                    f"activation node {where} has {fa.shape[axis]} features on axis {axis} "
                    f"(shape {tuple(fa.shape)}) but permutation {name!r} has size {n}"
                )
            moments[name].update(
                torch.movedim(fa.detach(), axis, 0).reshape(n, -1),
                torch.movedim(fb.detach(), axis, 0).reshape(n, -1),
            )
        num_batches += 1
    return spec, moments, num_batches


def solve_units(spec: PermutationSpec, corrs: Mapping[str, Tensor]) -> dict[str, Tensor]:
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
