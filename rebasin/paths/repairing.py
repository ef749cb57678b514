r"""REPAIR: fix the statistics of interpolated (or averaged) networks — the public entry points.

Averaging the weights of two aligned networks shrinks the variance of their hidden units
("variance collapse", Jordan et al. 2023): the interpolated net's channels have smaller spread
than either endpoint's, and the loss barrier is mostly that. REPAIR gives every permuted channel
the interpolated endpoint statistics (the formulas are stated once, in :func:`repair`): channels
normalised by BatchNorm by resetting its running statistics, the others by folding a per-channel
affine correction into the layer that produces them, layer by layer in forward order.

The work is split along its ideas:

* :mod:`rebasin.paths._repair_stats` — which layers produce permuted channels (read from the
  layer-rule registry, so a user's registered linear-like layer is REPAIRed too) and one loop that
  measures their output statistics;
* :mod:`rebasin.paths._repair_math` — target and closed-form statistics, the correction, the fold;
* this module — :func:`repair` (the one REPAIR function, ``N`` states with weights), the path object
  :class:`RepairedPath` and :func:`channel_stats`, all driven by one ``_Repairer``. Resetting BatchNorm
  statistics lives in :mod:`rebasin.paths.running` alone.

Everything generalises from two endpoints at ``t`` to ``N`` endpoints with convex weights ``w_i``,
which :func:`rebasin.merge` uses.

Reference: K. Jordan, H. Sedghi, O. Saukh, R. Entezari, B. Neyshabur, "REPAIR: REnormalizing
Permuted Activations for Interpolation Repair", ICLR 2023.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .._common import (
    check_float,
    check_same_layout,
    check_state_for_model,
    module_with_state,
    resolve_device,
)
from .._deprecation import deprecated_alias, deprecated_form
from .._distributed import fingerprint, guarded, reducer
from .._errors import RebasinError
from ..spec.core import PermutationSpec
from ._repair_math import correction, fold, predicted_stats, target_stats
from ._repair_stats import ChannelStats, Collected, Producer, check_max_batches, collect, producers
from .linear import combine
from .running import reset_bn_stats

__all__ = [
    "repair",
    "RepairedPath",
    "repair_states",
    "repaired_path",
    "channel_stats",
    "ChannelStats",
]

State = Mapping[str, Tensor]


# ----------------------------------------------------------------------------------------------
# statistics


def channel_stats(
    model: nn.Module,
    state: State,
    loader: Iterable[Any],
    *,
    spec: PermutationSpec | None = None,
    max_batches: int | None = None,
    device: torch.device | str | None = None,
    sync: bool = True,
    group: Any = None,
) -> dict[str, ChannelStats]:
    """Per-channel mean / std of the outputs of every producing layer of ``model`` run on ``state``.

    A producing layer is a module whose layer rule declares ``weight`` with the ``"out"`` role on axis
    0 (``nn.Linear``, ``nn.Conv{1,2,3}d``, a user's layer registered with
    :func:`rebasin.register_module`), or on axis 1 of a 2-D weight stored transposed (``transformers``'
    ``Conv1D``, GPT-2), and whose weight's output axis carries a permutation of ``spec``.
    Statistics are over every position except the channel axis (batch, sequence, spatial), in
    float64, population variance. The model runs in eval mode through
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
    sync, group
        Under ``torch.distributed`` (an initialised process group and ``sync=True``, the default) the
        statistics are summed over the ranks of ``group`` (None: the default group): every rank gets the
        result on the union of the shards. ``sync=False``: this process's data only.

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
    check_max_batches(max_batches)
    check_state_for_model(model, state)
    device = resolve_device(model, device=device)
    red = reducer(sync, group)
    with guarded(red, "channel_stats (reading the spec)") as outcome:
        spec = _resolve_spec(model, spec, loader)
        outcome.key = fingerprint(state, spec.axes)
    plain, normed, _ = producers(model, spec)
    got = collect(model, [state], plain + normed, loader, max_batches=max_batches, device=device,
                  what="channel_stats", require_all=False, red=red)
    return got.stats[0]


def _resolve_spec(model: nn.Module, spec: PermutationSpec | None, loader: Iterable[Any]) -> PermutationSpec:
    if spec is not None:
        if not isinstance(spec, PermutationSpec):
            raise RebasinError(f"spec must be a PermutationSpec, got {type(spec).__name__}")
        return spec
    from ..trace.tracing import spec_for

    return spec_for(model, loader=loader)


# ----------------------------------------------------------------------------------------------
# the driver: N endpoints with convex weights


def _weights(weights: Sequence[float], n: int) -> list[float]:
    w = [check_float(v, "each weight") for v in weights]
    if len(w) != n:
        raise RebasinError(f"got {n} states but {len(w)} weights")
    return w


class _Repairer:
    """Shared machinery of :func:`repair` and :class:`RepairedPath`."""

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
        sync: bool = True,
        group: Any = None,
    ) -> None:
        self.red = reducer(sync, group)
        self.sync, self.group = sync, group
        if loader is None:
            raise RebasinError(
                "REPAIR needs data to measure channel statistics: pass a loader of (inputs, targets) batches"
            )
        if len(states) < 1:
            raise RebasinError("REPAIR needs at least one state")
        check_max_batches(max_batches)
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
        with guarded(self.red, "REPAIR (reading the spec)") as outcome:
            self.spec = _resolve_spec(model, spec, loader)
            self.spec.validate(states[0])
            outcome.key = fingerprint(states[0], self.spec.axes, len(states))
        self.plain, self.normed, self.bns = producers(model, self.spec)
        self._endpoints: Collected | None = None

    @property
    def endpoints(self) -> Collected:
        if self._endpoints is None:
            self._endpoints = collect(self.model, self.states, self.plain, self.loader, max_batches=self.max_batches,
                                      device=self.device, what="REPAIR", cross=self.closed_form, red=self.red)
        return self._endpoints

    def _reset_bn(self, state: State) -> dict[str, Tensor]:
        return reset_bn_stats(self.model, state, self.loader, max_batches=self.max_batches, device=self.device,
                              sync=self.sync, group=self.group)

    def _measure(self, state: State, prod: Producer) -> ChannelStats:
        """Stats of one layer's outputs, stopping each forward pass right after it."""
        got = collect(self.model, [state], [prod], self.loader, max_batches=self.max_batches, device=self.device,
                      what=f"REPAIR (layer {prod.name!r})", stop_after=prod.name, red=self.red)
        return got.stats[0][prod.name]

    def state_at(self, weights: Sequence[float]) -> dict[str, Tensor]:
        """Combine the states with ``weights``, correct each plain producer in forward order, reset BatchNorm."""
        weights = _weights(weights, len(self.states))
        state = combine(self.states, weights)
        has_bn = bool(self.bns)
        if self.plain:
            ends = self.endpoints
            by_name = {p.name: p for p in self.plain}
            for name in ends.order:
                prod = by_name[name]
                endpoint_stats = [s[name] for s in ends.stats]
                target = target_stats(endpoint_stats, weights)
                if ends.cross is not None:
                    actual = predicted_stats(endpoint_stats, ends.cross[name], weights)
                else:
                    if has_bn:  # later layers must see the repaired BatchNorm statistics
                        state = self._reset_bn(state)
                    actual = self._measure(state, prod)
                scale, shift = correction(target, actual)
                fold(state, prod, scale, shift)
        if has_bn:
            state = self._reset_bn(state)
        return state


# ----------------------------------------------------------------------------------------------
# public API


def _two_state_form(model: Any = None, *args: Any, **kwargs: Any) -> bool:
    """The 0.2 form ``repair(model, state_a, state_b, t, loader)``: a state_dict where the states go."""
    if len(args) >= 4 or "state_a" in kwargs or "t" in kwargs:  # state_a, state_b, t, loader
        return True
    return bool(args) and isinstance(args[0], (Mapping, nn.Module))


def _repair_at(
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
    sync: bool = True,
    group: Any = None,
) -> nn.Module:
    """The 0.2 ``repair(model, state_a, state_b, t, loader)``: the REPAIRed network at ``t``, as a module."""
    t = check_float(t, "t")
    if loader is None:
        raise RebasinError(
            "repair needs data to measure channel statistics: pass a loader of (inputs, targets) batches"
        )
    path = RepairedPath(
        model, state_a, state_b, loader, spec=spec, closed_form=closed_form, max_batches=max_batches, device=device,
        sync=sync, group=group,
    )
    state = path.state_dict_at(t)
    return module_with_state(model, state, None if device is None else torch.device(device))


@deprecated_form(
    _repair_at,
    when=_two_state_form,
    use="repair(model, [state_a, state_b], [1 - t, t], loader) for the state_dict, or "
    "RepairedPath(model, state_a, state_b, loader) for the whole path",
)
def repair(
    model: nn.Module,
    states: Sequence[State],
    weights: Sequence[float],
    loader: Iterable[Any],
    *,
    spec: PermutationSpec | None = None,
    closed_form: bool = False,
    max_batches: int | None = None,
    device: torch.device | str | None = None,
    sync: bool = True,
    group: Any = None,
) -> dict[str, Tensor]:
    r"""REPAIR: the weighted combination :math:`\sum_i w_i \theta_i` of aligned states, its channel statistics fixed.

    The one REPAIR function; :class:`RepairedPath` is the same along a whole linear path (endpoint
    statistics measured once), and :func:`rebasin.merge` calls this with uniform weights.

    Builds :math:`\theta = \sum_i w_i \theta_i` and corrects it so that every permuted channel has
    the combined endpoint statistics (measured on the same data); for two endpoints at ``t``, with the
    weights ``(1 - t, t)``,

    .. math::

        \mu_t = (1 - t)\,\mu_A + t\,\mu_B, \qquad \sigma_t = (1 - t)\,\sigma_A + t\,\sigma_B

    (for ``N`` endpoints :math:`\mu = \sum_i w_i \mu_i`, :math:`\sigma = \sum_i w_i \sigma_i`):

    * channels feeding a BatchNorm: the running statistics are recomputed over ``loader``
      (:func:`rebasin.reset_bn_stats`; at ``t = 0`` this gives A with statistics measured on
      ``loader``, identical to A when A's statistics were computed that way);
    * other channels (no normalisation, LayerNorm): the output :math:`y` of each producing layer
      (``Linear``, ``Conv``, GPT-2's ``Conv1D``, or a layer registered with ``weight`` in the ``"out"``
      role on axis 0, see :func:`rebasin.register_module`) is measured, giving :math:`\mu, \sigma`, and

      .. math::

          y \mapsto s\,y + (\mu_t - s\,\mu), \qquad s = \sigma_t / \sigma

      is folded into its weight rows and bias, layer by layer in forward order (one partial forward
      pass over ``loader`` per layer). A channel that is dead in the interpolated net (zero std)
      is only shifted.

    With ``closed_form=True`` the interpolated pre-activation statistics are predicted from the
    endpoints instead of measured, treating the interpolated unit as
    :math:`(1 - t) a + t b`:

    .. math::

        \sigma^2 \approx (1 - t)^2\sigma_A^2 + t^2\sigma_B^2 + 2t(1 - t)\rho\,\sigma_A\sigma_B

    with :math:`\rho` the correlation of matched units A and B over the data (for ``N`` endpoints
    the same from every pair's cross moments): one pass over the endpoints and none over the
    interpolated net (exact for the first layer, an approximation deeper in).

    Parameters
    ----------
    model
        The architecture (any of the endpoints, or a fresh instance). Unchanged.
    states
        ``N >= 1`` full state_dicts of ``model``, already aligned to one another (e.g. ``[state_a,
        align(...).state_b]``). Not mutated.
    weights
        ``N`` finite weights (usually convex: non-negative, summing to one); ``[1 - t, t]`` is the point
        ``t`` of the line from ``states[0]`` to ``states[1]``.
    loader
        Data for the statistics: ``(inputs, targets)`` batches (targets ignored). Use a loader
        that yields the same batches each pass (no shuffling) for exact endpoint behaviour.
    spec
        The permutation spec (traced from the loader's first batch when omitted); it says which
        layers produce permuted channels.
    closed_form
        Predict the combined net's channel statistics from the endpoints (see above) instead of
        measuring them on the combined net (BatchNorm statistics are still reset with a pass over it).
    max_batches
        Use at most this many batches per pass (all when None).
    device
        Where to run; defaults to the model's device.
    sync, group
        Under ``torch.distributed`` (an initialised process group and ``sync=True``, the default) the
        statistics are summed over the ranks of ``group`` (None: the default group): every rank gets the
        result on the union of the shards. ``sync=False``: this process's data only.

    Returns
    -------
    dict
        A new state_dict on the devices of ``states[0]`` (load it with ``model.load_state_dict`` or
        :func:`rebasin.module_with_state`).

    Raises
    ------
    RebasinError
        Without a loader, for states that do not fit the model or one another, or bad weights.

    Notes
    -----
    The 0.2 spellings keep working for one release with a :class:`DeprecationWarning`:
    ``repair(model, state_a, state_b, t, loader)`` (returned a module), ``repair_states(...)`` (this
    function) and ``repaired_path(...)`` (:class:`RepairedPath`).

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
    >>> mid = repair(model, [model.state_dict(), other.state_dict()], [0.5, 0.5], data, spec=spec)
    >>> sorted(mid) == sorted(model.state_dict())
    True
    """
    rep = _Repairer(model, states, loader, spec=spec, closed_form=closed_form, max_batches=max_batches, device=device,
                    sync=sync, group=group)
    return rep.state_at(weights)


class RepairedPath:
    """The linear path from ``state_a`` to ``state_b`` with REPAIR applied at every point.

    Endpoint statistics are measured once (on first use) and reused for every ``t``, so evaluating
    a whole path costs one pass over the endpoints plus, per ``t``, the passes of the correction.
    Plugs into :func:`rebasin.evaluate_path` as ``path=`` (it has :meth:`state_dict_at`, and
    calling it is the same).

    Parameters
    ----------
    model, state_a, state_b, loader, spec, closed_form, max_batches, device, sync, group
        As for :func:`repair` (with the two states ``[state_a, state_b]``).

    Examples
    --------
    >>> path = RepairedPath(model, sa, sb_aligned, train_loader, spec=spec)  # doctest: +SKIP
    >>> result = evaluate_path(model, path, test_loader)                      # doctest: +SKIP
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
        sync: bool = True,
        group: Any = None,
    ) -> None:
        check_same_layout(state_a, state_b)
        self._rep = _Repairer(
            model, [state_a, state_b], loader, spec=spec, closed_form=closed_form, max_batches=max_batches, device=device,
            sync=sync, group=group,
        )
        self.__name__ = "repair" + ("_closed_form" if closed_form else "")
        self.max_batches = max_batches

    def state_dict_at(self, t: float) -> dict[str, Tensor]:
        """The REPAIRed state_dict at ``t`` (a new dict of new tensors for the corrected entries)."""
        t = check_float(t, "t")
        return self._rep.state_at([1.0 - t, t])

    __call__ = state_dict_at


#: 0.2 spellings, kept one release with a DeprecationWarning.
repair_states = deprecated_alias(repair, "repair_states", "repair(model, states, weights, loader) (the same arguments)")
repaired_path = deprecated_alias(RepairedPath, "repaired_path", "RepairedPath(...) (the same arguments)")
