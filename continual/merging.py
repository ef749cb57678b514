r"""Plain functions behind the continual-learning strategies (no Avalanche import).

Merging a freshly trained model with the previous experience's model along the linear path:

.. math::

    \theta(\alpha) = (1 - \alpha)\, \pi(\theta_{\text{prev}}) + \alpha\, \theta_{\text{new}},

where :math:`\pi` is the permutation that aligns the previous model to the new one. ``alpha`` is the
weight of the **new** model: ``alpha = 1`` keeps the freshly trained weights bit for bit, ``alpha =
0`` returns the (permuted) previous model. The previous model is permuted into the new model's basis
(not the other way round): the merged function is the same either way up to a permutation of hidden
units, but this way ``alpha = 1`` is exactly a no-op and the optimizer's per-parameter state (Adam
moments) stays in the basis of the parameters it belongs to.

Peña et al.'s incremental step (:mod:`continual.incremental`, used by :class:`continual.RebasinILPlugin`
and :class:`continual.RebasinIL`) works on the previous model alone:

.. math::

    \theta_{\text{train}} = \tfrac12\big(\theta_{\text{prev}} + \pi_P(\theta_{\text{prev}})\big) + \delta,
    \qquad
    \theta_{\text{final}} = (1 - \alpha)\, \theta_{\text{prev}} + \alpha\, \pi_{\hat P}(\theta_{\text{prev}}) + \delta,

with soft permutations :math:`P` while training and the hard :math:`\hat P` at the end. There too
``alpha`` is the weight of B, the permuted copy that was trained towards the new task (the project's
convention :math:`(1 - t)A + tB`); the paper's :math:`\alpha`, the weight of the previous model, is
``1 - alpha``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from rebasin import LinearPath, PermutationSpec, RebasinError, evaluate_path, interpolate, permute
from rebasin.checks import check_int
from rebasin.spec import soft_permute

__all__ = [
    "AlphaChoice",
    "LayerAlphaChoice",
    "CRITERIA",
    "GRANULARITIES",
    "alpha_grid",
    "layer_groups",
    "merge_states",
    "select_alpha",
    "select_layer_alphas",
    "conservative_alpha",
    "write_state_",
    "reset_optimizer_state_",
    "midpoint_state",
    "rebasin_il_state",
]

State = Mapping[str, Tensor]


@dataclass(frozen=True)
class AlphaChoice:
    """The merge coefficient picked by :func:`select_alpha` and the losses behind it.

    Attributes
    ----------
    alpha
        The chosen weight of the new model.
    grid
        Every candidate, in increasing order.
    loss_old, loss_new
        Mean loss on the old-task data and on the new-task data at each candidate (``loss_old`` is
        all NaN when no old data was given).
    objective
        What was minimised: the ``old_weight``-weighted average of the two mean losses (of the two error
        rates with ``criterion="accuracy"``), or the new data's alone without old data.
    acc_old, acc_new
        Accuracy on the old-task and new-task data at each candidate (None when the outputs are not class
        scores; ``acc_old`` all NaN without old data).
    criterion
        ``"loss"`` or ``"accuracy"`` (see :func:`select_alpha`).
    """

    alpha: float
    grid: tuple[float, ...]
    loss_old: tuple[float, ...]
    loss_new: tuple[float, ...]
    objective: tuple[float, ...]
    acc_old: tuple[float, ...] | None = None
    acc_new: tuple[float, ...] | None = None
    criterion: str = "loss"


#: What :func:`select_alpha` optimises.
CRITERIA = ("loss", "accuracy")
#: How finely the merge weight is chosen: one alpha for the whole model, or one per layer
#: (:func:`select_layer_alphas`, :func:`layer_groups`).
GRANULARITIES = ("model", "layer")


@dataclass(frozen=True)
class LayerAlphaChoice:
    """The per-layer merge weights picked by :func:`select_layer_alphas`.

    Attributes
    ----------
    alphas
        ``{layer: weight of the new model}``, one entry per group of :func:`layer_groups`, input to output.
    start
        The single alpha the search started from (every layer at ``start.alpha``) and its grid search.
    objective, loss_objective
        The objective (and the loss objective that breaks its ties) at ``alphas``; never above ``start``'s.
    passes
        Passes over the layers that ran (the search stops after a pass that changed nothing).
    """

    alphas: dict[str, float]
    start: AlphaChoice
    objective: float
    loss_objective: float
    passes: int


def alpha_grid(grid: int | Sequence[float]) -> tuple[float, ...]:
    """``linspace(0, 1, grid)`` for an int (both endpoints included), else the sorted given values.

    Examples
    --------
    >>> alpha_grid(5)
    (0.0, 0.25, 0.5, 0.75, 1.0)
    """
    if isinstance(grid, bool):
        raise RebasinError(f"alpha_grid must be an int >= 2 or a sequence of numbers in [0, 1], got {grid!r}")
    if isinstance(grid, int):
        if grid < 2:
            raise RebasinError(f"alpha_grid must have at least 2 points (both endpoints), got {grid}")
        return tuple(i / (grid - 1) for i in range(grid))
    values = sorted(float(v) for v in grid)
    if not values or any(not (0.0 <= v <= 1.0) for v in values):
        raise RebasinError(f"alpha_grid values must lie in [0, 1] and be non-empty, got {list(grid)!r}")
    return tuple(values)


def check_alpha(alpha: Any, name: str = "alpha") -> float:
    """``alpha`` as a float in ``[0, 1]`` or a :class:`RebasinError`."""
    try:
        value = float(alpha)
    except (TypeError, ValueError):
        raise RebasinError(f"{name} must be a number in [0, 1], got {alpha!r}") from None
    if isinstance(alpha, bool) or not (0.0 <= value <= 1.0):
        raise RebasinError(f"{name} must be a number in [0, 1], got {alpha!r}")
    return value


def layer_groups(state: State) -> dict[str, tuple[str, ...]]:
    """The floating entries of ``state`` grouped by layer, in the state's order (what per-layer alphas weight).

    A layer is a module's entries (``weight`` and ``bias`` together, the key up to its last dot). A module
    whose floating entries are all vectors or scalars (a norm layer: its scale, shift and running statistics)
    joins the layer before it (the first layer when it comes first). Each group is named after its first
    module with a matrix (or higher-dimensional) entry. Integer buffers belong to no group.

    Examples
    --------
    >>> import torch
    >>> m = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 2))
    >>> layer_groups(m.state_dict())
    {'0': ('0.weight', '0.bias', '1.weight', '1.bias'), '2': ('2.weight', '2.bias')}
    """
    modules: dict[str, list[str]] = {}
    for key, value in state.items():
        if value.is_floating_point():
            modules.setdefault(key.rpartition(".")[0] or key, []).append(key)
    groups: dict[str, list[str]] = {}
    leading: list[str] = []  # vector-only modules before the first layer with a matrix
    for name, keys in modules.items():
        if any(state[k].ndim >= 2 for k in keys):
            groups[name] = leading + keys
            leading = []
        elif groups:
            groups[next(reversed(groups))].extend(keys)
        else:
            leading.extend(keys)
    if leading:  # no matrix anywhere (or only vectors after none): one group of what is left
        groups[leading[0].rpartition(".")[0] or leading[0]] = leading
    return {name: tuple(keys) for name, keys in groups.items()}


def merge_states(
    state_prev_aligned: State, state_new: State, alpha: float | Mapping[str, float]
) -> dict[str, Tensor]:
    r"""``(1 - alpha) * state_prev_aligned + alpha * state_new`` (exact at both ends), per layer or for all.

    Parameters
    ----------
    state_prev_aligned
        The previous model's state_dict, already permuted into the new model's basis.
    state_new
        The freshly trained model's state_dict. Same keys and shapes. Neither input is mutated.
    alpha
        Weight of the new model, in ``[0, 1]``: one number for every entry, or ``{layer: weight}`` with one
        entry for every group of :func:`layer_groups` of ``state_new`` (:attr:`LayerAlphaChoice.alphas`).

    Returns
    -------
    dict
        New tensors. Integer buffers (``num_batches_tracked``) are copies of ``state_new``'s, so at
        ``alpha = 1`` every entry equals ``state_new``'s bit for bit.

    Examples
    --------
    >>> import torch
    >>> merge_states({"w": torch.zeros(2)}, {"w": torch.ones(2)}, 0.25)["w"]
    tensor([0.2500, 0.2500])
    """
    if not isinstance(alpha, Mapping):
        out = interpolate(state_prev_aligned, state_new, check_alpha(alpha))
        return {k: (v if v.is_floating_point() else state_new[k].clone()) for k, v in out.items()}
    if set(state_prev_aligned) != set(state_new):
        raise RebasinError(
            f"merge_states: the two states have different keys ({sorted(set(state_prev_aligned) ^ set(state_new))} "
            "in only one); give state_dicts of one architecture"
        )
    groups = layer_groups(state_new)
    if set(alpha) != set(groups):
        raise RebasinError(
            f"merge_states: per-layer alpha names the layers {sorted(alpha)}, the state's layers are "
            f"{sorted(groups)} (layer_groups); give one weight for each of them"
        )
    weight = {k: check_alpha(alpha[name], f"alpha[{name!r}]") for name, keys in groups.items() for k in keys}
    out = {}
    for key, value in state_new.items():
        if key in weight:
            out[key] = interpolate({key: state_prev_aligned[key]}, {key: value}, weight[key])[key]
        else:
            out[key] = value.clone()
    return out


def select_alpha(
    model: nn.Module,
    state_prev_aligned: State,
    state_new: State,
    *,
    new_loader: Iterable[Any],
    old_loader: Iterable[Any] | None = None,
    grid: int | Sequence[float] = 11,
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
    device: torch.device | str | None = None,
    old_weight: float = 0.5,
    criterion: str = "loss",
) -> AlphaChoice:
    """Pick the weight of the new model that minimises the mean loss (or error) over old and new data.

    Every candidate of the grid is evaluated with :func:`rebasin.evaluate_path` (the model is run
    through ``functional_call`` and not modified). The objective is
    ``old_weight * (mean loss on old_loader) + (1 - old_weight) * (mean loss on new_loader)``; without
    old data it is the new-data loss alone. With ``criterion="accuracy"`` the error rates (1 - accuracy)
    take the place of the losses, and ties (frequent: accuracy moves in steps of one sample) go to the lower
    loss objective.
    Remaining ties go to the larger ``alpha`` (the newer model).

    Parameters
    ----------
    model
        The architecture (unchanged).
    state_prev_aligned, state_new
        The two ends of the path (see :func:`merge_states`).
    new_loader, old_loader
        Batches ``(inputs, targets)`` of the current experience and of earlier ones.
    grid
        Number of evenly spaced candidates in ``[0, 1]`` (both ends included) or explicit values.
    loss_fn
        ``loss_fn(outputs, targets)`` returning the batch mean; cross-entropy by default.
    device
        Where to evaluate; the model's device by default.
    old_weight
        Weight of the old-data loss in ``[0, 1]`` (0.5: old and new count the same; ``k / (k + 1)``
        after ``k`` old tasks: every task counts the same).
    criterion
        ``"loss"`` (default) or ``"accuracy"``: what the choice optimises. The loss rewards the flatter,
        less confident predictions of an interpolated model even where they classify no better.

    Returns
    -------
    AlphaChoice

    Examples
    --------
    >>> choice = select_alpha(model, prev, new, new_loader=new, old_loader=old)  # doctest: +SKIP
    >>> choice.alpha                                                            # doctest: +SKIP
    0.6
    """
    ts = alpha_grid(grid)
    old_weight = check_alpha(old_weight, "old_weight")
    if criterion not in CRITERIA:
        raise RebasinError(f"unknown criterion {criterion!r}; choose one of {CRITERIA}")
    scores = _scores(model, LinearPath(state_prev_aligned, state_new), ts, new_loader, old_loader, loss_fn, device,
                     old_weight, criterion)
    loss_old, loss_new, acc_old, acc_new, objective, loss_objective = scores
    best = _best(ts, objective, loss_objective)
    if best is None:
        raise RebasinError(
            f"the merge loss is not finite at any alpha of the grid {ts}; check the data and the models"
        )
    return AlphaChoice(ts[best], ts, loss_old, loss_new, objective, acc_old, acc_new, criterion)


_Scores = tuple[tuple[float, ...], tuple[float, ...], tuple[float, ...] | None, tuple[float, ...] | None,
               tuple[float, ...], tuple[float, ...]]


def _scores(
    model: nn.Module, path: Any, ts: tuple[float, ...], new_loader: Iterable[Any], old_loader: Iterable[Any] | None,
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None, device: torch.device | str | None, old_weight: float,
    criterion: str,
) -> _Scores:
    """``(loss_old, loss_new, acc_old, acc_new, objective, loss_objective)`` at every ``t`` of ``path``."""
    new = evaluate_path(model, path, new_loader, ts=ts, loss_fn=loss_fn, device=device)
    loss_new = tuple(float(v) for v in new.loss)
    acc_new = None if new.accuracy is None else tuple(float(v) for v in new.accuracy)
    if old_loader is not None:
        old = evaluate_path(model, path, old_loader, ts=ts, loss_fn=loss_fn, device=device)
        loss_old = tuple(float(v) for v in old.loss)
        acc_old = None if old.accuracy is None or acc_new is None else tuple(float(v) for v in old.accuracy)
    else:
        loss_old = tuple(float("nan") for _ in ts)
        acc_old = None if acc_new is None else tuple(float("nan") for _ in ts)

    def weighted(olds: tuple[float, ...], news: tuple[float, ...]) -> tuple[float, ...]:
        if old_loader is None:
            return news
        return tuple(old_weight * a + (1.0 - old_weight) * b for a, b in zip(olds, news))

    loss_objective = weighted(loss_old, loss_new)
    if criterion == "accuracy":
        if acc_new is None or acc_old is None:
            raise RebasinError("criterion='accuracy' needs class scores: the outputs gave no accuracy")
        objective = weighted(tuple(1.0 - a for a in acc_old), tuple(1.0 - a for a in acc_new))
    else:
        objective = loss_objective
    return loss_old, loss_new, acc_old, acc_new, objective, loss_objective


def _best(ts: Sequence[float], objective: Sequence[float], loss_objective: Sequence[float]) -> int | None:
    """Index of the lowest objective (ties: lower loss objective, then larger t) among finite losses, or None."""
    finite = [i for i, v in enumerate(loss_objective) if v == v and v != float("inf")]
    return min(finite, key=lambda i: (objective[i], loss_objective[i], -ts[i])) if finite else None


def select_layer_alphas(
    model: nn.Module,
    state_prev_aligned: State,
    state_new: State,
    *,
    new_loader: Iterable[Any],
    old_loader: Iterable[Any] | None = None,
    grid: int | Sequence[float] = 11,
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
    device: torch.device | str | None = None,
    old_weight: float = 0.5,
    criterion: str = "loss",
    passes: int = 1,
    start: AlphaChoice | None = None,
) -> LayerAlphaChoice:
    """One weight of the new model per layer (:func:`layer_groups`), by a coordinate search from the best single alpha.

    The search starts with every layer at the single alpha of :func:`select_alpha` (``start``, computed when not
    given). Then, layer by layer from input to output, every value of ``grid`` is tried for that layer with the
    others fixed, and the layer keeps the best one when it lowers the objective of :func:`select_alpha` (same
    data, ``old_weight`` and ``criterion``; ties by the loss objective, then the larger alpha) below the current
    one, else stays. ``passes`` such sweeps at most; the search stops after a sweep that changed nothing. The
    objective never ends above the single alpha's; when every layer ends at one value the merge is exactly
    ``merge_states(..., that value)``. Deterministic (no random draw); the model and the states are not modified.

    Parameters
    ----------
    model, state_prev_aligned, state_new, new_loader, old_loader, grid, loss_fn, device, old_weight, criterion
        As for :func:`select_alpha` (the loaders are iterated once per layer, value and pass: give lists).
    passes
        Sweeps over the layers, at least 1.
    start
        A :func:`select_alpha` result on the same data to start from (saves its evaluation).

    Returns
    -------
    LayerAlphaChoice

    Examples
    --------
    >>> choice = select_layer_alphas(model, prev, new, new_loader=new, old_loader=old)  # doctest: +SKIP
    >>> choice.alphas                                                                    # doctest: +SKIP
    {'layers.0': 1.0, 'layers.2': 0.6}
    """
    ts = alpha_grid(grid)
    passes = check_int(passes, "passes (sweeps over the layers)")
    old_weight = check_alpha(old_weight, "old_weight")
    if start is not None and not isinstance(start, AlphaChoice):
        raise RebasinError(f"start must be the AlphaChoice of select_alpha on the same data, got {type(start).__name__}")
    if start is not None and (start.criterion != criterion or tuple(start.grid) != tuple(ts)):
        raise RebasinError(
            f"start was chosen with criterion={start.criterion!r} on the grid {tuple(start.grid)}, this search uses "
            f"criterion={criterion!r} on {tuple(ts)}: pass select_alpha's result for the same criterion and grid"
        )
    if start is None:
        start = select_alpha(model, state_prev_aligned, state_new, new_loader=new_loader, old_loader=old_loader,
                             grid=ts, loss_fn=loss_fn, device=device, old_weight=old_weight, criterion=criterion)
    groups = layer_groups(state_new)
    alphas = {name: start.alpha for name in groups}
    i = start.grid.index(start.alpha)
    current = (start.objective[i], _loss_objective(start, i, old_weight, old_loader is not None))
    ran = 0
    for _ in range(passes):
        ran += 1
        changed = False
        for name in groups:
            def state_at(t: float, _name: str = name) -> dict[str, Tensor]:
                return merge_states(state_prev_aligned, state_new, {**alphas, _name: t})

            *_, objective, loss_objective = _scores(model, state_at, ts, new_loader, old_loader, loss_fn, device,
                                                    old_weight, criterion)
            best = _best(ts, objective, loss_objective)
            if best is not None and (objective[best], loss_objective[best]) < current:
                alphas[name], current, changed = ts[best], (objective[best], loss_objective[best]), True
        if not changed:
            break
    return LayerAlphaChoice(alphas, start, current[0], current[1], ran)


def _loss_objective(choice: AlphaChoice, i: int, old_weight: float, has_old: bool) -> float:
    """The loss objective of ``choice`` at its ``i``-th candidate (the tie-breaker of an accuracy choice)."""
    if not has_old:
        return choice.loss_new[i]
    return old_weight * choice.loss_old[i] + (1.0 - old_weight) * choice.loss_new[i]


def conservative_alpha(choice: AlphaChoice, tolerance: float) -> float:
    """The smallest alpha of ``choice.grid`` whose new-data accuracy is within ``tolerance`` of the largest alpha's.

    The choice of a learner that keeps no old data: it cannot measure forgetting, so it keeps as much of the
    previous model as the new task allows. The largest candidate (``alpha = 1`` on the default grid, the
    freshly trained model) is the reference and always qualifies.

    Examples
    --------
    >>> c = AlphaChoice(0.0, (0.0, 0.5, 1.0), (), (), (), acc_new=(0.5, 0.89, 0.9))
    >>> conservative_alpha(c, 0.02)
    0.5
    """
    if choice.acc_new is None:
        raise RebasinError("choosing alpha on the current task's accuracy needs class scores: the outputs gave none")
    tolerance = check_alpha(tolerance, "tolerance")
    reference = choice.acc_new[-1]
    return next(t for t, a in zip(choice.grid, choice.acc_new) if a >= reference - tolerance)


@torch.no_grad()
def write_state_(model: nn.Module, state: State) -> None:
    """Copy ``state`` into ``model``'s existing parameters and buffers, in place.

    The parameter objects stay the same (an optimizer holding them keeps working); only their
    values change. Raises :class:`RebasinError` on missing/unexpected keys or shape mismatches;
    nothing is written in that case.

    Examples
    --------
    >>> import torch
    >>> m = torch.nn.Linear(2, 1)
    >>> w = m.weight
    >>> write_state_(m, {"weight": torch.zeros(1, 2), "bias": torch.ones(1)})
    >>> m.weight is w, float(m.bias)
    (True, 1.0)
    """
    target = model.state_dict(keep_vars=True)
    missing = [k for k in target if k not in state]
    unexpected = [k for k in state if k not in target]
    shapes = [
        f"{k!r}: model {tuple(target[k].shape)} vs state {tuple(state[k].shape)}"
        for k in target
        if k in state and tuple(target[k].shape) != tuple(state[k].shape)
    ]
    if missing or unexpected or shapes:
        raise RebasinError(
            f"cannot write the merged state into the model: missing key(s) {missing}, unexpected key(s) "
            f"{unexpected}, shape mismatches {shapes}"
        )
    for key, t in target.items():
        t.copy_(state[key])


def reset_optimizer_state_(optimizer: torch.optim.Optimizer, params: Iterable[Tensor]) -> int:
    """Drop the optimizer's per-parameter state (momenta, Adam moments and step) for ``params``.

    Returns the number of parameters whose state was dropped. The parameter groups (and so the
    learning rates and the parameter objects) are untouched.
    """
    dropped = 0
    for p in params:
        if optimizer.state.pop(p, None) is not None:
            dropped += 1
    return dropped


def midpoint_state(
    spec: PermutationSpec,
    state_prev: State,
    matrices: Mapping[str, Tensor],
    delta: Mapping[str, Tensor] | None = None,
) -> dict[str, Tensor]:
    r"""``½(θ_prev + π_S(θ_prev)) + δ`` with soft permutation matrices ``S`` (differentiable in ``S`` and ``δ``).

    Parameters
    ----------
    spec
        Permutation spec of the architecture.
    state_prev
        Previous model's full state_dict (not mutated; no gradient needed).
    matrices
        ``{perm: (n, n) doubly stochastic matrix}`` (e.g. :func:`rebasin.matching.sinkhorn` of logits).
    delta
        Residuals added to some floating entries (same shapes), or None.

    Returns
    -------
    dict
        Floating entries are the midpoint (plus ``delta``); integer buffers are copies.
    """
    permuted = soft_permute(spec, matrices, state_prev)
    out: dict[str, Tensor] = {}
    for k, v in state_prev.items():
        if v.is_floating_point():
            t = 0.5 * (v + permuted[k])
            if delta is not None and k in delta:
                t = t + delta[k]
            out[k] = t
        else:
            out[k] = v.clone()
    return out


@torch.no_grad()
def rebasin_il_state(
    spec: PermutationSpec,
    state_prev: State,
    perms: Mapping[str, Tensor],
    alpha: float,
    delta: Mapping[str, Tensor] | None = None,
) -> dict[str, Tensor]:
    r"""``(1 − α) θ_prev + α π_P̂(θ_prev) + δ`` with hard permutations ``P̂`` (Peña et al.'s final merge).

    .. math::

        \theta = (1 - \alpha)\,\theta_{\text{prev}} + \alpha\,\pi_{\hat P}(\theta_{\text{prev}}) + \delta

    Parameters
    ----------
    spec
        Permutation spec of the architecture.
    state_prev
        The previous model's full state_dict (not mutated).
    perms
        ``{perm: LongTensor (n,)}``, the hard permutations :math:`\hat P`.
    alpha
        Weight of the permuted copy :math:`\pi_{\hat P}(\theta_{\text{prev}})`, in ``[0, 1]`` (the
        project's convention: the weight of B). ``alpha = 0`` gives :math:`\theta_{\text{prev}}`,
        ``alpha = 1`` the permuted copy, both exactly (before ``delta``). Peña et al.'s
        :math:`\alpha` (weight of the previous model) is ``1 - alpha``; before the convention was
        unified this argument meant that, with ``0.8`` where ``0.2`` stands now.
    delta
        Residuals added to some floating entries (same shapes), or None.

    Returns
    -------
    dict
        New, detached tensors; integer buffers are copied from ``state_prev``.

    Examples
    --------
    >>> import torch
    >>> from rebasin import PermutationSpec
    >>> spec = PermutationSpec({"w": ("P",)})
    >>> s = {"w": torch.tensor([1.0, 3.0])}
    >>> rebasin_il_state(spec, s, {"P": torch.tensor([1, 0])}, 0.25)["w"]
    tensor([1.5000, 2.5000])
    """
    alpha = check_alpha(alpha)
    permuted = permute(spec, perms, state_prev)
    out = interpolate(state_prev, permuted, alpha)
    if delta:
        for k, d in delta.items():
            if k not in out:
                raise RebasinError(f"residual for unknown state_dict key {k!r}")
            out[k] = out[k] + d.detach().to(out[k].dtype)
    return {k: v.detach() for k, v in out.items()}
