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
from rebasin.spec import soft_permute

__all__ = [
    "AlphaChoice",
    "CRITERIA",
    "alpha_grid",
    "merge_states",
    "select_alpha",
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


def merge_states(state_prev_aligned: State, state_new: State, alpha: float) -> dict[str, Tensor]:
    r"""``(1 - alpha) * state_prev_aligned + alpha * state_new`` (exact at both ends).

    Parameters
    ----------
    state_prev_aligned
        The previous model's state_dict, already permuted into the new model's basis.
    state_new
        The freshly trained model's state_dict. Same keys and shapes. Neither input is mutated.
    alpha
        Weight of the new model, in ``[0, 1]``.

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
    alpha = check_alpha(alpha)
    out = interpolate(state_prev_aligned, state_new, alpha)
    return {k: (v if v.is_floating_point() else state_new[k].clone()) for k, v in out.items()}


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
    line = LinearPath(state_prev_aligned, state_new)
    new = evaluate_path(model, line, new_loader, ts=ts, loss_fn=loss_fn, device=device)
    loss_new = tuple(float(v) for v in new.loss)
    acc_new = None if new.accuracy is None else tuple(float(v) for v in new.accuracy)
    if old_loader is not None:
        old = evaluate_path(model, line, old_loader, ts=ts, loss_fn=loss_fn, device=device)
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
    finite = [i for i, v in enumerate(loss_objective) if v == v and v != float("inf")]
    if not finite:
        raise RebasinError(
            f"the merge loss is not finite at any alpha of the grid {ts}; check the data and the models"
        )
    best = min(finite, key=lambda i: (objective[i], loss_objective[i], -ts[i]))
    return AlphaChoice(ts[best], ts, loss_old, loss_new, objective, acc_old, acc_new, criterion)


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
