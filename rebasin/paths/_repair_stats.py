"""REPAIR, part 1: which layers produce permuted channels, and the statistics of their outputs.

A **producer** is a module whose registered layer rule (:func:`rebasin.register_module`) declares
``"weight"`` with the ``"out"`` role on axis 0 — ``nn.Linear``, ``nn.Conv{1,2,3}d``, or a user's
layer registered the same way — or on axis 1 of a 2-D weight stored transposed (``transformers``'
``Conv1D`` of GPT-2), and whose weight's output axis carries a permutation of the spec
(structured or not: a grouped convolution's output channels are corrected one by one like any other)
or a concatenation of them (a packed projection). A producer is BatchNorm-normalised when a
BatchNorm carries its permutation, directly or as a part of a concatenation (a BatchNorm after
``torch.cat``).
Its output features are slices of ``weight`` along that axis (plus ``bias``), so REPAIR can fold a per-channel affine
correction into them (:mod:`rebasin.paths._repair_math`). The statistics are taken on the producer's
output along the rule's ``feature_dim``.

:func:`collect` is the one loop that measures them: forward hooks on the producers, one pass over
the loader per batch and state, per-channel float64 moments (and, for the closed form, the cross
moments of every pair of states); optionally stopping each forward pass right after one layer.
Every call of a producer within a forward pass counts.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from .._common import State, check_int, forward_with_state, split_batch, to_device
from .._distributed import Reducer, fingerprint, guarded
from .._errors import RebasinError
from ..spec.core import PermutationSpec
from ..trace.registry import module_rule

__all__ = ["Producer", "producers", "ChannelStats", "Moments", "Collected", "collect", "check_max_batches"]


@dataclass(frozen=True)
class Producer:
    """A module whose output channels carry permutation ``perm`` (see the module docstring)."""

    name: str  # module name
    perm: str
    weight_key: str
    bias_key: str | None
    channel_dim: int  # the rule's feature_dim: -1 for Linear, -(d+1) for Conv{d}d
    out_axis: int = 0  # the weight's output axis: 0, or 1 for a transposed 2-D weight (Conv1D)


def _prefix(name: str) -> str:
    return f"{name}." if name else ""


def producers(model: nn.Module, spec: PermutationSpec) -> tuple[list[Producer], list[Producer], set[str]]:
    """``(uncorrected producers, BN-normalised producers, names of BN modules)`` in module order.

    A producer's permutation is "BN-normalised" when a BatchNorm's parameters or buffers carry it:
    resetting that BatchNorm's statistics repairs its channels.
    """
    modules = dict(model.named_modules())
    bn_perms: set[str] = set()
    bns: set[str] = set()
    for name, m in modules.items():
        if isinstance(m, _BatchNorm):
            bns.add(name)
            for suffix in ("weight", "bias", "running_mean", "running_var"):
                axes = spec.axes.get(_prefix(name) + suffix)
                if axes and axes[0] is not None:
                    # a BatchNorm after torch.cat normalises the channels of every part's producer
                    parts = spec.concat.get(axes[0], ())
                    bn_perms.update([axes[0]] + [q for q, _ in parts if q is not None])
    plain: list[Producer] = []
    normed: list[Producer] = []
    for name, m in modules.items():
        rule = module_rule(m)
        out = rule.role_axis("weight", "out") if rule is not None else None
        wkey = _prefix(name) + "weight"
        axes = spec.axes.get(wkey)
        if rule is None or not axes or not (out == 0 or (out == 1 and len(axes) == 2)):
            continue
        perm = axes[out]
        if perm is None:
            continue
        has_bias = rule.role_axis("bias", "out") == 0 and getattr(m, "bias", None) is not None
        prod = Producer(name, perm, wkey, _prefix(name) + "bias" if has_bias else None, rule.feature_dim, out)
        (normed if _normalised(spec, perm, bn_perms) else plain).append(prod)
    return plain, normed, bns


def _normalised(spec: PermutationSpec, name: str, bn_perms: set[str]) -> bool:
    """Whether every channel of an axis carrying ``name`` (a permutation or a concatenation) is BN-normalised."""
    if name in bn_perms:
        return True
    parts = spec.concat.get(name)
    return bool(parts) and all(q is not None and q in bn_perms for q, _ in parts)  # type: ignore[union-attr]  # Optional narrowed by earlier logic mypy cannot follow


@dataclass(frozen=True)
class ChannelStats:
    """Per-channel mean and standard deviation of one layer's outputs (float64, shape ``(C,)``)."""

    mean: Tensor
    std: Tensor


class Moments:
    """Streaming per-channel sum / sum of squares in float64 (population statistics)."""

    def __init__(self) -> None:
        self.s1: Tensor | None = None
        self.s2: Tensor | None = None
        self.n = 0

    def add(self, rows: Tensor) -> None:
        # rows: (M, C) float64
        s1, s2 = rows.sum(0), (rows * rows).sum(0)
        if self.s1 is None:
            self.s1, self.s2 = s1, s2
        else:
            self.s1 += s1
            self.s2 += s2  # type: ignore[operator]  # s2 is set together with s1 by the first batch
        self.n += rows.shape[0]

    def stats(self) -> ChannelStats:
        if self.s1 is None or self.s2 is None:
            raise RebasinError("internal error: statistics of a layer that produced no outputs")
        mean = self.s1 / self.n
        var = (self.s2 / self.n - mean * mean).clamp_min(0.0)
        return ChannelStats(mean, var.sqrt())


def _rows(y: Tensor, dim: int) -> Tensor:
    """Layer output -> ``(M, C)`` float64 with the channel axis last."""
    y = y.detach().to(torch.float64)
    if dim != -1 and y.ndim > 1:
        y = y.movedim(dim, -1)
    return y.reshape(-1, y.shape[-1])


class _Stop(Exception):
    """Raised by a hook to end a forward pass early (nothing after the measured layer is needed)."""


def check_max_batches(max_batches: int | None) -> None:
    if max_batches is not None:
        check_int(max_batches, "max_batches (or None)")


def _inputs(loader: Iterable[Any], max_batches: int | None) -> Iterable[Any]:
    for i, batch in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            return
        x, _ = split_batch(batch)
        yield x


@dataclass
class Collected:
    """What :func:`collect` measured.

    Attributes
    ----------
    order
        Producer names in the order the forward pass first called them.
    stats
        Per state, ``{producer name: ChannelStats}``.
    count
        ``{producer name: number of rows}`` (positions x samples) per state.
    cross
        ``{producer name: {(i, j): E[a_i a_j]}}`` for every pair ``i < j`` of states (per channel),
        or None when not requested.
    """

    order: list[str]
    stats: list[dict[str, ChannelStats]]
    count: dict[str, int]
    cross: dict[str, dict[tuple[int, int], Tensor]] | None


def collect(
    model: nn.Module,
    states: Sequence[State],
    prods: Sequence[Producer],
    loader: Iterable[Any],
    *,
    max_batches: int | None,
    device: torch.device,
    what: str,
    cross: bool = False,
    stop_after: str | None = None,
    require_all: bool = True,
    red: Reducer | None = None,
) -> Collected:
    """Per-channel statistics of every producer's output, for each state, over ``loader`` (eval mode).

    ``stop_after`` ends each forward pass at the first call of that producer. ``what`` names the
    caller in errors: no batches, or (with ``require_all``) a producer the forward pass never called;
    without ``require_all`` such producers are left out of the result. With a reducer ``red``
    the sums, sums of squares, cross sums and row counts are added over its ranks first.
    """
    modules = dict(model.named_modules())
    moments = [{p.name: Moments() for p in prods} for _ in states]
    pair_sums: dict[str, dict[tuple[int, int], Tensor]] = {p.name: {} for p in prods}
    calls: dict[str, list[Tensor]] = {}
    order: list[str] = []

    def hook_for(p: Producer) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, out: Tensor) -> None:
            calls.setdefault(p.name, []).append(_rows(out, p.channel_dim))
            if p.name not in order:
                order.append(p.name)
            if p.name == stop_after:
                raise _Stop

        return hook

    handles = [modules[p.name].register_forward_hook(hook_for(p)) for p in prods]
    works = [{k: v.to(device) for k, v in s.items()} for s in states]
    n_batches = 0
    with guarded(red, what) as outcome:
        try:
            with torch.no_grad():
                for x in _inputs(loader, max_batches):
                    x = to_device(x, device)
                    outs = []
                    for i, work in enumerate(works):
                        calls.clear()
                        try:
                            forward_with_state(model, work, x, eval_mode=True)
                        except _Stop:
                            pass
                        outs.append(dict(calls))
                        for name, rows in calls.items():
                            for r in rows:
                                moments[i][name].add(r)
                    if cross:
                        _add_cross(pair_sums, outs)
                    n_batches += 1
        finally:
            for h in handles:
                h.remove()
        if n_batches == 0 and red is None:
            raise RebasinError(f"{what}: the loader yielded no batches")
        outcome.count = n_batches
        outcome.key = fingerprint(states, [p.name for p in prods], order, cross)
    if red is not None:
        _reduce(red, moments, pair_sums, order)
    missing = [p.name for p in prods if p.name not in order]
    if missing and require_all:
        raise RebasinError(
            f"{what}: the producing layers {missing} were never called by the forward pass (a parent module that "
            "uses their weights directly, as nn.MultiheadAttention does with out_proj, cannot be REPAIRed this way; "
            "merge or interpolate without REPAIR there)")
    count = {name: moments[0][name].n for name in order}
    return Collected(
        order=order,
        stats=[{name: m[name].stats() for name in order} for m in moments],
        count=count,
        cross={name: {k: v / count[name] for k, v in pair_sums[name].items()} for name in order} if cross else None,
    )


def _reduce(
    red: Reducer,
    moments: list[dict[str, Moments]],
    pair_sums: dict[str, dict[tuple[int, int], Tensor]],
    order: list[str],
) -> None:
    """Replace every rank's sums by their totals over the ranks (one collective; ranks agree on ``order``)."""
    flat: list[Tensor] = []
    for m in moments:
        for name in order:
            flat += [m[name].s1, m[name].s2, torch.tensor([float(m[name].n)], dtype=torch.float64)]  # type: ignore[list-item]  # s1 and s2 are set once a batch has been seen
    pairs = [(name, k) for name in order for k in sorted(pair_sums[name])]
    flat += [pair_sums[name][k] for name, k in pairs]
    total = iter(red.sum(flat))
    for m in moments:
        for name in order:
            m[name].s1, m[name].s2, n = next(total), next(total), next(total)
            m[name].n = int(n.item())
    for name, k in pairs:
        pair_sums[name][k] = next(total)


def _add_cross(pair_sums: dict[str, dict[tuple[int, int], Tensor]], outs: list[dict[str, list[Tensor]]]) -> None:
    """Accumulate ``sum a_i a_j`` over rows for every pair of states (call ``k`` of one with call ``k`` of the other)."""
    for name in outs[0]:
        for i in range(len(outs)):
            for j in range(i + 1, len(outs)):
                for ri, rj in zip(outs[i][name], outs[j][name]):
                    prod = (ri * rj).sum(0)
                    acc = pair_sums[name].get((i, j))
                    pair_sums[name][(i, j)] = prod if acc is None else acc + prod
