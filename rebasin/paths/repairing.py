r"""REPAIR: fix the statistics of interpolated (or averaged) networks.

Averaging the weights of two aligned networks shrinks the variance of their hidden units
("variance collapse", Jordan et al. 2023): the interpolated net's channels have smaller spread
than either endpoint's, and the loss barrier is mostly that. REPAIR rescales and shifts every
permuted channel so that the interpolated net at ``t`` has the *interpolated* endpoint statistics

.. math::

    \mu_t = (1 - t)\,\mu_A + t\,\mu_B, \qquad \sigma_t = (1 - t)\,\sigma_A + t\,\sigma_B .

* Channels normalised by BatchNorm: resetting the running statistics of the interpolated net over
  the data (:func:`rebasin.reset_bn_stats`) is all that is needed.
* Channels without normalisation (and LayerNorm nets): the pre-activation outputs of every
  producing ``Linear`` / ``Conv`` layer (a layer whose output axis carries a permutation of the
  spec) are measured on the endpoints and on the interpolated net, and the affine correction
  ``y -> s * y + (mu_target - s * mu_actual)`` with ``s = sigma_target / sigma_actual`` is folded
  into that layer's weight and bias. Layers are corrected one by one in forward order, because
  correcting layer ``k`` changes the statistics of the layers after it.

Everything generalises from two endpoints at ``t`` to ``N`` endpoints with convex weights
``w_i`` (targets ``sum_i w_i mu_i`` and ``sum_i w_i sigma_i``), which :func:`rebasin.merge` uses.

Reference: K. Jordan, H. Sedghi, O. Saukh, R. Entezari, B. Neyshabur, "REPAIR: REnormalizing
Permuted Activations for Interpolation Repair", ICLR 2023.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from .._common import (
    check_float,
    check_same_layout,
    check_state_for_model,
    forward_with_state,
    module_with_state,
    resolve_device,
    split_batch,
    state_of,
    to_device,
)
from .._errors import RebasinError
from ..spec.core import PermutationSpec
from .linear import combine
from .running import reset_bn_stats

__all__ = [
    "reset_bn_stats_",
    "repair",
    "repair_states",
    "RepairedPath",
    "repaired_path",
    "channel_stats",
    "ChannelStats",
]

State = Mapping[str, Tensor]

# A channel whose measured std is below this (relative to its target std, or absolutely) is
# treated as dead: it is shifted to the target mean but not rescaled.
_DEAD_STD = 1e-8


# ----------------------------------------------------------------------------------------------
# BatchNorm


def reset_bn_stats_(
    model: nn.Module,
    loader: Iterable[Any],
    *,
    max_batches: int | None = None,
    device: torch.device | str | None = None,
) -> nn.Module:
    """Recompute ``model``'s BatchNorm running statistics over ``loader``, in place.

    The statistics are PyTorch's exact cumulative average (as with ``momentum=None``): the mean
    over batches of each batch's mean and unbiased variance of every BatchNorm input, computed in
    float64 with only the BatchNorm layers in training mode (dropout stays off), see
    :func:`rebasin.reset_bn_stats`. With one batch holding all the data (or equal batch
    means, for the mean) these are the exact full-data statistics. ``momentum`` and the
    ``training`` flags are left as they were.

    Parameters
    ----------
    model
        Mutated: only its BatchNorm ``running_mean``, ``running_var`` and
        ``num_batches_tracked`` buffers change (in place, keeping their dtype and device).
    loader
        Yields ``(inputs, targets)`` or bare inputs; targets are ignored.
    max_batches
        Use at most this many batches (all when None).
    device
        Where to run the forward passes; defaults to the model's device.

    Returns
    -------
    nn.Module
        ``model`` itself.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    >>> x = torch.randn(64, 3)
    >>> _ = reset_bn_stats_(model, [x])
    >>> torch.allclose(model[1].running_mean, model[0](x).mean(0).detach(), atol=1e-6)
    True
    """
    if loader is None:
        raise RebasinError("reset_bn_stats_ needs data: pass a loader of (inputs, targets) batches")
    new = reset_bn_stats(model, state_of(model), loader, max_batches=max_batches, device=device)
    buffers = dict(model.named_buffers())
    with torch.no_grad():
        for key, value in new.items():
            if key in buffers and value.data_ptr() != buffers[key].data_ptr():
                buffers[key].copy_(value)
    return model


# ----------------------------------------------------------------------------------------------
# which layers produce which permuted channels


@dataclass(frozen=True)
class _Producer:
    name: str  # module name
    perm: str
    weight_key: str
    bias_key: str | None
    channel_dim: int  # -1 for Linear, 1 for Conv


def _module_prefix(name: str) -> str:
    return f"{name}." if name else ""


def _analyse(model: nn.Module, spec: PermutationSpec) -> tuple[list[_Producer], list[_Producer], set[str]]:
    """``(uncorrected producers, BN-normalised producers, names of BN modules)``.

    A producer is a ``Linear`` / ``ConvNd`` whose weight's output axis carries a permutation of the
    spec. Its permutation is "BN-normalised" when a BatchNorm's parameters or buffers carry it.
    """
    modules = dict(model.named_modules())
    bn_perms: set[str] = set()
    bns: set[str] = set()
    for name, m in modules.items():
        if isinstance(m, _BatchNorm):
            bns.add(name)
            for suffix in ("weight", "bias", "running_mean", "running_var"):
                axes = spec.axes.get(_module_prefix(name) + suffix)
                if axes and axes[0] is not None:
                    bn_perms.add(axes[0])
    plain: list[_Producer] = []
    normed: list[_Producer] = []
    for name, m in modules.items():
        if isinstance(m, nn.Linear):
            dim = -1
        elif isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            dim = 1
        else:
            continue
        wkey = _module_prefix(name) + "weight"
        axes = spec.axes.get(wkey)
        if not axes or axes[0] is None:
            continue
        bkey = _module_prefix(name) + "bias"
        prod = _Producer(name, axes[0], wkey, bkey if getattr(m, "bias", None) is not None else None, dim)
        (normed if axes[0] in bn_perms else plain).append(prod)
    return plain, normed, bns


# ----------------------------------------------------------------------------------------------
# statistics of pre-activations


@dataclass(frozen=True)
class ChannelStats:
    """Per-channel mean and standard deviation of one layer's outputs (float64, shape ``(C,)``)."""

    mean: Tensor
    std: Tensor


class _Moments:
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
            self.s2 += s2  # type: ignore[operator]
        self.n += rows.shape[0]

    def stats(self) -> ChannelStats:
        assert self.s1 is not None and self.s2 is not None  # guarded by callers (no batches -> error earlier)
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


def _iter_batches(loader: Iterable[Any], max_batches: int | None) -> Iterable[Any]:
    for i, batch in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            return
        x, _ = split_batch(batch)
        yield x


def _check_max_batches(max_batches: int | None) -> None:
    if max_batches is not None and (isinstance(max_batches, bool) or not isinstance(max_batches, int) or max_batches < 1):
        raise RebasinError(f"max_batches must be a positive int or None, got {max_batches!r}")


def channel_stats(
    model: nn.Module,
    state: State,
    loader: Iterable[Any],
    *,
    spec: PermutationSpec | None = None,
    max_batches: int | None = None,
    device: torch.device | str | None = None,
) -> dict[str, ChannelStats]:
    """Per-channel mean / std of the outputs of every producing layer of ``model`` run on ``state``.

    A producing layer is an ``nn.Linear`` or ``nn.Conv{1,2,3}d`` whose weight's output axis carries
    a permutation of ``spec``. Statistics are over every position except the channel axis (batch,
    sequence, spatial), in float64, population variance. The model runs in eval mode through
    :func:`torch.func.functional_call` and is unchanged.

    Parameters
    ----------
    model, state
        Architecture and full state_dict to run it on.
    loader
        Yields ``(inputs, targets)`` or bare inputs.
    spec
        The permutation spec; traced from the loader's first batch when omitted.
    max_batches, device
        How many batches (all when None) and where to run (default: the model's device).

    Returns
    -------
    dict
        ``{module name: ChannelStats(mean (C,), std (C,))}`` in forward order.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from rebasin import PermutationSpec
    >>> model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    >>> spec = PermutationSpec({"0.weight": ("P", None), "0.bias": ("P",),
    ...                         "2.weight": (None, "P"), "2.bias": (None,)})
    >>> st = channel_stats(model, model.state_dict(), [torch.randn(16, 3)], spec=spec)
    >>> tuple(st["0"].std.shape)
    (4,)
    """
    if loader is None:
        raise RebasinError("channel_stats needs data: pass a loader")
    _check_max_batches(max_batches)
    check_state_for_model(model, state)
    device = resolve_device(model, device=device)
    spec = _resolve_spec(model, spec, loader)
    plain, normed, _ = _analyse(model, spec)
    producers = plain + normed
    modules = dict(model.named_modules())
    moments = {p.name: _Moments() for p in producers}
    order: list[str] = []
    work = {k: v.to(device) for k, v in state.items()}

    def hook_for(p: _Producer) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, out: Tensor) -> None:
            moments[p.name].add(_rows(out, p.channel_dim))
            if p.name not in order:
                order.append(p.name)

        return hook

    handles = [modules[p.name].register_forward_hook(hook_for(p)) for p in producers]
    n = 0
    try:
        with torch.no_grad():
            for x in _iter_batches(loader, max_batches):
                forward_with_state(model, work, to_device(x, device), eval_mode=True)
                n += 1
    finally:
        for h in handles:
            h.remove()
    if n == 0:
        raise RebasinError("channel_stats: the loader yielded no batches")
    return {name: moments[name].stats() for name in order}


def _resolve_spec(model: nn.Module, spec: PermutationSpec | None, loader: Iterable[Any]) -> PermutationSpec:
    if spec is not None:
        if not isinstance(spec, PermutationSpec):
            raise RebasinError(f"spec must be a PermutationSpec, got {type(spec).__name__}")
        return spec
    from ..trace.tracing import spec_for

    return spec_for(model, loader=loader)


# ----------------------------------------------------------------------------------------------
# the core: N endpoints with convex weights


def _weights(weights: Sequence[float], n: int) -> list[float]:
    w = [check_float(v, "each weight") for v in weights]
    if len(w) != n:
        raise RebasinError(f"got {n} states but {len(w)} weights")
    return w


class _EndpointStats:
    """Endpoint statistics of the producing layers, measured once and reused for every ``t``."""

    def __init__(
        self,
        model: nn.Module,
        states: Sequence[State],
        producers: Sequence[_Producer],
        loader: Iterable[Any],
        *,
        max_batches: int | None,
        device: torch.device,
        cross: bool,
    ) -> None:
        modules = dict(model.named_modules())
        self.order: list[str] = []
        per_model = [{p.name: _Moments() for p in producers} for _ in states]
        # cross moments E[a_i a_j] of every pair of endpoints (for the closed form)
        pair_sums: dict[str, dict[tuple[int, int], Tensor]] = {p.name: {} for p in producers}
        captured: dict[str, Tensor] = {}

        def hook_for(p: _Producer) -> Callable[..., None]:
            def hook(module: nn.Module, args: Any, out: Tensor) -> None:
                captured[p.name] = _rows(out, p.channel_dim)
                if p.name not in self.order:
                    self.order.append(p.name)

            return hook

        handles = [modules[p.name].register_forward_hook(hook_for(p)) for p in producers]
        works = [{k: v.to(device) for k, v in s.items()} for s in states]
        n_batches = 0
        try:
            with torch.no_grad():
                for x in _iter_batches(loader, max_batches):
                    x = to_device(x, device)
                    outs = []
                    for i, work in enumerate(works):
                        captured.clear()
                        forward_with_state(model, work, x, eval_mode=True)
                        outs.append(dict(captured))
                        for name, rows in captured.items():
                            per_model[i][name].add(rows)
                    if cross:
                        for name in outs[0]:
                            for i in range(len(states)):
                                for j in range(i + 1, len(states)):
                                    prod = (outs[i][name] * outs[j][name]).sum(0)
                                    acc = pair_sums[name].get((i, j))
                                    pair_sums[name][(i, j)] = prod if acc is None else acc + prod
                    n_batches += 1
        finally:
            for h in handles:
                h.remove()
        if n_batches == 0:
            raise RebasinError("REPAIR: the loader yielded no batches")
        missing = [p.name for p in producers if p.name not in self.order]
        if missing:
            raise RebasinError(f"REPAIR: the producing layers {missing} were never called by the forward pass")
        self.stats = [{name: m[name].stats() for name in self.order} for m in per_model]
        self.count = {name: per_model[0][name].n for name in self.order}
        self.cross = {name: {k: v / self.count[name] for k, v in d.items()} for name, d in pair_sums.items()} if cross else None

    def target(self, name: str, weights: Sequence[float]) -> ChannelStats:
        mean = sum(w * s[name].mean for w, s in zip(weights, self.stats))
        std = sum(w * s[name].std for w, s in zip(weights, self.stats))
        return ChannelStats(mean, std)  # type: ignore[arg-type]

    def predicted(self, name: str, weights: Sequence[float]) -> ChannelStats:
        r"""Closed form: mean and std of :math:`\sum_i w_i a_i` from the endpoint (cross-)moments.

        For two endpoints this is :math:`\sigma_t^2 = (1-t)^2\sigma_A^2 + t^2\sigma_B^2 +
        2t(1-t)\rho\,\sigma_A\sigma_B` with the correlation :math:`\rho` of matched units.
        """
        assert self.cross is not None
        st = [s[name] for s in self.stats]
        mean = sum(w * s.mean for w, s in zip(weights, st))
        second = sum(w * w * (s.std**2 + s.mean**2) for w, s in zip(weights, st))
        for (i, j), e_ij in self.cross[name].items():
            second = second + 2.0 * weights[i] * weights[j] * e_ij
        var = (second - mean * mean).clamp_min(0.0)  # type: ignore[operator, union-attr]
        return ChannelStats(mean, var.sqrt())  # type: ignore[arg-type]


def _correction(target: ChannelStats, actual: ChannelStats) -> tuple[Tensor, Tensor]:
    """``(scale, shift)`` with ``scale * y + shift`` having the target statistics."""
    dead = actual.std <= _DEAD_STD * torch.clamp(target.std, min=1.0)
    scale = torch.where(dead, torch.ones_like(actual.std), target.std / torch.where(dead, torch.ones_like(actual.std), actual.std))
    shift = target.mean - scale * actual.mean
    return scale, shift


def _fold(state: dict[str, Tensor], prod: _Producer, scale: Tensor, shift: Tensor) -> None:
    w = state[prod.weight_key]
    s = scale.to(device=w.device, dtype=w.dtype)
    state[prod.weight_key] = w * s.reshape(-1, *([1] * (w.ndim - 1)))
    if prod.bias_key is not None:
        b = state[prod.bias_key]
        state[prod.bias_key] = b * s + shift.to(device=b.device, dtype=b.dtype)
    elif bool((shift.abs() > 1e-12).any()):
        warnings.warn(
            f"REPAIR: layer {prod.name!r} has no bias, so only its scale was corrected (the mean shift "
            "cannot be folded in); give the layer a bias for a full correction",
            stacklevel=4,
        )


class _Repairer:
    """Shared machinery of :func:`repair_states`, :class:`RepairedPath` and :func:`rebasin.merge`."""

    def __init__(
        self,
        model: nn.Module,
        states: Sequence[State],
        loader: Iterable[Any],
        *,
        spec: PermutationSpec | None,
        closed_form: bool,
        max_batches: int | None,
        device: torch.device | str | None,
    ) -> None:
        if loader is None:
            raise RebasinError(
                "REPAIR needs data to measure channel statistics: pass a loader of (inputs, targets) batches"
            )
        if len(states) < 1:
            raise RebasinError("REPAIR needs at least one state")
        _check_max_batches(max_batches)
        for i, s in enumerate(states):
            check_state_for_model(model, s, name=f"state {i}")
            if i:
                check_same_layout(states[0], s)
        self.model = model
        self.states = list(states)
        self.loader = loader
        self.closed_form = bool(closed_form)
        self.max_batches = max_batches
        self.device = resolve_device(model, device=device)
        self.spec = _resolve_spec(model, spec, loader)
        self.spec.validate(states[0])
        self.plain, self.normed, self.bns = _analyse(model, self.spec)
        self._endpoints: _EndpointStats | None = None

    @property
    def endpoints(self) -> _EndpointStats:
        if self._endpoints is None:
            self._endpoints = _EndpointStats(
                self.model,
                self.states,
                self.plain,
                self.loader,
                max_batches=self.max_batches,
                device=self.device,
                cross=self.closed_form,
            )
        return self._endpoints

    def _reset_bn(self, state: State) -> dict[str, Tensor]:
        return reset_bn_stats(self.model, state, self.loader, max_batches=self.max_batches, device=self.device)

    def _measure(self, state: State, prod: _Producer) -> ChannelStats:
        """Stats of one layer's outputs, stopping the forward pass right after it."""
        module = dict(self.model.named_modules())[prod.name]
        moments = _Moments()

        def hook(m: nn.Module, args: Any, out: Tensor) -> None:
            moments.add(_rows(out, prod.channel_dim))
            raise _Stop

        handle = module.register_forward_hook(hook)
        work = {k: v.to(self.device) for k, v in state.items()}
        try:
            with torch.no_grad():
                for x in _iter_batches(self.loader, self.max_batches):
                    try:
                        forward_with_state(self.model, work, to_device(x, self.device), eval_mode=True)
                    except _Stop:
                        pass
        finally:
            handle.remove()
        if moments.n == 0:
            raise RebasinError(f"REPAIR: layer {prod.name!r} produced no outputs over the loader")
        return moments.stats()

    def state_at(self, weights: Sequence[float]) -> dict[str, Tensor]:
        weights = _weights(weights, len(self.states))
        state = combine(self.states, weights)
        has_bn = bool(self.bns)
        if self.plain:
            ends = self.endpoints
            by_name = {p.name: p for p in self.plain}
            bn_stale = has_bn
            for name in ends.order:
                prod = by_name[name]
                target = ends.target(name, weights)
                if self.closed_form:
                    actual = ends.predicted(name, weights)
                else:
                    if bn_stale:  # later layers must see the repaired BatchNorm statistics
                        state = self._reset_bn(state)
                    actual = self._measure(state, prod)
                scale, shift = _correction(target, actual)
                _fold(state, prod, scale, shift)
        if has_bn:
            state = self._reset_bn(state)
        return state


# ----------------------------------------------------------------------------------------------
# public API


def repair_states(
    model: nn.Module,
    states: Sequence[State],
    weights: Sequence[float],
    loader: Iterable[Any],
    *,
    spec: PermutationSpec | None = None,
    closed_form: bool = False,
    max_batches: int | None = None,
    device: torch.device | str | None = None,
) -> dict[str, Tensor]:
    r"""The weighted combination :math:`\sum_i w_i \theta_i` of aligned states, REPAIRed.

    Every permuted channel gets the weighted endpoint statistics
    :math:`\mu = \sum_i w_i \mu_i`, :math:`\sigma = \sum_i w_i \sigma_i`: BatchNorm-normalised
    channels by resetting the running statistics, the others by folding a per-channel affine
    correction into their producing layer (see the module docstring). :func:`repair` is the
    two-state case with weights ``(1 - t, t)``; :func:`rebasin.merge` uses uniform weights.

    Parameters
    ----------
    model
        The architecture. Unchanged.
    states
        ``N >= 1`` full state_dicts of ``model``, already aligned to one another. Not mutated.
    weights
        ``N`` finite weights (usually convex: non-negative, summing to one).
    loader
        Data for the statistics: ``(inputs, targets)`` batches (targets ignored). Use a loader
        that yields the same batches each pass (no shuffling) for exact endpoint behaviour.
    spec
        The permutation spec (traced from the loader's first batch when omitted); it says which
        layers produce permuted channels.
    closed_form
        Predict the combined net's channel statistics from the endpoints' statistics and
        cross-correlations instead of measuring them on the combined net (one pass over the
        endpoints only; BatchNorm statistics are still reset with a pass over the combined net).
    max_batches
        Use at most this many batches per pass.
    device
        Where to run; defaults to the model's device.

    Returns
    -------
    dict
        A new state_dict on the devices of ``states[0]``.

    Examples
    --------
    >>> merged = repair_states(model, [sa, sb, sc], [1 / 3] * 3, loader, spec=spec)  # doctest: +SKIP
    """
    rep = _Repairer(model, states, loader, spec=spec, closed_form=closed_form, max_batches=max_batches, device=device)
    return rep.state_at(weights)


class RepairedPath:
    """The linear path from ``state_a`` to ``state_b`` with REPAIR applied at every point.

    Endpoint statistics are measured once (on first use) and reused for every ``t``, so evaluating
    a whole path costs one pass over the endpoints plus, per ``t``, the passes of the correction.
    Plugs into :func:`rebasin.evaluate_path` as ``path=`` (it has :meth:`state_dict_at`, and
    calling it is the same).

    Parameters
    ----------
    model, state_a, state_b, loader, spec, closed_form, max_batches, device
        As for :func:`repair`.

    Examples
    --------
    >>> path = RepairedPath(model, sa, sb_aligned, train_loader, spec=spec)  # doctest: +SKIP
    >>> result = evaluate_path(model, None, None, test_loader, path=path)    # doctest: +SKIP
    """

    def __init__(
        self,
        model: nn.Module,
        state_a: State,
        state_b: State,
        loader: Iterable[Any],
        *,
        spec: PermutationSpec | None = None,
        closed_form: bool = False,
        max_batches: int | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        check_same_layout(state_a, state_b)
        self._rep = _Repairer(
            model, [state_a, state_b], loader, spec=spec, closed_form=closed_form, max_batches=max_batches, device=device
        )
        self.__name__ = "repair" + ("_closed_form" if closed_form else "")

    def state_dict_at(self, t: float) -> dict[str, Tensor]:
        """The REPAIRed state_dict at ``t`` (a new dict of new tensors for the corrected entries)."""
        t = check_float(t, "t")
        return self._rep.state_at([1.0 - t, t])

    __call__ = state_dict_at


def repaired_path(
    model: nn.Module,
    state_a: State,
    state_b: State,
    loader: Iterable[Any],
    *,
    spec: PermutationSpec | None = None,
    closed_form: bool = False,
    max_batches: int | None = None,
    device: torch.device | str | None = None,
) -> RepairedPath:
    """A :class:`RepairedPath` for ``evaluate_path(..., path=repaired_path(...))``.

    Examples
    --------
    >>> res = evaluate_path(model, None, None, test, path=repaired_path(model, sa, sb, train))  # doctest: +SKIP
    """
    return RepairedPath(
        model, state_a, state_b, loader, spec=spec, closed_form=closed_form, max_batches=max_batches, device=device
    )


def repair(
    model: nn.Module,
    state_a: State,
    state_b: State,
    t: float,
    loader: Iterable[Any],
    *,
    spec: PermutationSpec | None = None,
    closed_form: bool = False,
    max_batches: int | None = None,
    device: torch.device | str | None = None,
) -> nn.Module:
    r"""The interpolated network at ``t`` with its channel statistics REPAIRed.

    Builds :math:`\theta(t) = (1 - t)\theta_A + t\theta_B` and corrects it so that every permuted
    channel has mean :math:`(1 - t)\mu_A + t\mu_B` and std :math:`(1 - t)\sigma_A + t\sigma_B`
    (endpoint statistics measured on the same data):

    * channels feeding a BatchNorm: the running statistics are recomputed over ``loader``
      (:func:`rebasin.reset_bn_stats`; at ``t = 0`` this gives A with statistics measured on
      ``loader``, identical to A when A's statistics were computed that way);
    * other channels (no normalisation, LayerNorm): the pre-activation output of each producing
      ``Linear`` / ``Conv`` is measured and ``y -> s y + (mu_target - s mu_actual)``,
      ``s = sigma_target / sigma_actual``, is folded into its weight and bias, layer by layer in
      forward order (one partial forward pass over ``loader`` per layer). A channel that is dead
      in the interpolated net (zero std) is only shifted.

    With ``closed_form=True`` the interpolated pre-activation statistics are predicted from the
    endpoints instead of measured, treating the interpolated unit as
    :math:`(1 - t) a + t b`:

    .. math::

        \sigma_t^2 \approx (1 - t)^2\sigma_A^2 + t^2\sigma_B^2 + 2t(1 - t)\rho\,\sigma_A\sigma_B

    with :math:`\rho` the correlation of matched units A and B over the data: one pass over the
    endpoints and none over the interpolated net (exact for the first layer, an approximation
    deeper in).

    Parameters
    ----------
    model
        The architecture (any of the two endpoints, or a fresh instance). Unchanged.
    state_a, state_b
        Full state_dicts of the endpoints, B already aligned to A (e.g. ``align(...).state_b``).
        Not mutated.
    t
        Position on the path (finite; 0 is A, 1 is B).
    loader
        Data for the statistics, ``(inputs, targets)`` batches. Required.
    spec
        The permutation spec; traced from the loader's first batch when omitted.
    closed_form
        See above.
    max_batches
        Use at most this many batches per pass (all when None).
    device
        Where to run; defaults to the model's device. The returned module is moved there.

    Returns
    -------
    nn.Module
        A new module (a deep copy of ``model``) holding the repaired state; parameters keep
        ``model``'s ``requires_grad`` flags, so it can be fine-tuned as usual.

    Raises
    ------
    RebasinError
        Without a loader, for states that do not fit the model, or a non-finite ``t``.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from rebasin import PermutationSpec
    >>> model = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> other = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> spec = PermutationSpec({"0.weight": ("P", None), "0.bias": ("P",),
    ...                         "2.weight": (None, "P"), "2.bias": (None,)})
    >>> data = [(torch.randn(32, 3), torch.zeros(32, dtype=torch.long))]
    >>> mid = repair(model, model.state_dict(), other.state_dict(), 0.5, data, spec=spec)
    >>> isinstance(mid, nn.Sequential)
    True
    """
    t = check_float(t, "t")
    if loader is None:
        raise RebasinError(
            "repair needs data to measure channel statistics: pass a loader of (inputs, targets) batches"
        )
    path = RepairedPath(
        model, state_a, state_b, loader, spec=spec, closed_form=closed_form, max_batches=max_batches, device=device
    )
    state = path.state_dict_at(t)
    return module_with_state(model, state, None if device is None else torch.device(device))

