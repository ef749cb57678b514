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
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._common import (
    forward_with_state,
    head,
    model_device,
    module_with_state,
    paired_states,
    resolve_device,
    split_batch,
    to_device,
)
from .._errors import RebasinError
from ..spec.core import PermutationSpec, permute_unchecked
from .registry import MatchResult, register_matcher

__all__ = ["ste_matching", "STEInfo"]


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


def _weight_matching() -> Callable[..., Any]:
    from .weight import weight_matching

    return weight_matching


def _param_keys(model: nn.Module, state: dict[str, Tensor]) -> list[str]:
    """State_dict keys of ``model``'s floating-point parameters (the trainable part)."""
    names = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    return [k for k in state if k in names and state[k].is_floating_point()]


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
    progress: bool = False,
    select: Literal["final", "best"] = "final",
    return_info: bool = False,
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
        Show a tqdm progress bar.
    select
        ``"final"`` (the paper): the projection of the final weights. ``"best"``: the permutations
        of the step with the lowest midpoint loss (see the module notes).
    return_info
        Also return an :class:`STEInfo`.

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
    if int(epochs) < 0 or (max_steps is not None and int(max_steps) < 0):
        raise RebasinError(f"epochs and max_steps must be non-negative, got epochs={epochs}, max_steps={max_steps}")
    if not float(lr) > 0:
        raise RebasinError(f"lr must be positive, got {lr}")
    if select not in ("final", "best"):
        raise RebasinError(f"select must be 'final' or 'best', got {select!r}")
    loss_fn = F.cross_entropy if loss_fn is None else loss_fn
    weight_matching = _weight_matching()
    dev = resolve_device(model_a, model_b, device=device)
    state_a, state_b = paired_states(model_a, model_b, dev)
    if spec is None:
        from ..trace.tracing import spec_from_model

        if example_input is None:
            try:
                first = next(iter(loader))
            except StopIteration:
                raise RebasinError("the loader yielded no batch; cannot trace the model") from None
            example_input = head(split_batch(first)[0])
        spec = spec_from_model(model_a, to_device(example_input, model_device(model_a)))
    spec.validate_pair(state_a, state_b)

    keys = _param_keys(model_a, state_a)
    if not keys:
        raise RebasinError("model_a has no floating-point parameters to train")
    weights = {k: state_a[k].detach().clone().requires_grad_(True) for k in keys}
    optimizer = torch.optim.Adam(list(weights.values()), lr=float(lr))

    def project(perms: dict[str, Tensor] | None, step: int) -> dict[str, Tensor]:
        target = dict(state_a)
        target.update({k: w.detach() for k, w in weights.items()})
        return weight_matching(spec, target, state_b, n_iter=n_iter, init=perms, seed=int(seed) + step, device=dev)

    def midpoint(perms: dict[str, Tensor]) -> dict[str, Tensor]:
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

    total: int | None
    try:
        total = int(epochs) * len(loader)  # type: ignore[arg-type]
    except TypeError:
        total = None
    if max_steps is not None:
        total = int(max_steps) if total is None else min(total, int(max_steps))
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc="ste")

    perms: dict[str, Tensor] | None = None
    losses: list[float] = []
    changed: list[int] = []
    best_step, best_loss, best_perms = -1, float("inf"), None
    step = 0
    try:
        for _ in range(int(epochs)):
            if max_steps is not None and step >= int(max_steps):
                break
            for batch in loader:
                if max_steps is not None and step >= int(max_steps):
                    break
                x, y = split_batch(batch)
                if y is None:
                    raise RebasinError("ste_matching needs batches (x, y): the loss is loss_fn(output, y)")
                x, y = to_device(x, dev), to_device(y, dev)
                new = project(perms, step)
                changed.append(
                    0 if perms is None else sum(int((new[p].cpu() != perms[p].cpu()).sum()) for p in new)
                )
                perms = new
                out = forward_with_state(model_a, midpoint(perms), x, eval_mode=True)
                loss = loss_fn(out, y)
                if not isinstance(loss, Tensor) or loss.numel() != 1:
                    raise RebasinError("loss_fn must return a scalar Tensor")
                value = float(loss.detach())
                if not math.isfinite(value):
                    raise RebasinError(f"the midpoint loss is not finite at step {step}: lower lr")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                losses.append(value)
                if value < best_loss:
                    best_step, best_loss = step, value
                    best_perms = {p: v.detach().clone() for p, v in perms.items()}
                step += 1
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{value:.4f}")
    finally:
        if bar is not None:
            bar.close()

    final = project(perms, step)
    best = final if best_perms is None else best_perms
    result = best if select == "best" else final
    if not return_info:
        return result
    info = STEInfo(
        losses=losses,
        num_steps=step,
        best_step=best_step,
        best_loss=best_loss,
        best_perms=best,
        changed=changed,
    )
    return result, info


@register_matcher("ste", needs_data=True, description="Ainsworth et al.: straight-through estimator on the midpoint loss")
def _ste_matcher(
    spec: PermutationSpec,
    state_a: Mapping[str, Tensor],
    state_b: Mapping[str, Tensor],
    *,
    model_a: nn.Module | None = None,
    model_b: nn.Module | None = None,
    loader: Iterable[Any] | None = None,
    seed: int = 0,
    **options: Any,
) -> MatchResult:
    """The straight-through estimator; options as :func:`ste_matching`."""
    if model_a is None:
        raise RebasinError("ste needs model_a (the architecture to run the states through)")
    perms, info = ste_matching(
        module_with_state(model_a, state_a),
        module_with_state(model_b if model_b is not None else model_a, state_b),
        loader,
        spec=spec,
        seed=seed,
        return_info=True,
        **options,
    )
    return MatchResult(perms, info)
