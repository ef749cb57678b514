"""The two block steps of proximal alternating minimisation (:mod:`rebasin.paths.pam`) and their objective.

* :func:`bend_steps` -- optimizer steps on the curve's bend with B's end point fixed;
* :func:`proximal_step` -- one entropic proximal step on the soft permutations with the bend fixed, with
  backtracking (its options: :class:`ProximalStep`).

Both evaluate :class:`Objective`: the loss of the model at a point of the curve on one batch. Private to the
``paths`` layer; the public entry point is :func:`rebasin.paths.proximal_alternating_minimization`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .._common import check_float, check_int, cycle_batches, forward_with_state, split_batch, to_device
from .._distributed import Reducer, synced_backward
from .._errors import RebasinError
from ..matching.sinkhorn_op import sinkhorn
from ..spec.core import PermutationSpec
from ..spec.soft import soft_permute
from .curves import BezierCurve, PolyChainCurve
from .running import LossFn

__all__ = ["Curve", "ProximalStep", "Objective", "RunningMean", "adam", "bend_steps", "centred_direction",
           "checked", "proximal_step"]  # fmt: skip

WHAT = "proximal_alternating_minimization"

Curve = BezierCurve | PolyChainCurve


@dataclass(frozen=True)
class ProximalStep:
    r"""Options of PAM's permutation step: :math:`S \leftarrow \mathrm{Sinkhorn}((S - \eta\hat G)/\tau)`.

    Pass one as ``proximal_alternating_minimization(..., perm_step=ProximalStep(lr=2.0))``.

    Attributes
    ----------
    lr
        :math:`\eta`, the step in units of :math:`S`'s entries (``> 0``; about 1 swaps two
        assignments).
    batches
        Batches (one stratified :math:`t` each) whose gradients are averaged for a step, and on
        which the step is checked (``>= 1``).
    max_backtracks
        Halvings of ``lr`` tried before a step is skipped (``>= 0``).
    tau
        Sinkhorn temperature of the projection (``> 0``; small keeps :math:`S` near a permutation).
    n_iter
        Sinkhorn iterations per projection (``>= 1``; stops early at marginal error 1e-6).

    Raises
    ------
    RebasinError
        A count or step size out of range.
    """

    lr: float = 1.0
    batches: int = 2
    max_backtracks: int = 3
    tau: float = 0.05
    n_iter: int = 1000

    def __post_init__(self) -> None:
        check_int(self.batches, "ProximalStep.batches", 1)
        check_int(self.max_backtracks, "ProximalStep.max_backtracks", 0)
        check_int(self.n_iter, "ProximalStep.n_iter", 1)
        for name in ("lr", "tau"):
            value = getattr(self, name)
            if not check_float(value, f"ProximalStep.{name}") > 0:
                raise RebasinError(f"ProximalStep.{name} must be positive, got {value!r}")


# ----------------------------------------------------------------------------------------------
# the objective: the loss at one point of the curve, on one batch


class Objective:
    r""":math:`\ell(f(x;\ \phi(t;\ \theta_A, \text{end})), y)` with batches drawn in turn and seeded :math:`t`."""

    def __init__(
        self, model: nn.Module, loader: Iterable[Any], loss_fn: LossFn, device: torch.device, seed: int
    ) -> None:
        self.model, self.loss_fn, self.device = model, loss_fn, device
        self.batches = cycle_batches(loader, "proximal_alternating_minimization")
        self.gen = torch.Generator().manual_seed(int(seed))

    def draw(self, stratum: int = 0, strata: int = 1) -> tuple[Any, Any, float]:
        """The next batch and a :math:`t` drawn uniformly from ``[stratum, stratum + 1) / strata``."""
        x, y = split_batch(next(self.batches))
        if y is None:
            raise RebasinError("proximal_alternating_minimization needs (inputs, targets) batches; got inputs only")
        t = (stratum + float(torch.rand((), generator=self.gen, dtype=torch.float64))) / strata
        return to_device(x, self.device), to_device(y, self.device), t

    def dropout_seed(self) -> int:
        """A seed that fixes the dropout masks of one batch across repeated evaluations."""
        return int(torch.randint(2**62, (), generator=self.gen))

    def loss(
        self, curve: Curve, end: Mapping[str, Tensor] | None, x: Any, y: Any, t: float, rng: int | None = None
    ) -> Tensor:
        """The loss at ``curve``'s point ``t`` with B replaced by ``end`` (the curve's own B when None)."""
        if rng is not None:
            torch.manual_seed(rng)
        loss = self.loss_fn(forward_with_state(self.model, curve.state_dict_at(t, end=end), x), y)
        if not bool(torch.isfinite(loss.detach())):
            raise RebasinError(f"the training loss became {float(loss)} at t={t:.3g}; lower lr or perm_step.lr")
        return loss


class RunningMean:
    """Example-weighted mean of batch losses, accumulated in order."""

    def __init__(self) -> None:
        self.total, self.count = 0.0, 0

    def add(self, loss: Tensor, n: int) -> None:
        self.total, self.count = self.total + float(loss.detach()) * n, self.count + n

    @property
    def mean(self) -> float:
        return self.total / self.count

    def over_ranks(self, red: Reducer | None) -> float:
        """The mean over every rank's examples (this process's mean when ``red`` is None)."""
        if red is None:
            return self.mean
        total, count = red.sum_numbers(self.total, self.count)
        return total / count


def checked(red: Reducer | None, fn: Callable[[], Any], what: str) -> Any:
    """``fn()``; with ``red``, a failure on any rank raises on every rank (one tiny collective)."""
    if red is None:
        return fn()
    error: BaseException | None = None
    value: Any = None
    try:
        value = fn()
    except Exception as err:  # noqa: BLE001 - raised on every rank by red.fail
        error = err
    (failed,) = red.sum_numbers(0.0 if error is None else 1.0)
    if failed:
        red.fail(what, error)
    return value


# ----------------------------------------------------------------------------------------------
# (a) the bend step


def adam(curve: Curve, lr: float) -> torch.optim.Optimizer | None:
    """Adam over the curve's trainable bends; None when it has none (the steps then only measure the loss)."""
    params = [p for p in curve.parameters() if p.requires_grad]
    return torch.optim.Adam(params, lr=lr) if params else None


def bend_steps(
    objective: Objective, curve: Curve, end: Mapping[str, Tensor] | None, opt: torch.optim.Optimizer | None,
    n: int, seen: RunningMean, red: Reducer | None = None,
) -> None:
    r"""``n`` optimizer steps on the bend :math:`\theta` with B fixed at ``end``, one batch and one :math:`t` each.

    With ``red`` the bend's gradient is averaged over the ranks before each step (every rank draws the same
    :math:`t`), and a failure on one rank (an empty shard, a non-finite loss) raises on every rank.
    """
    params = [p for group in opt.param_groups for p in group["params"]] if opt is not None else []
    for _ in range(n):
        got: list[tuple[Tensor, int]] = []

        def loss_of(got: list[tuple[Tensor, int]] = got) -> Tensor:
            x, y, t = objective.draw()
            loss = objective.loss(curve, end, x, y, t)
            got.append((loss.detach(), int(y.shape[0])))
            return loss

        if opt is not None:
            opt.zero_grad(set_to_none=True)
            synced_backward(red, params, loss_of, WHAT)
            opt.step()
        else:
            checked(red, loss_of, WHAT)
        seen.add(*got[0])


# ----------------------------------------------------------------------------------------------
# (b) the proximal permutation step


def centred_direction(g: Tensor) -> Tensor:
    """``g`` minus its row and column means (the part Sinkhorn sees), scaled to max |entry| 1."""
    g = g - g.mean(-1, keepdim=True) - g.mean(-2, keepdim=True) + g.mean()
    scale = g.abs().max()
    return g / scale if float(scale) > 0 else g


def proximal_step(
    objective: Objective, curve: Curve, spec: PermutationSpec, soft: dict[str, Tensor],
    state_b: Mapping[str, Tensor], step: ProximalStep, seen: RunningMean, red: Reducer | None = None,
) -> tuple[dict[str, Tensor], float]:
    r"""One backtracking proximal step on the soft permutations :math:`S` with the bend fixed.

    :math:`S \leftarrow \mathrm{Sinkhorn}((S - \eta\hat G)/\tau)`, :math:`\eta` halved until the loss on the
    step's own batches (same :math:`t`, same dropout masks) does not rise. Returns the new :math:`S` and the
    :math:`\eta` taken (0.0 and the old :math:`S` when every trial was rejected).

    With ``red`` the gradient and the losses (before and after each trial) are averaged over the ranks, each on
    its own batches with the same :math:`t`: every rank takes the same step, the one a single process would take
    on the union of the ranks' batches (equal batch sizes).
    """
    m = step.batches
    grads = {p: torch.zeros_like(s) for p, s in soft.items()}
    draws: list[tuple[Any, Any, float, int]] = []

    def local() -> float:
        draws.extend((*objective.draw(i, m), objective.dropout_seed()) for i in range(m))
        leaves = {p: s.detach().clone().requires_grad_(True) for p, s in soft.items()}
        base = 0.0
        for x, y, t, rng in draws:
            loss = objective.loss(curve, soft_permute(spec, leaves, state_b), x, y, t, rng)
            got = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
            for p, g in zip(leaves, got):
                if g is not None:
                    grads[p] += g / m
            base += float(loss.detach()) / m
            seen.add(loss, int(y.shape[0]))
        return base

    base = checked(red, local, WHAT)
    if red is not None:
        *summed, (total,) = red.sum([*grads.values(), torch.tensor([base], dtype=torch.float64)])
        grads = {p: (g / red.world).to(grads[p].dtype) for p, g in zip(grads, summed)}
        base = float(total) / red.world

    def trial_value(end: Mapping[str, Tensor]) -> float:
        return sum(float(objective.loss(curve, end, *draw)) for draw in draws) / m

    direction = {p: centred_direction(g) for p, g in grads.items()}
    eta = float(step.lr)
    for _ in range(step.max_backtracks + 1):
        trial = {
            p: sinkhorn(soft[p] - eta * direction[p], tau=float(step.tau), n_iter=step.n_iter,
                        grad="detach", tol=1e-6, warn=False)
            for p in spec.perms
        }  # fmt: skip
        with torch.no_grad():
            end = soft_permute(spec, trial, state_b)
            value = checked(red, lambda end=end: trial_value(end), WHAT)  # type: ignore[misc]  # mypy cannot infer a lambda assigned to a typed variable
        if red is not None:
            value = red.sum_numbers(value)[0] / red.world
        if value <= base:
            return trial, eta
        eta *= 0.5
    return soft, 0.0
