"""Straight-through estimator matching (Ainsworth et al. 2023, section 3.3).

Learn free weights ``W`` whose weight-matching projection of B makes the midpoint of A and the
projected B a good model. Each step:

1. ``π = weight_matching(spec, W, θ_B, init=π_previous)`` (warm-started; hard permutations);
2. ``θ̃ = permute(spec, π, θ_B) + (W − stopgrad(W))``: the *value* is the projected B, the
   *gradient* flows to ``W`` unchanged (straight-through);
3. ``loss = loss_fn(f(½θ_A + ½θ̃)(x), y)`` evaluated with :func:`torch.func.functional_call`;
4. an Adam step on ``W``.

``W`` starts at a copy of A's floating parameters. Buffers are not trained: the midpoint model
uses the interpolation ``½ buffers_A + ½ permute(π, buffers_B)`` (BatchNorm running statistics of
A and of the projected B, averaged) and runs in eval mode, so BatchNorm uses those running
statistics and dropout is off. Integer buffers (``num_batches_tracked``) are A's.

By default the returned permutations are the *final* ones, as in the paper: the projection of the
final ``W`` (one more weight matching after the last step). With ``select="best"`` they are the
permutations of the step with the lowest midpoint loss instead (also reported in :class:`STEInfo`
as ``best_perms``). That loss is measured on each step's own training batch, so "best" is exact
for a full-batch loader and noisy otherwise. On small models the final permutations can be worse
than the weight-matching start (the projection keeps jumping as ``W`` drifts); the first step's
permutations are exactly weight matching's, so with a full-batch loader ``select="best"`` is never
worse than weight matching on that batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from .._common import (
    State,
    check_int,
    cross_entropy_of,
    forward_with_state,
    head,
    model_device,
    nonempty,
    paired_states,
    progress_counter,
    resolve_device,
    split_batch,
    to_device,
)
from .._distributed import Reducer, fingerprint, guarded, lockstep, reducer, synced_backward
from .._errors import RebasinError
from ..spec.core import PermutationSpec, permute_unchecked
from ..trace.tracing import spec_from_model
from .weight import weight_matching

__all__ = ["ste_matching", "STEInfo"]

Perms = dict[str, Tensor]


@dataclass(frozen=True)
class STEInfo:
    """Diagnostics of :func:`ste_matching`.

    Attributes
    ----------
    losses
        Midpoint loss of every step (on that step's batch, with that step's permutations).
    num_steps
        Number of optimisation steps taken.
    best_step
        Step with the lowest loss in ``losses`` (-1 if no step was taken).
    best_loss
        ``losses[best_step]`` (``inf`` if no step was taken).
    best_perms
        The permutations used at ``best_step`` (the final ones if no step was taken).
    changed
        Per step, the number of units whose assignment changed from the previous step's
        permutations (0 for the first step).
    """

    losses: list[float]
    num_steps: int
    best_step: int
    best_loss: float
    best_perms: dict[str, Tensor] = field(repr=False)
    changed: list[int] = field(default_factory=list)


def ste_matching(
    model_a: nn.Module,
    model_b: nn.Module,
    loader: Iterable[Any],
    *,
    loss_fn: Callable[[Any, Any], Tensor] | None = None,
    spec: PermutationSpec | None = None,
    example_input: Any = None,
    epochs: int = 1,
    lr: float = 1e-3,
    max_steps: int | None = None,
    n_iter: int = 100,
    seed: int = 0,
    device: Any = None,
    progress: bool | None = None,
    select: Literal["final", "best"] = "final",
    return_info: bool = False,
    state_a: State | None = None,
    state_b: State | None = None,
    sync: bool = True,
    group: Any = None,
) -> dict[str, Tensor] | tuple[dict[str, Tensor], STEInfo]:
    r"""Align B to A by learning weights whose projection minimises the midpoint loss.

    Solves, with a straight-through gradient through the projection,

    .. math::

        \min_W \; \mathbb{E}_{(x, y)}\, \ell\big(f(\tfrac12\theta_A + \tfrac12\pi_W(\theta_B))(x), y\big),
        \qquad \pi_W = \arg\max_\pi \langle W, \pi(\theta_B) \rangle .

    Parameters
    ----------
    model_a, model_b
        Two models of the same architecture; neither is modified. ``model_a``'s module is used to
        run the midpoint (through ``functional_call``, in eval mode).
    loader
        Iterable of batches ``(x, y, ...)``; read ``epochs`` times.
    loss_fn
        ``loss_fn(output, y) -> scalar Tensor``; default :func:`torch.nn.functional.cross_entropy`.
    spec
        The permutation spec; traced from ``model_a`` when None (with ``example_input``, or the
        first two samples of the first batch).
    epochs
        Passes over ``loader``.
    lr
        Adam learning rate on ``W``.
    max_steps
        Stop after this many steps in all (default: no limit).
    n_iter
        Sweeps of each inner weight matching.
    seed
        Step ``k``'s weight matching uses ``seed + k`` (its visiting order), so the first
        projection is exactly ``weight_matching(spec, θ_A, θ_B, seed=seed)``. Same seed, same
        batches → same result.
    device
        Where to run (default: the models' common device; different devices raise).
    progress
        Show a tqdm progress bar; None (default): only when stderr is a terminal (or in Jupyter), so a
        piped or logged run stays clean.
    select
        ``"final"`` (the paper): the projection of the final weights. ``"best"``: the permutations
        of the step with the lowest midpoint loss (see the module notes).
    return_info
        Also return an :class:`STEInfo`.
    state_a, state_b
        Align these state_dicts (parameters and buffers) instead of the models' own; the models are then
        only the architecture (``model_a`` runs the midpoint through ``functional_call``). Nothing is copied
        into a module.
    sync, group
        Under ``torch.distributed`` (an initialised process group and ``sync=True``, the default) the gradient
        of ``W`` is averaged over the ranks of ``group`` (None: the default group) before every step, so every
        rank takes the step one process would take on the union of the ranks' batches (for equal batch
        sizes), and the permutations returned are broadcast from the group's first rank. Every rank needs as
        many batches (a ``DistributedSampler`` pads). ``sync=False``: this process alone.

    Returns
    -------
    dict or (dict, STEInfo)
        The final (or best) permutations ``{perm: LongTensor (n,)}`` with ``permute(spec, perms, state_b)``
        close to A in the sense of the learned objective.

    Examples
    --------
    >>> import copy
    >>> from rebasin import invert, permute, random_permutation
    >>> from rebasin.apps.models import MLP
    >>> from rebasin.trace import spec_from_model
    >>> _ = torch.manual_seed(0)
    >>> model_a, x, y = MLP(4, [8], 3), torch.randn(32, 4), torch.randint(0, 3, (32,))
    >>> spec = spec_from_model(model_a, x[:2])
    >>> pi = random_permutation(spec, seed=1)
    >>> model_b = copy.deepcopy(model_a)
    >>> _ = model_b.load_state_dict(permute(spec, pi, model_a.state_dict()))
    >>> perms, info = ste_matching(model_a, model_b, [(x[:16], y[:16]), (x[16:], y[16:])],
    ...                            spec=spec, epochs=2, return_info=True)
    >>> info.num_steps, torch.equal(perms["P0"], invert(pi)["P0"])
    (4, True)

    References
    ----------
    Ainsworth, Hayase, Srinivasa. Git Re-Basin: Merging Models modulo Permutation Symmetries.
    ICLR 2023, section 3.3.
    """
    _check_options(epochs, lr, max_steps, select)
    red = reducer(sync, group)
    loss_fn = cross_entropy_of if loss_fn is None else loss_fn
    dev = resolve_device(model_a, model_b, device=device)
    with guarded(red, "ste_matching") as outcome:
        state_a, state_b = paired_states(model_a, model_b, dev, state_a=state_a, state_b=state_b)
        if spec is None:
            spec = _trace_spec(model_a, loader, example_input)
        spec.validate_pair(state_a, state_b)
        outcome.key = fingerprint(spec.axes, state_a)
    weights = _free_weights(model_a, state_a)  # W starts at θ_A
    optimizer = torch.optim.Adam(list(weights.values()), lr=float(lr))

    def project(perms: Perms | None, step: int) -> Perms:
        return _project(spec, state_a, weights, state_b, perms, n_iter=n_iter, seed=int(seed) + step, device=dev)

    history = _History()
    perms: Perms | None = None
    with progress_counter(progress, _total_steps(loader, epochs, max_steps), desc="ste") as tick:
        for step, (x, y) in enumerate(_steps(loader, epochs, max_steps, dev, red)):
            perms = history.moved(perms, project(perms, step))  # 1. π = projection of W
            mid = _straight_through_midpoint(spec, state_a, state_b, weights, perms)  # 2. ½θ_A + ½(π(θ_B) + W − sg(W))
            optimizer.zero_grad(set_to_none=True)
            value = synced_backward(  # 3. ℓ(f(midpoint)(x), y), its gradient averaged over the ranks
                red, list(weights.values()),
                lambda mid=mid, x=x, y=y, step=step: _midpoint_loss(model_a, mid, x, y, loss_fn, step)[0],  # type: ignore[misc]  # mypy cannot infer a lambda assigned to a typed variable
                "ste_matching",
            )
            optimizer.step()  # 4. an Adam step on W
            history.record(step, value, perms)
            tick(loss=f"{value:.4f}")
    final = project(perms, history.num_steps)
    result = history.best_or(final) if select == "best" else final
    if red is not None:  # decided once: every rank holds the first rank's permutations
        final, result = red.broadcast(final), red.broadcast(result)
    return (result, history.info(final)) if return_info else result


# ---------------------------------------------------------------------------------------- set-up
def _check_options(epochs: int, lr: float, max_steps: int | None, select: str) -> None:
    check_int(epochs, "epochs", 0)
    if max_steps is not None:
        check_int(max_steps, "max_steps", 0)
    if not float(lr) > 0:
        raise RebasinError(f"lr must be positive, got {lr}")
    if select not in ("final", "best"):
        raise RebasinError(f"select must be 'final' or 'best', got {select!r}")


def _trace_spec(model_a: nn.Module, loader: Iterable[Any], example_input: Any) -> PermutationSpec:
    """``model_a``'s spec, traced from ``example_input`` or the first two samples of the first batch."""
    if example_input is None:
        try:
            first = next(iter(loader))
        except StopIteration:
            raise RebasinError("the loader yielded no batch; cannot trace the model") from None
        example_input = head(split_batch(first)[0])
    return spec_from_model(model_a, to_device(example_input, model_device(model_a)))


def _free_weights(model: nn.Module, state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The trainable ``W``: a copy of ``model``'s floating-point parameters in ``state`` (buffers are not trained)."""
    names = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    keys = [k for k in state if k in names and state[k].is_floating_point()]
    if not keys:
        raise RebasinError("model_a has no floating-point parameters to train")
    return {k: state[k].detach().clone().requires_grad_(True) for k in keys}


# ---------------------------------------------------------------------------------------- the ideas
def _project(
    spec: PermutationSpec,
    state_a: Mapping[str, Tensor],
    weights: Mapping[str, Tensor],
    state_b: Mapping[str, Tensor],
    perms: Perms | None,
    *,
    n_iter: int,
    seed: int,
    device: torch.device,
) -> Perms:
    """The projection ``π_W = argmax_π ⟨W, π(θ_B)⟩``: weight matching of B onto ``W`` (A's buffers), warm-started."""
    target = dict(state_a)
    target.update({k: w.detach() for k, w in weights.items()})
    return weight_matching(spec, target, state_b, n_iter=n_iter, init=perms, seed=seed, device=device)


def _straight_through_midpoint(
    spec: PermutationSpec,
    state_a: Mapping[str, Tensor],
    state_b: Mapping[str, Tensor],
    weights: Mapping[str, Tensor],
    perms: Perms,
) -> dict[str, Tensor]:
    """``½θ_A + ½θ̃`` with ``θ̃ = π(θ_B) + (W − stopgrad(W))``: the value of projected B, the gradient of ``W``.

    Untrained floating buffers are interpolated (``½ A + ½ π(B)``); integer buffers are A's.
    """
    projected = permute_unchecked(spec, perms, state_b)
    mid: dict[str, Tensor] = {}
    for k, a in state_a.items():
        if k in weights:
            w = weights[k]
            mid[k] = 0.5 * a + 0.5 * (projected[k] + (w - w.detach()))
        elif a.is_floating_point():
            mid[k] = torch.lerp(a, projected[k], 0.5)
        else:
            mid[k] = a.clone()
    return mid


def _midpoint_loss(
    model: nn.Module, mid: Mapping[str, Tensor], x: Any, y: Any, loss_fn: Callable[[Any, Any], Tensor], step: int
) -> tuple[Tensor, float]:
    """``loss_fn(f(mid)(x), y)`` in eval mode, checked to be a finite scalar; the loss and its value."""
    loss = loss_fn(forward_with_state(model, mid, x, eval_mode=True), y)
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        raise RebasinError("loss_fn must return a scalar Tensor")
    value = float(loss.detach())
    if not math.isfinite(value):
        raise RebasinError(f"the midpoint loss is not finite at step {step}: lower lr")
    return loss, value


# ---------------------------------------------------------------------------------------- the loop
def _steps(
    loader: Iterable[Any], epochs: int, max_steps: int | None, device: torch.device, red: Reducer | None = None
) -> Iterator[tuple[Any, Any]]:
    """``(x, y)`` on ``device`` for every step: ``epochs`` passes over ``loader``, at most ``max_steps`` in all.

    With a reducer the ranks step in lockstep (see :func:`rebasin._distributed.lockstep`).
    """
    step = 0
    for _ in range(int(epochs)):
        if max_steps is not None and step >= int(max_steps):
            return
        for x, y in lockstep(red, _pairs(nonempty(loader, "ste_matching")), "ste_matching"):
            if max_steps is not None and step >= int(max_steps):
                break
            yield to_device(x, device), to_device(y, device)
            step += 1


def _pairs(batches: Iterable[Any]) -> Iterator[tuple[Any, Any]]:
    for batch in batches:
        x, y = split_batch(batch)
        if y is None:
            raise RebasinError("ste_matching needs batches (x, y): the loss is loss_fn(output, y)")
        yield x, y


def _total_steps(loader: Iterable[Any], epochs: int, max_steps: int | None) -> int | None:
    """Number of steps for the progress bar (None when the loader has no length and no ``max_steps``)."""
    total: int | None
    try:
        total = int(epochs) * len(loader)  # type: ignore[arg-type]  # a loader without len() raises TypeError, caught below
    except TypeError:
        total = None
    if max_steps is not None:
        total = int(max_steps) if total is None else min(total, int(max_steps))
    return total




class _History:
    """What the loop saw: the loss of every step, how many units each projection moved, the best step."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.changed: list[int] = []
        self.best_step, self.best_loss = -1, float("inf")
        self.best_perms: Perms | None = None

    @property
    def num_steps(self) -> int:
        return len(self.losses)

    def moved(self, old: Perms | None, new: Perms) -> Perms:
        """Record how many units changed assignment from ``old`` to ``new`` (0 for the first step); return ``new``."""
        self.changed.append(0 if old is None else sum(int((new[p].cpu() != old[p].cpu()).sum()) for p in new))
        return new

    def record(self, step: int, value: float, perms: Perms) -> None:
        self.losses.append(value)
        if value < self.best_loss:
            self.best_step, self.best_loss = step, value
            self.best_perms = {p: v.detach().clone() for p, v in perms.items()}

    def best_or(self, final: Perms) -> Perms:
        """The permutations of the lowest-loss step (``final`` if no step was taken)."""
        return final if self.best_perms is None else self.best_perms

    def info(self, final: Perms) -> STEInfo:
        return STEInfo(
            losses=self.losses,
            num_steps=self.num_steps,
            best_step=self.best_step,
            best_loss=self.best_loss,
            best_perms=self.best_or(final),
            changed=self.changed,
        )
